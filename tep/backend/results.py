"""What a non-streaming backend call returns: :class:`Completion` (one choice) and its
per-token :class:`TokenLogprob` entries."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Completion", "TokenLogprob"]


@dataclass
class TokenLogprob:
    """Logprob information for one generated token.

    Attributes:
        token: the token's text.
        logprob: its log-probability under the model (natural log), or None (echoed prompt).
        token_id: its ID, when known.
        bytes: its raw bytes (byte-level tokens may be partial UTF-8); None means
            ``token.encode()``.
        top: the most likely alternatives, most likely first, as (text, logprob) pairs;
            None when not requested.
        text_offset: where the token's text starts in the generated text (set by the sink).
    """

    token: str
    logprob: float | None
    token_id: int | None = None
    bytes: bytes | None = None
    top: list[tuple[str, float]] | None = None
    text_offset: int | None = None


@dataclass
class Completion:
    """The result of one non-streamed generation (one choice).

    Attributes:
        text: the generated text (the server adds the echoed prompt and applies stops).
        token_ids: the generated token IDs.
        finish_reason: "stop" (EOS, stop string, stop token) or "length" (max_tokens).
        prompt_tokens: prompt length; None lets the server count the token IDs it sent
            (chat backends should set it).
        completion_tokens: generated token count; None means ``len(token_ids)``.
        logprobs: one entry per generated token when logprobs were requested, else None.
        stop_sequence: the stop string that ended the text (set by the server's sink),
            else None.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None
