"""The one stream driver: backend events in, server-sent events out.

Completions and chat stream the same way: per-choice backend calls run through a
:class:`~tep.serving.bridge.StreamBridge`, and :func:`stream_reply` turns its typed events
into SSE bytes. What differs — the chunk shape — is a :class:`ChunkRenderer` per
endpoint (:mod:`tep.serving.completions`, :mod:`tep.serving.chat`).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterable

from tep.errors import APIError
from tep.backend.sinks import StreamSink
from tep.obs.telemetry import RequestRecord
from tep.serving.bridge import (DeltaEvent, ErrorEvent, FinishEvent, RoleEvent, StreamBridge,
                                StreamEvent, TimeoutEvent)
from tep.serving.calls import backend_failure, release
from tep.serving.replies import StreamReply
from tep.serving.sse import DONE, sse
from tep.serving.state import ServerState

__all__ = ["ChunkRenderer", "first_event", "stream_reply", "COALESCE_MAX"]

# Most SSE events joined into one body write (see _coalesce). Larger batches save a few
# percent of aggregate throughput but let a fast stream finish in a handful of loop turns
# while later streams still wait for their first token (measured: 64 -> 21-64 of 64
# streams interleaved, 16 -> 64 of 64; one stream's tokens/s the same within noise).
COALESCE_MAX = 16


class ChunkRenderer:
    """How one endpoint spells its stream chunks. Every method returns SSE bytes.

    Attributes:
        n_choices: how many choices the stream carries (indices 0..n-1).
        prompt_tokens: the request's prompt length when known up front (completions);
            None to take it from the backend's finish events (chat).
        include_usage: send a final usage chunk (``stream_options.include_usage``).
    """

    n_choices: int
    prompt_tokens: int | None = None
    include_usage: bool = False

    def bind(self, sinks: dict[int, StreamSink]) -> None:
        """Called once before :meth:`opening` with the choices' sinks (index -> sink, a
        choice's entry present once its backend call made it). Read-only: a renderer may
        read ``prompt_tokens`` and ``stop_sequence`` (the stop string that ended a choice)
        there; the Messages stream names both."""

    def opening(self) -> Iterable[bytes]:
        """Chunks sent before any backend event (completions: the echoed prompts)."""
        return ()

    def role(self, index: int, role: str) -> Iterable[bytes]:
        """A choice announced its role (chat sends it once, before content)."""
        return ()

    def delta(self, index: int, text: str, logprobs: list | None) -> Iterable[bytes]:
        """A choice produced text."""
        raise NotImplementedError

    def finish(self, index: int, reason: str) -> Iterable[bytes]:
        """A choice ended with ``reason``."""
        raise NotImplementedError

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The final usage chunk."""
        raise NotImplementedError

    def done(self, prompt_tokens: int, completion_tokens: int) -> Iterable[bytes]:
        """What ends a stream that finished (OpenAI chat/completions: ``data: [DONE]``;
        other wire formats send their own closing events here)."""
        return (DONE,)

    def error(self, err: APIError) -> Iterable[bytes]:
        """What a failure after the stream started becomes (OpenAI: the error envelope
        as a ``data:`` event, then ``[DONE]``)."""
        return (sse(err.body()), DONE)


async def first_event(state: ServerState, bridge: StreamBridge, deadline: float | None,
                      what: str
                      ) -> tuple[AsyncIterator[StreamEvent], StreamEvent | None]:
    """Wait for the first event before sending headers, so a backend that fails at once
    gets a real HTTP error status instead of a 200 stream with an error event."""
    state.streams.add(bridge)  # ended early at shutdown (ServerState.end_drain)
    # a client that stops reading must not keep its sequence generating into memory
    bridge.watch(state.config.stream_buffer_events, state.config.stream_stall_timeout)
    it = bridge.events(deadline).__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        return it, None
    if type(first) is ErrorEvent:
        raise backend_failure(first.exc, what, bridge.request_id)
    return it, first


