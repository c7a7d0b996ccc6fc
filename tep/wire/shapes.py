"""Pieces of the answers shared by completions and chat: ids, timestamps, usage and the
two logprob shapes."""
from __future__ import annotations

import math
import random
import time
from typing import Iterable

__all__ = ["new_id", "now", "usage", "finite_logprob", "completion_logprobs",
           "chat_logprobs"]


def new_id(prefix: str) -> str:
    """``prefix-<32 hex>``, e.g. ``cmpl-...``, ``chatcmpl-...``. Unique, not secret: the
    ids name requests in logs, so a fast non-cryptographic generator does (uuid4 reads
    the OS entropy pool on every call)."""
    return f"{prefix}-{_ids.getrandbits(128):032x}"


_ids = random.Random()


def now() -> int:
    """Unix time in seconds, the ``created`` field."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finite_logprob(x: float | None) -> float | None:
    """JSON has no -inf; OpenAI reports impossible tokens as -9999.0."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(entries: Iterable, start_offset: int) -> dict:
    """Completions-shape logprobs for a run of tokens.

    ``entries`` are :class:`tep.backend.TokenLogprob`; an entry's ``text_offset`` is
    relative to its part of the text (prompt echo or generation), which starts at
    ``start_offset`` characters into the choice's text.
    """
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    off = start_offset
    for e in entries:
        tokens.append(e.token)
        lps.append(finite_logprob(e.logprob))
        tops.append(None if e.top is None else
                    {t: finite_logprob(lp) for t, lp in e.top})
        if e.text_offset is not None:
            off = start_offset + e.text_offset
        offsets.append(off)
        off += len(e.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Iterable) -> dict:
    """Chat-shape logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for e in entries:
        b = e.bytes if e.bytes is not None else e.token.encode("utf-8")
        content.append({
            "token": e.token,
            "logprob": finite_logprob(e.logprob) if e.logprob is not None else -9999.0,
            "bytes": list(b),
            "top_logprobs": [{"token": t, "logprob": finite_logprob(lp),
                              "bytes": list(t.encode("utf-8"))} for t, lp in (e.top or [])],
        })
    return {"content": content, "refusal": None}
