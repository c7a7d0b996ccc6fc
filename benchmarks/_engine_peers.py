"""Backends for bench_engine.py's embeddings part (loaded by ``tep serve --backend``)."""
from __future__ import annotations

import os

from tep.backends.bert import BertBackend
from tep.engine import BatchedEmbeddings


def batched_minilm() -> BatchedEmbeddings:
    """The MiniLM backend with cross-request batching (wait ``$TEP_EMBED_WAIT_MS``)."""
    return BatchedEmbeddings(BertBackend(),
                             max_wait_ms=float(os.environ.get("TEP_EMBED_WAIT_MS", "2")))
