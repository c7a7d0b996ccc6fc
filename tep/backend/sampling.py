"""The knobs a backend (or the engine) samples with: :class:`Sampling`.

Only what decides the tokens lives here; how the answer is shaped on the wire (``n``,
``echo``, ``stream_options``, ``user``) stays on the parsed request
(:mod:`tep.wire.sampling`), so an engine never sees it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sampling", "SEED_MODULUS"]

SEED_MODULUS = 2**64


@dataclass
class Sampling:
    """How to generate one choice, parsed and validated.

    A backend passes :meth:`kernel_kwargs` to :func:`tep.kernels.sample`; the server (the
    sink) enforces ``max_tokens``, ``stop`` and ``stop_token_ids`` on what the backend emits.

    Attributes:
        max_tokens: most tokens to generate (completions default 16; chat default is the
            server's ``chat_max_tokens``).
        temperature: 0 means greedy. Range [0, 2].
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 or -1 is off.
        min_p: keep tokens with p >= min_p * p_max; 0 is off.
        presence_penalty, frequency_penalty: in [-2, 2], over output tokens.
        repetition_penalty: > 0; 1 is off. Over prompt and output tokens.
        logit_bias: {token_id: bias}, bias in [-100, 100].
        allowed_token_ids: restrict sampling to these IDs (None = all).
        stop: stop strings; the text ends before the first one and is not included.
        stop_token_ids: token IDs that end generation (not included in the text).
        seed: None for fresh entropy, else an int in [0, 2**64) (negative request seeds
            are taken mod 2**64). A backend uses ``step = index of the generated token``.
        logprobs: None when not requested; otherwise how many top alternatives (0..20)
            to report per token.
        num_speculative_tokens: engine backends with speculative decoding on: most draft
            tokens per step for this request (0 = off for it; None = the server's).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    num_speculative_tokens: int | None = None

    def for_choice(self, j: int) -> "Sampling":
        """The Sampling of choice ``j`` of a prompt: the seed shifted by ``j`` (mod 2**64)."""
        if j == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=(self.seed + j) % SEED_MODULUS)

    def kernel_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`tep.kernels.sample` these knobs stand for
        (without the token histories and ``step``, which the caller owns)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "logit_bias": self.logit_bias,
                "allowed_token_ids": self.allowed_token_ids, "seed": self.seed,
                "logprobs": self.logprobs}
