"""The Backend interface a model author subclasses, its result type and the sinks.

A backend is synchronous Python: the server calls it from a worker thread (never on the
event loop), so it may block, run numpy, or call GIL-releasing kernels. Streaming methods
push tokens into a sink; the sink's return value (and its ``cancelled`` flag) tells the
backend when to stop: the client went away, ``max_tokens`` was reached, or a stop string /
stop token ended the text.
"""
from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from tep.protocol import ChatRequest, Sampling

__all__ = ["Backend", "Completion", "TokenLogprob", "StreamSink", "ChatStreamSink"]

# The cancel flag of the request being served; the server sets it around backend calls
# so that a default method (e.g. generate_from_tokens built on the streaming one) can
# hand it to the sink it creates.
current_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "tep_current_cancel", default=None)


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
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None


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
        self._stops = list(sampling.stop)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._stop_ids = frozenset(sampling.stop_token_ids)
        self._want_lp = sampling.logprobs is not None
        self._max_tokens = sampling.max_tokens
        self.text = ""               # accepted text (before any stop string)
        self._released = 0           # chars of self.text already passed to on_delta
        self._scan_from = 0          # where the next stop-string search may start
        self.token_ids: list[int] = []
        self.n_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if self._want_lp else None
        self._pending_lp: list[TokenLogprob] = []
        self._final_reason: str | None = None    # stop string / stop token / emit_finish
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
                          logprobs=self.logprobs)

    # ---- internals
    def _record_logprob(self, piece: str, token_id: int | None, logprob: float | None,
                        top: Sequence[tuple[int | str, float]] | None,
                        token_bytes: bytes | None) -> None:
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
        start = max(0, self._scan_from - self._max_stop + 1)
        best = -1
        for s in self._stops:
            i = self.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best = i
        self._scan_from = len(self.text)
        if best == -1:
            return False
        self.text = self.text[:best]
        self._final_reason = "stop"
        return True

    def _holdback(self) -> int:
        """Length of the longest suffix of the text that starts some stop string."""
        if not self._stops:
            return 0
        t = self.text
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(t)), best, -1):
                if t.endswith(s[:k]):
                    best = k
                    break
        return best

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


def _overrides(obj: object, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Backend, name)


class Backend:
    """Subclass this to serve a model. Every method has a safe default, so a bare
    ``Backend()`` serves: no models, 501 for chat and embeddings.

    Write either ``generate_stream_from_tokens`` or ``generate_from_tokens`` (the other is
    derived), and likewise ``chat_completion_stream`` or ``chat_completion``. Methods are
    called from worker threads, possibly concurrently for different requests.
    """

    def list_models(self) -> list[str]:
        """Model IDs this backend serves (``GET /v1/models``). Default: none."""
        return []

    def device_kind(self) -> str:
        """What the model runs on ("cpu", "cuda", ...), for logs and events."""
        return "cpu"

    # ---- completions
    def generate_from_tokens(self, model: str, token_ids: list[int],
                             sampling: "Sampling") -> Completion:
        """Generate one choice for a token-ID prompt. Default: run
        :meth:`generate_stream_from_tokens` into a collecting sink."""
        if not _overrides(self, "generate_stream_from_tokens"):
            return Completion(finish_reason="stop")
        sink = StreamSink(sampling, cancel=current_cancel.get(),
                          token_text=self._token_text_fn(model), prompt_tokens=len(token_ids))
        self.generate_stream_from_tokens(model, token_ids, sampling, sink)
        return sink.result()

    def generate_stream_from_tokens(self, model: str, token_ids: list[int],
                                    sampling: "Sampling", sink: StreamSink) -> None:
        """Stream one choice: call ``sink.emit_token(piece, token_id=...)`` per token and
        return when it says False or generation ends. Default: send the result of
        :meth:`generate_from_tokens` as one piece (or nothing if neither is written)."""
        if _overrides(self, "generate_from_tokens"):
            sink.emit_completion(self.generate_from_tokens(model, token_ids, sampling))

    # ---- chat
    def supports_chat(self) -> bool:
        """Whether ``/v1/chat/completions`` is served (501 otherwise)."""
        return False

    def chat_completion(self, req: "ChatRequest") -> Completion:
        """Answer a chat request (``req.messages``, ``req.sampling``); the chat template is
        the backend's. Default: run :meth:`chat_completion_stream` into a collecting sink."""
        if not _overrides(self, "chat_completion_stream"):
            return Completion(finish_reason="stop", prompt_tokens=0)
        sink = ChatStreamSink(req.sampling, cancel=current_cancel.get(),
                              token_text=self._token_text_fn(req.model))
        self.chat_completion_stream(req, sink)
        return sink.result()

    def chat_completion_stream(self, req: "ChatRequest", sink: ChatStreamSink) -> None:
        """Stream a chat answer into ``sink``. Default: send :meth:`chat_completion`'s
        result as one piece (or nothing if neither is written)."""
        if _overrides(self, "chat_completion"):
            sink.emit_completion(self.chat_completion(req))

    # ---- embeddings
    def supports_embeddings(self) -> bool:
        """Whether ``/v1/embeddings`` is served (501 otherwise)."""
        return False

    def generate_embeddings(self, model: str, token_ids: list[int]) -> Any:
        """One pooled vector (float32 [D]) for one token-ID input. Default: empty."""
        import numpy as np

        return np.zeros(0, dtype=np.float32)

    def generate_embeddings_batch(self, model: str, token_ids: list[list[int]]) -> Any:
        """One pooled vector per input: a sequence of B float32 [D] vectors (or an array
        [B, D]). The server calls this once per request, so a backend can run the inputs
        as one ragged batch. Default: :meth:`generate_embeddings` per input."""
        return [self.generate_embeddings(model, x) for x in token_ids]

    def embedding_dimensions(self, model: str) -> int | None:
        """The length D of this model's embeddings, or None if unknown (then a
        ``dimensions`` request is checked against each returned vector)."""
        return None

    # ---- text hooks (optional)
    def tokenize(self, model: str, text: str) -> list[int]:
        """Text -> token IDs. Without it, text prompts are a 400 ("this server takes
        token IDs")."""
        raise NotImplementedError

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        """Token IDs -> text (for ``echo`` and logprob alternatives given as IDs)."""
        raise NotImplementedError

    def supports_tokenize(self) -> bool:
        """True when :meth:`tokenize` is implemented."""
        return _overrides(self, "tokenize")

    def supports_detokenize(self) -> bool:
        """True when :meth:`detokenize` is implemented."""
        return _overrides(self, "detokenize")

    def _token_text_fn(self, model: str) -> Callable[[int], str] | None:
        if not self.supports_detokenize():
            return None
        return lambda tid: self.detokenize(model, [tid])
