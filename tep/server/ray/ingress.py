"""The ingress side: tep's app over a model deployment reached through a DeploymentHandle.

:class:`RemoteBackend` is a :class:`tep.Backend` whose work happens on the model replicas
(:class:`tep.server.ray.replica.ModelReplica`): the ingress runs the whole HTTP layer
(parsing, auth, admission, SSE) and each generation becomes one streaming handle call,
routed by the deployment's request router with the prompt's route key
(:mod:`tep.server.ray.prefix_table`). The replica's sink calls are replayed onto the
ingress's sink (:mod:`tep.server.ray.relay`), so streams are the same bytes a local
backend gives. A replica that dies mid-generation ends that choice with a 503 error
(an error event in a stream).

:class:`ReplicaHeader` adds ``x-tep-replica`` to every response: the replicas that
generated it, or this process's own replica name when nothing was sent on.
:class:`ReplicaCollector` adds per-replica routing and prefix-cache metrics to the
ingress's ``/metrics``.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any, Callable

from tep import errors as E
from tep.backend import Backend
from tep.engine.engine import EngineStats
from tep.server.ray.prefix_table import RouteKey, chat_key_bytes, prompt_key_bytes
from tep.server.ray.relay import ENGINE_COUNTERS, ErrorInfo, replay

__all__ = ["RemoteBackend", "ReplicaHeader", "ReplicaCollector", "SERVED", "HEADER",
           "router_snapshot"]

log = logging.getLogger("tep.server.ray")

HEADER = b"x-tep-replica"

# Per HTTP request: the replica names that generated for it (filled by RemoteBackend).
SERVED: contextvars.ContextVar[list | None] = contextvars.ContextVar("tep_served",
                                                                     default=None)

_CANCEL_POLL_S = 0.1


class RemoteBackend(Backend):
    """A backend served by the replicas behind ``handle`` (see the module).

    Args:
        handle: a DeploymentHandle of the model deployment.
        prefix_routing: send route keys (the router then prefers cached prefixes).
        deployment: the model deployment's name (finds its router in this process).
    """

    def __init__(self, handle: Any, *, prefix_routing: bool = True,
                 deployment: str | None = None) -> None:
        self.handle = handle
        self._stream = handle.options(stream=True).stream
        self.prefix_routing = prefix_routing
        self.deployment = deployment
        self.info: dict = {}
        self._tasks: set = set()
        self._replica_stats: Callable[[], dict] = dict

    async def connect(self) -> None:
        """Fetch the model's metadata from one replica (before the app serves)."""
        self.info = await self.handle.info.remote()

    # ---- metadata (from the snapshot)
    def list_models(self) -> list[str]:
        return list(self.info.get("models", ()))

    def context_size(self, model: str) -> int | None:
        return self.info.get("context_size", {}).get(model)

    def device_kind(self) -> str:
        return str(self.info.get("device_kind", "cpu"))

    def fingerprint(self, model: str) -> str | None:
        return self.info.get("fingerprint", {}).get(model)

    def supports_chat(self) -> bool:
        return bool(self.info.get("supports_chat"))

    def supports_embeddings(self) -> bool:
        return bool(self.info.get("supports_embeddings"))

    def supports_constraints(self) -> bool:
        return bool(self.info.get("supports_constraints"))

    def supports_tokenize(self) -> bool:
        return bool(self.info.get("supports_tokenize"))

    def supports_detokenize(self) -> bool:
        return bool(self.info.get("supports_detokenize"))

    def supports_prompt_logprobs(self) -> bool:
        return bool(self.info.get("supports_prompt_logprobs"))

    def supports_chat_template(self) -> bool:
        return bool(self.info.get("supports_chat_template"))

    def embedding_dimensions(self, model: str) -> int | None:
        return self.info.get("embedding_dimensions", {}).get(model)

    def _token_text_fn(self, model: str) -> None:
        return None   # alternatives arrive spelled by the replica

    @property
    def stats(self) -> EngineStats:
        """The replicas' engine counters, summed (from Ray's routing stats)."""
        out = EngineStats()
        for st in self._replica_stats().values():
            for name in ENGINE_COUNTERS:
                setattr(out, name, getattr(out, name) + int(st.get(name, 0)))
        return out

    # ---- text (worker-pool threads: blocking on the handle is allowed there)
    def tokenize(self, model: str, text: str) -> list[int]:
        return self.handle.tokenize.remote(model, text).result()

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        return self.handle.detokenize.remote(model, list(token_ids)).result()

    def prompt_logprobs(self, model: str, token_ids: list[int], top_n: int) -> list:
        return self.handle.prompt_logprobs.remote(model, list(token_ids), top_n).result()

    def token_bytes(self, model: str, token_ids: list[int]) -> list[bytes]:
        return self.handle.token_bytes.remote(model, list(token_ids)).result()

    def apply_chat_template(self, req: Any) -> str:
        return self.handle.apply_chat_template.remote(req).result()

    # ---- non-blocking entries (called on the event loop)
    def submit(self, model: str, token_ids: Any, sampling: Any, sink: Any, on_done: Any, *,
               constraint: Any = None) -> None:
        ids = [int(t) for t in token_ids]
        key = prompt_key_bytes(model, ids) if self.prefix_routing else None
        call = {"kind": "complete", "model": model, "ids": ids, "sampling": sampling,
                "constraint": constraint}
        self._spawn(call, key, sink, on_done)

    def submit_chat(self, req: Any, sink: Any, on_done: Any) -> None:
        key = chat_key_bytes(req.model, req.messages) if self.prefix_routing else None
        self._spawn({"kind": "chat", "req": req}, key, sink, on_done)

    def submit_embeddings(self, model: str, token_ids: list[list[int]],
                          on_done: Callable[[Any, BaseException | None], None]) -> None:
        async def run() -> None:
            try:
                vecs = await self.handle.embed.remote(model, token_ids)
            except BaseException as e:
                on_done(None, _lost(e, None))
                return
            on_done(vecs, None)

        self._keep(asyncio.ensure_future(run()))

    # ---- one generation
    def _spawn(self, call: dict, key: bytes | None, sink: Any, on_done: Any) -> None:
        from tep.server.ray.route_state import RouteTicket

        ticket = RouteTicket(RouteKey.of(key) if key is not None else None)
        served = SERVED.get()
        self._keep(asyncio.ensure_future(self._run(call, ticket, sink, on_done, served)))

    def _keep(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: dict, ticket: Any, sink: Any, on_done: Any,
                   served: list | None) -> None:
        gen = self._stream.remote(call, route=ticket)
        cancel: threading.Event = sink._cancel
        watch = asyncio.ensure_future(_watch(cancel, gen))
        name: str | None = None
        exc: BaseException | None = None
        ended = False
        try:
            async for items in gen:
                if items and items[0][0] == "r":
                    name = items[0][1]
                    if served is not None:
                        served.append(name)
                    items = items[1:]
                if items and items[-1][0] == "d":
                    info: ErrorInfo | None = items[-1][1]
                    exc = info.exception() if info is not None else None
                    ended = True
                    items = items[:-1]
                replay(items, sink)
                if cancel.is_set() and not ended:
                    gen.cancel()   # the client went away: end the replica's sequence
                    ended = True
                    break
                # a stop or max_tokens: the replica's sink stopped at the same token;
                # wait for its end, so the next turn finds this one released to the cache
            if not ended and not cancel.is_set():
                exc = _lost(None, name)
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except BaseException as e:
            if not cancel.is_set():
                exc = _lost(e, name)
        finally:
            watch.cancel()
            _finished(self.deployment, ticket, sink)
        on_done(exc)


