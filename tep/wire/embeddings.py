"""``POST /v1/embeddings``: the request and one ``data`` item of the answer."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from tep.wire.completions import parse_prompts
from tep.wire.fields import EMBEDDING_FIELDS, F
from tep.wire.values import log_unknown, read

__all__ = ["EmbeddingRequest", "parse_embedding_request", "embedding_item"]


@dataclass
class EmbeddingRequest:
    """A parsed ``POST /v1/embeddings`` body: ``inputs`` holds text or token-ID lists."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str
    dimensions: int | None
    raw: dict


def parse_embedding_request(body: dict, request_id: str) -> EmbeddingRequest:
    """Validate an embeddings body (400 naming the offending ``param``)."""
    log_unknown(body, (f.name for f in EMBEDDING_FIELDS), request_id)
    model = read(body, F.model, required=True)
    fmt = read(body, F.encoding_format, "float")
    dims = read(body, F.dimensions)
    read(body, F.user)
    inputs = parse_prompts(body.get("input"), "input")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=fmt, dimensions=dims,
                            raw=body)


def embedding_item(vec: Any, index: int, encoding_format: str) -> dict:
    """One ``data`` item of an embeddings response; ``vec`` float32 [D]. ``base64`` is
    the little-endian float32 bytes."""
    import numpy as np

    v = np.asarray(vec, dtype=np.float32)
    if encoding_format == "base64":
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    else:
        emb = v.tolist()
    return {"object": "embedding", "index": index, "embedding": emb}
