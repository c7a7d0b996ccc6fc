"""What tep's own server (``tep serve``) adds around hypercorn so that faults outside a
route still look like the OpenAI API and cannot flood the log.

- :func:`envelope_protocol_errors`: hypercorn answers a malformed request (400) or
  oversized headers (431) with an empty body; this gives those answers the OpenAI error
  envelope.
- :class:`QuietLoopErrors`: an event-loop exception handler that logs each kind of
  error once per interval with a count (under file-descriptor exhaustion asyncio reports
  every failed ``accept``).
- :func:`drain_on_signal`: the shutdown trigger that starts tep's graceful drain
  (:meth:`tep.serving.state.ServerState.begin_drain`) when SIGTERM/SIGINT arrives.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from itertools import chain
from typing import Any, Awaitable, Callable

from tep import errors as E
from tep.serving.replies import json_bytes

__all__ = ["envelope_protocol_errors", "QuietLoopErrors", "drain_on_signal"]

log = logging.getLogger("tep.server")

_MESSAGES = {400: "The request is not valid HTTP/1.1",
             431: "The request's headers are too large"}


def envelope_protocol_errors() -> bool:
    """Make hypercorn's HTTP/1.1 protocol-error answers carry the OpenAI envelope.

    Returns False (and changes nothing) when this hypercorn has no such hook."""
    try:
        import h11
        from hypercorn.protocol.h11 import H11Protocol
    except ImportError:  # pragma: no cover
        return False
    original = getattr(H11Protocol, "_send_error_response", None)
    if original is None or getattr(original, "_tep", False):
        return original is not None

    async def send_error_response(self: Any, status_code: int) -> None:
        err = E.APIError(_MESSAGES.get(status_code, "The request could not be read"),
                         status=status_code, type="invalid_request_error", code=None)
        body = json_bytes(err.body())
        await self._send_h11_event(h11.Response(
            status_code=status_code,
            headers=list(chain([(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")],
                               self.config.response_headers("h11")))))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    send_error_response._tep = True  # type: ignore[attr-defined]
    H11Protocol._send_error_response = send_error_response  # type: ignore[method-assign]
    return True


class QuietLoopErrors:
    """A loop exception handler: the first report of a kind of error is logged in full,
    repeats within ``interval_s`` are counted and summarised once the interval ends."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}   # kind -> (window start, repeats)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
        now = time.monotonic()
        start, repeats = self._seen.get(kind, (None, 0))
        if start is not None and now - start < self.interval_s:
            self._seen[kind] = (start, repeats + 1)
            return
        if repeats:
            log.error("%d more of: %s (in the last %.0f s)", repeats,
                      context.get("message", "loop error"), now - (start or now))
        self._seen[kind] = (now, 0)
        loop.default_exception_handler(context)


def drain_on_signal(on_signal: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    """A hypercorn ``shutdown_trigger``: waits for SIGTERM or SIGINT, calls
    ``on_signal()`` (on the loop), then returns so hypercorn stops accepting and waits
    its graceful timeout for the open connections."""

    async def trigger() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        on_signal()

    return trigger
