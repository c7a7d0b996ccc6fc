"""A generation's sink calls, carried from a model replica to the ingress.

On the replica a :class:`RelaySink` stands in for the ingress's sink: it applies the same
rules (``max_tokens``, stops: so the engine stops where the ingress's sink will) and
records every call as a small tuple (:data:`Relayed`). The replica streams lists of them;
the ingress replays them onto its real sink with :func:`replay`, so the HTTP layer sees
exactly the calls a local backend would have made. Errors travel as
:class:`ErrorInfo` (API errors keep their status, type, param and code).

Tuples (first item the kind):
  ``("t", piece, token_id, logprob, top, token_bytes)``  a token (``top``: (text, logprob))
  ``("o", role)``                                        the chat role prelude
  ``("f", reason)``                                      ``emit_finish``
  ``("m", prompt_tokens, max_tokens, cached_tokens)``   what the replica learnt (first
                                                          and last item of a generation)
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tep import errors as E
from tep.backend import ChatStreamSink, StreamSink

__all__ = ["RelaySink", "Outbox", "ErrorInfo", "replay", "meta_of", "ENGINE_COUNTERS"]

# The engine counters (EngineStats fields) a replica reports in its routing stats and the
# ingress sums over replicas for its /metrics.
ENGINE_COUNTERS = ("prefix_hit_tokens", "prefix_miss_tokens", "tokens_sampled", "steps",
                   "tokens_fed", "overlapped")


@dataclass(frozen=True)
class ErrorInfo:
    """An exception raised on a replica, as the ingress re-raises it."""

    cls: str
    message: str
    param: str | None = None
    code: str | None = None
    status: int | None = None
    type: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> "ErrorInfo":
        if isinstance(exc, E.APIError):
            return cls(type(exc).__name__, exc.message, exc.param, exc.code, exc.status,
                       exc.type)
        return cls("InternalServerError", f"the model replica failed: {type(exc).__name__}")

    def exception(self) -> E.APIError:
        k = getattr(E, self.cls, None)
        if not (isinstance(k, type) and issubclass(k, E.APIError)):
            k = E.InternalServerError
        return k(self.message, param=self.param, code=self.code, status=self.status,
                 type=self.type)


class Outbox:
    """Items from an engine thread to the replica's event loop, moved in batches: one
    loop wake-up per batch, not per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._scheduled = False

    def put(self, item: Any) -> None:
        """(any thread) Queue one item."""
        with self._lock:
            self._items.append(item)
            wake = not self._scheduled
            self._scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is gone: nobody reads any more
                pass

    async def take(self) -> list:
        """(on the loop) Every item queued so far; waits for at least one."""
        await self._ready.wait()
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        self._ready.clear()
        return items


class RelaySink(ChatStreamSink):
    """A sink on the replica that records its calls into ``out`` (see the module)."""

    def __init__(self, sampling: Any, out: Callable[[tuple], None], **kw: Any) -> None:
        super().__init__(sampling, **kw)
        self._out = out
        self.meta_sent = False

    def meta(self) -> tuple:
        return ("m", self.prompt_tokens, self._max_tokens, self.cached_tokens)

    def emit_token(self, piece: str, token_id: int | None = None, *,
                   logprob: float | None = None,
                   top_logprobs: Sequence[tuple[int | str, float]] | None = None,
                   token_bytes: bytes | None = None) -> bool:
        if not self.meta_sent:
            self.meta_sent = True
            self._out(self.meta())
        top = None
        if top_logprobs is not None:   # IDs spelled here: the ingress has no tokenizer
            k = self.sampling.logprobs or 0
            top = [(t if isinstance(t, str) else self._text_of(int(t)), float(lp))
                   for t, lp in list(top_logprobs)[:k]]
        self._out(("t", piece, token_id, logprob, top, token_bytes))
        return super().emit_token(piece, token_id, logprob=logprob, top_logprobs=top,
                                  token_bytes=token_bytes)

    def emit_finish(self, reason: str = "stop") -> None:
        super().emit_finish(reason)
        self._out(("f", reason))

    def emit_role_prelude(self, role: str = "assistant") -> bool:
        sent = self.role_sent
        ok = super().emit_role_prelude(role)
        if not sent:
            self._out(("o", role))
        return ok


def meta_of(items: list) -> tuple | None:
    """The last ``("m", ...)`` item of a batch, or None."""
    for it in reversed(items):
        if it[0] == "m":
            return it
    return None


def replay(items: list, sink: StreamSink) -> bool:
    """Make ``sink`` the calls recorded in ``items``; False once it says stop."""
    go = True
    for it in items:
        kind = it[0]
        if kind == "t":
            if go:
                go = sink.emit_token(it[1], it[2], logprob=it[3], top_logprobs=it[4],
                                     token_bytes=it[5])
        elif kind == "m":
            if it[1] is not None:
                sink.prompt_tokens = it[1]
            if it[2] is not None:
                sink._max_tokens = it[2]   # the engine may cut a chat's default length
            if it[3] is not None:
                sink.cached_tokens = it[3]
        elif kind == "f":
            sink.emit_finish(it[1])
        elif kind == "o" and isinstance(sink, ChatStreamSink):
            sink.emit_role_prelude(it[1])
    return go