async def _watch(cancel: threading.Event, gen: Any) -> None:
    """Cancel the handle call once the request's cancel flag is set (client gone,
    timeout) even while no token arrives."""
    while not cancel.is_set():
        await asyncio.sleep(_CANCEL_POLL_S)
    gen.cancel()


def _lost(e: BaseException | None, name: str | None) -> E.APIError:
    """The error a request gets when its replica went away (or never answered)."""
    if isinstance(e, E.APIError):
        return e
    who = f"model replica {name}" if name else "the model replica"
    log.warning("%s failed mid-request: %r", who, e)
    return E.ServiceUnavailableError(f"The {who} serving this request stopped; retry the "
                                     "request")


def router_snapshot(deployment: str | None) -> dict | None:
    """The snapshot of this process's prefix router for ``deployment`` (None before the
    first routed call, or without prefix routing)."""
    from tep.server.ray.route_state import routers

    for r in routers():
        if deployment is None or r.deployment_name == deployment:
            return r.snapshot()
    return None


def _finished(deployment: str | None, ticket: Any, sink: Any) -> None:
    from tep.server.ray.route_state import routers

    for r in routers():
        if deployment is None or r.deployment_name == deployment:
            r.finished(ticket, getattr(sink, "cached_tokens", None), sink.prompt_tokens)


