"""``ModelReplica``: one model replica behind the ingress (a Ray Serve deployment's class).

Each replica builds its own backend (from a ``"module:Class"`` spec or a factory, so the
weights are never pickled from the driver) and serves it to the ingress over a
DeploymentHandle: :meth:`ModelReplica.stream` runs one generation (the engine's
non-blocking ``submit``/``submit_chat`` when the backend has them, else the blocking
methods in a thread) and streams its sink calls as lists of
:mod:`tep.server.ray.relay` tuples; the metadata and text calls answer directly.

:meth:`ModelReplica.record_routing_stats` is Ray's hook for routing stats (polled every
``request_routing_stats_period_s``): the engine's prefix-cache counters, so the ingress
can show each replica's hit rate and sum them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, AsyncIterator, Callable

from tep.server.ray.relay import ENGINE_COUNTERS, ErrorInfo, Outbox, RelaySink

__all__ = ["ModelReplica", "replica_name", "build_backend"]

log = logging.getLogger("tep.server.ray")


_NAME: list[str] = []


def replica_name() -> str:
    """This process's replica ID (Ray Serve's unique replica id), or ``pid-N`` outside
    a replica."""
    if _NAME:
        return _NAME[0]
    try:
        from ray import serve

        name = serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"
    _NAME.append(name)
    return name


def build_backend(backend: Any, options: dict[str, Any] | None = None) -> Any:
    """A backend from a spec (``"module:Class"`` or short name), a class/factory, or an
    instance; ``options`` are passed to the class or factory (``model`` first,
    positionally: the GGUF path of llamacpp, the model name of the toy)."""
    from tep.backend import Backend
    from tep.serving.config import load_backend, resolve_backend_spec

    opts = dict(options or {})
    if isinstance(backend, Backend):
        return backend
    if not opts and (backend is None or isinstance(backend, str)):
        return load_backend(backend)
    obj = resolve_backend_spec(backend) if backend is None or isinstance(backend, str) \
        else backend
    args = (opts.pop("model"),) if "model" in opts else ()
    b = obj(*args, **opts)
    if not isinstance(b, Backend):
        from tep.serving.config import _engine_backend, _is_engine_model

        if _is_engine_model(b):
            b = _engine_backend(b)
        else:
            raise TypeError(f"{backend!r} did not give a tep.Backend")
    return b


class ModelReplica:
    """The body of the model deployment (see the module). ``backend`` and ``options`` as
    for :func:`build_backend`."""

    def __init__(self, backend: Any, options: dict[str, Any] | None = None) -> None:
        self.backend = build_backend(backend, options)
        self.name = replica_name()
        self.requests = 0
        self._pool = None

    # ---- metadata (one call at ingress start)
    def info(self) -> dict:
        b = self.backend
        models = list(b.list_models())
        engine = getattr(b, "engine", None)
        return {
            "replica": self.name,
            "models": models,
            "context_size": {m: b.context_size(m) for m in models},
            # every replica loads the same model with the same settings, so one
            # replica's fingerprint is the deployment's
            "fingerprint": {m: b.fingerprint(m) for m in models},
            "embedding_dimensions": {m: b.embedding_dimensions(m) for m in models},
            "supports_chat": b.supports_chat(),
            "supports_embeddings": b.supports_embeddings(),
            "supports_constraints": b.supports_constraints(),
            "supports_tokenize": b.supports_tokenize(),
            "supports_detokenize": b.supports_detokenize(),
            "supports_prompt_logprobs": b.supports_prompt_logprobs(),
            "supports_chat_template": b.supports_chat_template(),
            "device_kind": b.device_kind(),
            "max_num_seqs": int(engine.sched.max_num_seqs) if engine is not None else None,
        }

    def whoami(self) -> tuple[str, str]:
        """This replica's name and Ray node ID."""
        import ray

        return self.name, ray.get_runtime_context().get_node_id()

    # ---- text hooks (blocking on the replica is fine: Ray runs sync methods in a thread)
    def tokenize(self, model: str, text: str) -> list[int]:
        return [int(t) for t in self.backend.tokenize(model, text)]

    def detokenize(self, model: str, ids: list[int]) -> str:
        return self.backend.detokenize(model, ids)

    def prompt_logprobs(self, model: str, ids: list[int], top_n: int) -> list:
        return list(self.backend.prompt_logprobs(model, ids, top_n))

    def token_bytes(self, model: str, ids: list[int]) -> list[bytes]:
        return [bytes(b) for b in self.backend.token_bytes(model, ids)]

    def apply_chat_template(self, req: Any) -> str:
        return self.backend.apply_chat_template(req)

    async def embed(self, model: str, ids: list[list[int]]) -> Any:
        b = self.backend
        if getattr(b, "submit_embeddings", None) is not None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def done(vecs: Any, exc: BaseException | None) -> None:
                loop.call_soon_threadsafe(
                    lambda: fut.done() or (fut.set_exception(exc) if exc is not None
                                           else fut.set_result(vecs)))

            b.submit_embeddings(model, ids, done)
            vecs = await fut
        else:
            vecs = await asyncio.to_thread(b.generate_embeddings_batch, model, ids)
        return [v for v in vecs]

    # ---- generation
    async def stream(self, call: dict, route: Any = None) -> AsyncIterator[list]:
        """One generation: ``call`` = ``{"kind": "complete", "model", "ids", "sampling",
        "constraint"}`` or ``{"kind": "chat", "req"}``. Yields lists of relay tuples; the
        first list starts with ``("r", replica name)``, the last ends with
        ``("d", ErrorInfo | None)``. Closing the stream (client gone) cancels the
        sequence."""
        self.requests += 1
        loop = asyncio.get_running_loop()
        box = Outbox(loop)
        cancel = threading.Event()
        b = self.backend
        req = call.get("req")
        sampling = req.sampling if req is not None else call["sampling"]
        token_text = b._token_text_fn(req.model if req is not None else call["model"])
        sink = RelaySink(sampling, box.put, cancel=cancel, token_text=token_text)

        def on_done(exc: BaseException | None) -> None:
            box.put(("d", None if exc is None else _error(exc)))

        try:
            _start(b, call, sink, on_done)
        except BaseException as e:  # refused before anything was queued (a 400)
            on_done(e)
        first = True
        try:
            while True:
                items = await box.take()
                end = items[-1][0] == "d"
                if end:
                    items.insert(len(items) - 1, sink.meta())
                if first:
                    items.insert(0, ("r", self.name))
                    first = False
                yield items
                if end:
                    return
        finally:
            cancel.set()   # the ingress closed the stream (or it ended): stop the engine
            wake = getattr(getattr(b, "engine", None), "wake", None)
            if wake is not None:
                wake()

    # ---- Ray's routing-stats hook
    def record_routing_stats(self) -> dict:
        """The replica's prefix-cache counters (``EngineBackend.stats``) and request count."""
        st = getattr(self.backend, "stats", None)
        out: dict = {"replica": self.name, "requests": self.requests}
        if st is not None and hasattr(st, "prefix_hit_tokens"):
            out.update({k: int(getattr(st, k, 0)) for k in ENGINE_COUNTERS})
            hit, miss = out["prefix_hit_tokens"], out["prefix_miss_tokens"]
            out["prefix_hit_rate"] = hit / (hit + miss) if hit + miss else 0.0
        return out

    def __del__(self) -> None:
        close = getattr(getattr(self, "backend", None), "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                pass


def _error(exc: BaseException) -> ErrorInfo:
    from tep import errors as E

    if not isinstance(exc, E.APIError):
        log.error("model replica: generation failed", exc_info=(type(exc), exc,
                                                                 exc.__traceback__))
    return ErrorInfo.of(exc)


def _start(b: Any, call: dict, sink: RelaySink, on_done: Callable) -> None:
    """Queue the generation on the engine, or run a blocking backend in a thread."""
    if call["kind"] == "chat":
        req = call["req"]
        if getattr(b, "submit_chat", None) is not None:
            b.submit_chat(req, sink, on_done)
            return
        fn, args = b.chat_completion_stream, (req, sink)
    else:
        if getattr(b, "submit", None) is not None:
            b.submit(call["model"], call["ids"], call["sampling"], sink, on_done,
                     constraint=call.get("constraint"))
            return
        sink.prompt_tokens = len(call["ids"])
        fn, args = b.generate_stream_from_tokens, (call["model"], call["ids"],
                                                   call["sampling"], sink)

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:
            on_done(e)
            return
        on_done(None)

    threading.Thread(target=run, name="tep-replica-call", daemon=True).start()
