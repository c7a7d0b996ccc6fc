"""The sampling cases every sampling benchmark runs (tep's knob names; temperature 1 when
unset)."""
from __future__ import annotations

__all__ = ["SAMPLING_CASES"]

_CHAIN = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)   # llama.cpp's defaults

SAMPLING_CASES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "chain": dict(_CHAIN),
    "top_p": dict(temperature=1.0, top_p=0.95),
    "full": dict(temperature=1.0),
    "penalties": dict(_CHAIN, repetition_penalty=1.1, frequency_penalty=0.5,
                      presence_penalty=0.5),
}