class ReplicaHeader:
    """ASGI middleware: ``x-tep-replica`` on every HTTP response (see the module)."""

    def __init__(self, app: Any, own_name: Callable[[], str]) -> None:
        self.app = app
        self._own = own_name

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        served: list = []
        token = SERVED.set(served)

        async def send_with_header(msg: dict) -> None:
            if msg.get("type") == "http.response.start":
                names = ",".join(dict.fromkeys(served)) or self._own()
                msg = dict(msg)
                msg["headers"] = [*msg.get("headers", ()), (HEADER, names.encode())]
            await send(msg)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            SERVED.reset(token)


class ReplicaCollector:
    """Prometheus collector for the ingress: per replica (label ``replica``) the routing
    decisions (``tep_router_routed_total{how=by_prefix|no_match|fallback|no_key}``), the
    replica's prefix-cache tokens and hit rate (from Ray's routing stats), plus the
    router's own totals and routing time."""

    def __init__(self, snapshot: Callable[[], dict | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        if not snap:
            return
        routed = CounterMetricFamily("tep_router_routed", "Calls routed, by replica and "
                                     "how the replica was chosen", labels=["replica", "how"])
        for rid, per in sorted(snap["per_replica"].items()):
            for how, n in sorted(per.items()):
                routed.add_metric([rid, how], n)
        yield routed
        yield CounterMetricFamily("tep_router_stale", "Answers that found less cached "
                                  "than the router predicted (evictions)",
                                  value=snap["stale"])
        yield CounterMetricFamily("tep_router_forgotten_blocks", "Prefix blocks the "
                                  "router forgot (LRU bound, evictions, dead replicas)",
                                  value=snap["forgotten"])
        yield CounterMetricFamily("tep_router_route_seconds", "Seconds spent choosing "
                                  "replicas", value=snap["route_s"])
        blocks = GaugeMetricFamily("tep_router_table_blocks", "Prefix blocks the router "
                                   "remembers per replica", labels=["replica"])
        for rid, n in sorted(snap["table_blocks"].items()):
            blocks.add_metric([rid], n)
        yield blocks
        hit = CounterMetricFamily("tep_replica_prefix_cache_hit_tokens", "Prompt tokens "
                                  "found in the replica's prefix cache", labels=["replica"])
        miss = CounterMetricFamily("tep_replica_prefix_cache_miss_tokens", "Prompt tokens "
                                   "the replica evaluated", labels=["replica"])
        rate = GaugeMetricFamily("tep_replica_prefix_cache_hit_rate", "Share of prompt "
                                 "tokens found in the replica's prefix cache",
                                 labels=["replica"])
        for rid, st in sorted(snap["replica_stats"].items()):
            if "prefix_hit_tokens" in st:
                hit.add_metric([rid], st["prefix_hit_tokens"])
                miss.add_metric([rid], st["prefix_miss_tokens"])
                rate.add_metric([rid], st.get("prefix_hit_rate", 0.0))
        yield hit
        yield miss
        yield rate