def stream_reply(state: ServerState, rec: RequestRecord, bridge: StreamBridge,
                 events: AsyncIterator[StreamEvent], first: StreamEvent | None,
                 render: ChunkRenderer, what: str,
                 steps: Callable[[int, list], None] | None = None) -> StreamReply:
    """The SSE reply of a started stream.

    Args:
        events, first: from :func:`first_event`.
        render: the endpoint's chunk renderer.
        what: names the call in logs ("generation", "chat completion").
        steps: called with (choice, logprob entries) per delta when per-token run
            events are recorded.
    """
    rid = bridge.request_id
    n = render.n_choices

    async def gen() -> AsyncIterator[bytes]:
        completion_tokens = 0
        prompt_tokens = render.prompt_tokens or 0
        finished: set[int] = set()

        def close_choice(k: int, reason: str) -> Iterable[bytes]:
            nonlocal completion_tokens, prompt_tokens
            finished.add(k)
            sink = bridge.sinks.get(k)
            if sink is not None:
                completion_tokens += sink.n_tokens
                if render.prompt_tokens is None:
                    prompt_tokens = max(prompt_tokens, sink.prompt_tokens or 0)
            return render.finish(k, reason)

        try:
            render.bind(bridge.sinks)
            for b in render.opening():
                yield b
            ev, more = first, events.__anext__
            while True:
                if ev is None:   # (no chaining generator: one layer less per token)
                    try:
                        ev = await more()
                    except StopAsyncIteration:
                        break
                t = type(ev)
                if t is DeltaEvent:
                    rec.token(ev.index)
                    if steps is not None:
                        steps(ev.index, ev.logprobs or [])
                    for b in render.delta(ev.index, ev.text, ev.logprobs):
                        yield b
                elif t is FinishEvent:
                    finished.add(ev.index)
                    completion_tokens += ev.completion_tokens
                    if render.prompt_tokens is None:
                        prompt_tokens = max(prompt_tokens, ev.prompt_tokens or 0)
                    for b in render.finish(ev.index, ev.reason):
                        yield b
                elif t is RoleEvent:
                    for b in render.role(ev.index, ev.role):
                        yield b
                elif t is TimeoutEvent:
                    rec.timed_out, rec.outcome = True, "timeout"
                    for k in range(n):
                        if k not in finished:
                            for b in close_choice(k, "length"):
                                yield b
                elif t is ErrorEvent:
                    rec.outcome = "error"
                    for b in render.error(backend_failure(ev.exc, what, rid)):
                        yield b
                    return
                ev = None
            if render.include_usage:
                yield render.usage(prompt_tokens, completion_tokens)
            for b in render.done(prompt_tokens, completion_tokens):
                yield b
        finally:
            state.streams.discard(bridge)
            release(state, bridge.cancel)
            for k, sink in list(bridge.sinks.items()):
                if k not in finished:
                    completion_tokens += sink.n_tokens
                    if render.prompt_tokens is None:
                        prompt_tokens = max(prompt_tokens, sink.prompt_tokens or 0)
            rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens

    return StreamReply(_coalesce(gen(), bridge))


async def _coalesce(gen: AsyncIterator[bytes], bridge: StreamBridge) -> AsyncIterator[bytes]:
    """Join the SSE events that are ready into one body write: a fast backend's tokens
    leave in a few large writes instead of one small write (and one round through the
    server) each, while a slow one still gets every event flushed as soon as it exists."""
    buf: list[bytes] = []
    first = True
    try:
        async for b in gen:
            buf.append(b)
            # the first event goes at once (time to first token); later ones wait only
            # while more are ready, up to a bound so a backend that outruns the socket
            # still streams
            if first or len(buf) >= COALESCE_MAX or not bridge.has_pending():
                yield buf[0] if len(buf) == 1 else b"".join(buf)
                buf = []
                first = False
                if bridge.has_pending():
                    # More is ready, so this stream would not suspend before its next
                    # write (neither the queue nor the socket write waits): give the
                    # other streams and new connections their turn first, or a fast
                    # backend's stream runs to its end while the others wait.
                    await asyncio.sleep(0)
        if buf:
            yield b"".join(buf)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]  # its finally releases the request
