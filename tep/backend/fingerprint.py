"""``system_fingerprint``: one short string that changes whenever a replay could change.

A fingerprint hashes what decides a request's logits besides the request itself: which
weights (a digest of the model file), which code (tep's version, the inference library's
build) and the settings that change the arithmetic (threads, batch sizes, the prefill
block). Two answers with the same fingerprint, prompt, sampling settings and seed carry
the same tokens; with different fingerprints a replay may differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["fingerprint_of", "file_digest", "EDGE_BYTES"]

EDGE_BYTES = 1 << 20   # the file digest reads this much from each end

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """A cheap digest of a (large) model file: SHA-256 over its size, its first MiB and
    its last MiB (hex, 64 chars). Cached per (path, size, mtime), so a server computes it
    once. It tells files apart that differ in size, header (GGUF metadata and tensor
    table) or tail; two files equal there but different in the middle are not told apart
    (say so in the docs: it is a fingerprint, not a content hash)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _digests.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    h.update(st.st_size.to_bytes(8, "little"))
    with p.open("rb") as f:
        h.update(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    out = h.hexdigest()
    with _lock:
        _digests[key] = out
    return out


def fingerprint_of(parts: Mapping[str, Any]) -> str:
    """``"fp_"`` + 16 hex chars of SHA-256 over ``parts`` as canonical JSON (sorted keys):
    the same parts give the same fingerprint in any process."""
    blob = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"), default=str)
    return "fp_" + hashlib.sha256(blob.encode()).hexdigest()[:16]
