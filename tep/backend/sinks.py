"""Sinks: where a streaming backend sends its tokens.

A sink applies ``max_tokens``, stop strings (held back while they may still be starting)
and stop token IDs itself, records logprobs, and tells the backend when to stop: its
``emit_token`` returns False and ``cancelled`` turns True once the client is gone or the
text is over.
"""
from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tep.backend.results import Completion, TokenLogprob
from tep.backend.stops import StopMatcher

if TYPE_CHECKING:  # pragma: no cover
    from tep.backend.sampling import Sampling

__all__ = ["StreamSink", "ChatStreamSink", "current_cancel"]

# The cancel flag of the request being served; the server sets it around backend calls
# so that a default method (e.g. generate_from_tokens built on the streaming one) can
# hand it to the sink it creates.
current_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "tep_current_cancel", default=None)


def _no_logprobs() -> Exception:
    from tep.errors import BadRequestError

    return BadRequestError("logprobs were requested, but this backend does not report "
                           "them for its tokens", param="logprobs",
                           code="logprobs_not_supported")


class StreamSink:
    """Where a backend sends generated tokens.

    ``emit_token`` returns False once generation must stop (client gone, ``max_tokens``
    reached, stop string or stop token seen); the backend should then return promptly.
    ``cancelled`` is True from that moment too. The sink applies ``sampling.stop``,
    ``sampling.stop_token_ids`` and ``sampling.max_tokens`` itself, holding back text that
    could be the start of a stop string, so a backend never has to.

    The server creates sinks; a backend only calls them. Not thread-safe: one sink is
    driven by one backend call.
    """

    def __init__(self, sampling: "Sampling", *, cancel: threading.Event | None = None,
                 on_delta: Callable[[str, list[TokenLogprob]], None] | None = None,
                 token_text: Callable[[int], str] | None = None,
                 prompt_tokens: int | None = None) -> None:
        self.sampling = sampling
        self._cancel = cancel if cancel is not None else threading.Event()
        self._on_delta = on_delta
        self._token_text = token_text
        self.prompt_tokens = prompt_tokens
        # prompt tokens the backend found in its prefix cache (set by tep.engine), or None
        self.cached_tokens: int | None = None
        self._stops = StopMatcher(sampling.stop)
        self._stop_ids = frozenset(sampling.stop_token_ids)
        self._want_lp = sampling.logprobs is not None
        self._max_tokens = sampling.max_tokens
        self.text = ""               # accepted text (before any stop string)
        self._released = 0           # chars of self.text already passed to on_delta
        self.token_ids: list[int] = []
        self.n_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if self._want_lp else None
        self._pending_lp: list[TokenLogprob] = []
        self._final_reason: str | None = None    # stop string / stop token / emit_finish
        self.stop_sequence: str | None = None    # the stop string that ended the text
        self._limit_hit = False
        self._closed = False

    # ---- what a backend calls
    @property
    def cancelled(self) -> bool:
        """True once generation should stop (client gone, limit, stop condition)."""
        return self._cancel.is_set() or self._final_reason is not None or self._limit_hit

    def emit_token(self, piece: str, token_id: int | None = None, *,
                   logprob: float | None = None,
                   top_logprobs: Sequence[tuple[int | str, float]] | None = None,
                   token_bytes: bytes | None = None) -> bool:
        """Send one generated token.

        Args:
            piece: the text this token adds (may be "" for a partial UTF-8 byte).
            token_id: its ID (used for ``stop_token_ids``, usage and logprobs).
            logprob: log-probability of this token under the model (when logprobs were
                requested; see ``sampling.logprobs``).
            top_logprobs: the most likely alternatives as (token_id or text, logprob)
                pairs, most likely first; truncated to ``sampling.logprobs``.
            token_bytes: the token's raw bytes, when ``piece`` does not spell them.

        Returns:
            True to continue, False when the backend must stop.
        """
        if self._closed or self._final_reason is not None or self._limit_hit or \
                self._cancel.is_set():
            return False
        self.n_tokens += 1
        if token_id is not None:
            if token_id in self._stop_ids:
                self._final_reason = "stop"
                return False
            self.token_ids.append(token_id)
        if self._want_lp:
            self._record_logprob(piece, token_id, logprob, top_logprobs, token_bytes)
        self.text += piece
        if self._stops:
            if self._check_stop():
                self._flush(len(self.text))
                return False
            self._flush(len(self.text) - self._holdback())
        elif piece or self._pending_lp:
            # no stop strings: nothing is held back, the delta is this piece (the
            # per-token path of every fast backend, so no slicing here)
            self._released = len(self.text)
            lps, self._pending_lp = self._pending_lp, []
            if self._on_delta is not None:
                self._on_delta(piece, lps)
        if self.n_tokens >= self._max_tokens:
            self._limit_hit = True
            return False
        return not self._cancel.is_set()

    def goes_on_after(self, token_id: int) -> bool:
        """Whether emitting ``token_id`` next surely leaves the stream open as far as the
        sink can tell in advance (not cancelled or closed, no stop id, ``max_tokens`` not
        reached by it). A stop string is only found when the text arrives: an engine
        that acts on this answer early must still drop what follows a False
        ``emit_token``."""
        return (not self.cancelled and not self._closed and token_id not in self._stop_ids
                and self.n_tokens + 1 < self._max_tokens)

    def lower_max_tokens(self, n: int) -> None:
        """Lower this sink's ``max_tokens`` to ``n`` (never raises it): for a backend that
        learns the prompt's length only after the sink exists (a chat template) and cuts a
        default answer length to what the context has left."""
        self._max_tokens = min(self._max_tokens, int(n))

    def emit_finish(self, reason: str = "stop") -> None:
        """Say why generation ended ("stop" or "length"). Optional: when a backend does
        not call it, the reason is "length" if ``max_tokens`` was reached, else "stop"."""
        if reason not in ("stop", "length"):
            raise ValueError(f"finish reason must be 'stop' or 'length', got {reason!r}")
        if self._final_reason is None:
            self._final_reason = reason

    def emit_completion(self, completion: Completion) -> None:
        """Send a whole :class:`Completion` at once (used to stream a non-streaming backend)."""
        lps = completion.logprobs if self._want_lp else None
        if self._want_lp and (completion.token_ids or completion.text) and (
                not lps or any(e.logprob is None for e in lps)):
            raise _no_logprobs()
        if lps and len(lps) == len(completion.token_ids) and \
                "".join(e.token for e in lps) == completion.text:
            for e, tid in zip(lps, completion.token_ids):
                if not self.emit_token(e.token, tid, logprob=e.logprob, top_logprobs=e.top,
                                       token_bytes=e.bytes):
                    break
        else:
            n = completion.completion_tokens
            if n is None:
                n = len(completion.token_ids)
            if self._stop_ids and (hit := [i for i, t in enumerate(completion.token_ids)
                                           if t in self._stop_ids]):
                n = hit[0] + 1
                self._final_reason = "stop"
            self.token_ids.extend(completion.token_ids[:n])
            if lps:
                self.logprobs.extend(lps)  # type: ignore[union-attr]
                self._pending_lp.extend(lps)
            self.text += completion.text
            self.n_tokens += n
            if self._stops and self._check_stop():
                self._flush(len(self.text))
                return
            self._flush(len(self.text))
        if completion.prompt_tokens is not None:
            self.prompt_tokens = completion.prompt_tokens
        self.emit_finish(completion.finish_reason)

    # ---- what the server calls
    def close(self) -> str:
        """End the stream: release held-back text and return the finish reason."""
        if not self._closed:
            self._closed = True
            self._flush(len(self.text))
        if self._final_reason is not None:
            return self._final_reason
        return "length" if self._limit_hit else "stop"

    def result(self) -> Completion:
        """The accumulated :class:`Completion` (calls :meth:`close`)."""
        reason = self.close()
        return Completion(text=self.text, token_ids=list(self.token_ids), finish_reason=reason,
                          prompt_tokens=self.prompt_tokens, completion_tokens=self.n_tokens,
                          logprobs=self.logprobs, stop_sequence=self.stop_sequence)

    # ---- internals
    def _record_logprob(self, piece: str, token_id: int | None, logprob: float | None,
                        top: Sequence[tuple[int | str, float]] | None,
                        token_bytes: bytes | None) -> None:
        if logprob is None:
            raise _no_logprobs()
        k = self.sampling.logprobs or 0
        alts = None
        if top is not None:
            alts = [(t if isinstance(t, str) else self._text_of(int(t)), float(lp))
                    for t, lp in list(top)[:k]]
        entry = TokenLogprob(token=piece if token_bytes is None else self._text_of_bytes(
            piece, token_id, token_bytes), logprob=None if logprob is None else float(logprob),
            token_id=token_id, bytes=token_bytes, top=alts if alts is not None else [],
            text_offset=len(self.text))
        self.logprobs.append(entry)  # type: ignore[union-attr]
        self._pending_lp.append(entry)

    def _text_of(self, token_id: int) -> str:
        if self._token_text is not None:
            try:
                return self._token_text(token_id)
            except Exception:  # a detokenize failure must not kill the stream
                pass
        return f"token_id:{token_id}"

    def _text_of_bytes(self, piece: str, token_id: int | None, b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            # OpenAI/tiktoken spell partial UTF-8 tokens as "bytes:\xNN"
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def _check_stop(self) -> bool:
        """Truncate at the earliest complete stop string, if any."""
        cut = self._stops.find(self.text)
        if cut == -1:
            return False
        # which one (Anthropic's answers name it): the first listed that starts there
        self.stop_sequence = next(s for s in self._stops.stops if self.text.startswith(s, cut))
        self.text = self.text[:cut]
        self._final_reason = "stop"
        return True

    def _holdback(self) -> int:
        """Length of the text's end that may still become a stop string."""
        return self._stops.holdback(self.text) if self._stops else 0

    def _flush(self, upto: int) -> None:
        upto = max(upto, self._released)
        delta = self.text[self._released:upto]
        self._released = upto
        if (delta or self._pending_lp) and self._on_delta is not None:
            lps, self._pending_lp = self._pending_lp, []
            self._on_delta(delta, lps)
        else:
            self._pending_lp = []


class ChatStreamSink(StreamSink):
    """A :class:`StreamSink` for chat: adds :meth:`emit_role_prelude`.

    The server sends the ``{"role": "assistant"}`` delta before the first content by
    itself; a backend calls ``emit_role_prelude`` only to send it early (e.g. before a
    slow first token) or to name another role.
    """

    def __init__(self, sampling: "Sampling", *, on_role: Callable[[str], None] | None = None,
                 **kw: Any) -> None:
        super().__init__(sampling, **kw)
        self._on_role = on_role
        self.role = "assistant"
        self.role_sent = False

    def emit_role_prelude(self, role: str = "assistant") -> bool:
        """Send the first delta ``{"role": role, "content": ""}`` now (once)."""
        if not self.role_sent:
            self.role = role
            self.role_sent = True
            if self._on_role is not None:
                self._on_role(role)
        return not self.cancelled
