"""Per-request bookkeeping: one :class:`RequestRecord` per HTTP request, closed by an
ASGI middleware when the response has been sent (or the client has left).

Closing at the ASGI layer, rather than in a Quart handler, is what makes the numbers
complete: a streamed response ends long after its handler returned, a client that
disconnects cancels the handler mid-way, and a response generator that never started
runs no ``finally``. The middleware's ``finally`` sees all of these, and it calls the
app's ``finish(record)`` exactly once per request, which records metrics, writes the
``eval`` event and gives back the request's admission slot if nothing else did.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Awaitable, Callable

from tep.obs.metrics import Metrics
from tep.wire.routes import INFERENCE_PATHS, endpoint_label

__all__ = ["RequestRecord", "TelemetryMiddleware", "SCOPE_KEY"]


# What an event records of client-supplied collections: a request may carry megabytes
# of stop strings or token IDs, and the events file must not grow by as much.
EVENT_STR_MAX = 256       # characters of one string
EVENT_ITEMS_MAX = 64      # items of one list or dict


def _capped(v: Any) -> Any:
    if isinstance(v, str):
        return v if len(v) <= EVENT_STR_MAX else v[:EVENT_STR_MAX] + "..."
    if isinstance(v, list):
        out = [_capped(x) for x in v[:EVENT_ITEMS_MAX]]
        return out + [f"... {len(v) - EVENT_ITEMS_MAX} more"] if len(v) > EVENT_ITEMS_MAX \
            else out
    if isinstance(v, dict):
        items = list(v.items())
        out = {str(k): _capped(x) for k, x in items[:EVENT_ITEMS_MAX]}
        if len(items) > EVENT_ITEMS_MAX:
            out["..."] = f"{len(items) - EVENT_ITEMS_MAX} more"
        return out
    return v


def sampling_dict(s: Any) -> dict[str, Any] | None:
    """A request's Sampling as a JSON-ready dict (only built when an event is written);
    long strings and collections are cut (``EVENT_STR_MAX``, ``EVENT_ITEMS_MAX``)."""
    if s is None:
        return None
    return {k: _capped(v) for k, v in dataclasses.asdict(s).items()}

SCOPE_KEY = "tep.request"


class RequestRecord:
    """What is known about one request; filled in by the handlers as they go.

    Times are ``time.perf_counter()`` seconds.
    """

    def __init__(self, endpoint: str, metrics: Metrics | None = None) -> None:
        self.endpoint = endpoint
        self.start = time.perf_counter()
        self.metrics = metrics
        self.request_id: str | None = None
        self.principal_id: str | None = None
        self.model: str | None = None
        self.sampling: Any = None          # the request's tep.Sampling (a dict in events)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.status: int | None = None     # from http.response.start
        self.completed = False             # the last body chunk was sent
        self.outcome: str | None = None    # set by handlers: error, timeout, rejected, dropped
        self.timed_out = False
        self.cancel: Any = None            # the request's cancel flag while it holds a slot
        self.ttft: float | None = None
        self._last: dict[int, float] = {}
        self._gaps: list[float] = []       # inter-token gaps, recorded when the request ends
        self.finished = False

    @property
    def inference(self) -> bool:
        """True for completions, chat and embeddings (the requests with ``eval`` events)."""
        return self.endpoint in INFERENCE_PATHS

    def token(self, choice: int) -> None:
        """A streamed delta of ``choice`` was produced now (TTFT / inter-token latency)."""
        now = time.perf_counter()
        last = self._last.get(choice)
        self._last[choice] = now
        m = self.metrics
        if self.ttft is None:
            self.ttft = now - self.start
            if m is not None:
                m.observe_ttft(self.endpoint, self.ttft)
        elif last is not None and m is not None:
            self._gaps.append(now - last)

    def flush_metrics(self) -> None:
        """Record the inter-token gaps gathered so far (the request is ending)."""
        gaps, self._gaps = self._gaps, []
        if gaps and self.metrics is not None:
            self.metrics.observe_itl_many(self.endpoint, gaps)

    def final_status_and_outcome(self) -> tuple[int, str]:
        """The HTTP status (499 if no response started) and the outcome word."""
        status = self.status if self.status is not None else 499
        if self.outcome in ("dropped", "rejected"):
            return status, self.outcome
        if not self.completed:
            return status, "cancelled"
        if self.outcome is not None:
            return status, self.outcome
        if status == 429:
            return status, "rejected"
        return status, ("error" if status >= 400 else "ok")

    def eval_extra(self, status: int, outcome: str, seconds: float,
                   with_sampling: bool = True) -> dict[str, Any]:
        """The ``extra`` of this request's ``eval`` event (with_sampling=False skips
        building the sampling dict when no event will be written)."""
        return {"endpoint": self.endpoint, "model": self.model,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "latency_us": int(seconds * 1e6),
                "ttft_us": None if self.ttft is None else int(self.ttft * 1e6),
                "sampling": sampling_dict(self.sampling) if with_sampling else None,
                "request_id": self.request_id,
                "principal_id": self.principal_id, "status": status, "outcome": outcome}


class TelemetryMiddleware:
    """ASGI middleware around the Quart app: creates the record, tracks status and
    completion through ``send``, counts in-flight requests and calls ``finish``.

    Args:
        app: the wrapped ASGI callable (``quart_app.asgi_app``).
        metrics: the app's metrics.
        finish: called once per HTTP request with its record, from the event loop.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics,
                 finish: Callable[[RequestRecord], None]) -> None:
        self.app = app
        self.metrics = metrics
        self.finish = finish

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = RequestRecord(endpoint_label(scope.get("path", "")), self.metrics)
        scope[SCOPE_KEY] = rec
        counted = rec.endpoint != "/metrics" and self.metrics.enabled
        if counted:
            self.metrics.in_flight.inc()

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                rec.status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                rec.completed = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            if counted:
                self.metrics.in_flight.dec()
            rec.flush_metrics()
            if not rec.finished:
                rec.finished = True
                self.finish(rec)
