"""``POST /v1/embeddings``: parse, admit, one batched backend call, answer JSON."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import numpy as np

from tep import errors as E
from tep.backend import Backend
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving.replies import Reply, json_reply
from tep.serving.state import ServerState
from tep.wire.embeddings import embedding_item, parse_embedding_request
from tep.wire.values import parse_json_body

__all__ = ["embeddings"]


async def embeddings(state: ServerState, rec: RequestRecord,
                     read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /v1/embeddings``."""
    backend = state.backend
    if not backend.supports_embeddings():
        raise E.NotSupportedError("This backend does not support embeddings",
                                  code="embeddings_not_supported")
    rid = rec.request_id
    req = parse_embedding_request(parse_json_body(await read_body()), rid or "?")
    rec.model = req.model
    C.check_model(state, req.model)
    dim = backend.embedding_dimensions(req.model)
    if req.dimensions is not None and dim is not None and req.dimensions > dim:
        raise E.BadRequestError(f"'dimensions' must be <= {dim} for model '{req.model}', "
                                f"got {req.dimensions}", param="dimensions")
    if any(isinstance(x, str) for x in req.inputs) and not backend.supports_tokenize():
        raise E.BadRequestError(C.TOKEN_IDS_ONLY.format(param="input"), param="input")
    cancel = await C.admit(state, rec)
    try:
        ids = await C.call(state, rid, cancel, "tokenize", C.tokenize_all, backend, req.model,
                           req.inputs)
        rec.prompt_tokens = sum(len(x) for x in ids)
        if getattr(backend, "submit_embeddings", None) is not None:
            # batched with other requests' inputs (tep.engine's embedding batcher)
            vecs = _check_vectors(await C.submitted(
                rid, cancel, "embeddings",
                lambda done: backend.submit_embeddings(req.model, ids, done)), len(ids))
        else:
            vecs = await C.call(state, rid, cancel, "embeddings", _embed_all, backend,
                                req.model, ids)
    finally:
        C.release(state, cancel)
    data = []
    for i, v in enumerate(vecs):
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if req.dimensions is not None:
            if req.dimensions > v.shape[0]:
                raise E.BadRequestError(f"'dimensions' must be <= {v.shape[0]} for model "
                                        f"'{req.model}', got {req.dimensions}",
                                        param="dimensions")
            v = v[:req.dimensions]
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        data.append(embedding_item(v, i, req.encoding_format))
    n = sum(len(x) for x in ids)
    return json_reply({"object": "list", "data": data, "model": req.model,
                       "usage": {"prompt_tokens": n, "total_tokens": n}})


def _embed_all(backend: Backend, model: str, ids: list[list[int]]) -> list[Any]:
    return _check_vectors(backend.generate_embeddings_batch(model, ids), len(ids))


def _check_vectors(vecs: Any, n: int) -> list[Any]:
    """The backend's vectors as float32 [D] arrays, one per input."""
    if len(vecs) != n:
        raise ValueError(f"generate_embeddings_batch returned {len(vecs)} vectors "
                         f"for {n} inputs")
    out = []
    for v in vecs:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim != 1:
            raise ValueError(f"an embedding has shape {v.shape}, expected [D]")
        out.append(v)
    return out
