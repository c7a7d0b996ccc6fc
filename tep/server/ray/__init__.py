"""Serve a tep backend on Ray Serve (optional extra: ``pip install "tep-serve[ray]"``).

    # myapp.py
    import tep.server.ray
    app = tep.server.ray.app("llamacpp", num_replicas=2, prefix_routing=True)

    $ serve run myapp:app                                      # or serve.run(app)
    $ serve run tep.server.ray:build_app backend=llamacpp num_replicas=2 prefix_routing=true

Two shapes:

- ``prefix_routing=True``: an **ingress** deployment runs tep's HTTP app (parsing, auth,
  admission, SSE) and calls **model replicas** (``<name>-model``, each with its own
  backend and engine) through a DeploymentHandle whose request router is
  :class:`tep.server.ray.router.PrefixRouter`: a request goes to the replica holding the
  longest cached prefix of its prompt (token IDs, or the chat messages), or to the
  least-loaded one when loads are imbalanced. Streams pass through token by token. The
  ingress's ``/metrics`` adds per-replica prefix-cache hit rates and routing counts, and
  its ``tep_prefix_cache_*`` totals sum the replicas.
- ``prefix_routing=False`` (default): N replicas of the whole app behind Ray's proxy,
  which spreads requests by queue length (power of two choices); per-replica metrics.

Every response carries ``x-tep-replica``: the replica that generated it (the ingress's own
name for answers that needed no model, e.g. ``/health`` or a 400). Each replica builds its
own backend from a ``"module:Class"`` spec, a short name (``toy``, ``llamacpp``) or a
factory, with ``backend_options`` (``model=PATH`` etc.), so weights are never pickled from
the driver. An events path should contain ``{pid}`` so each process writes its own file.
"""
from __future__ import annotations

from typing import Any, Callable

from tep.server.ray.ingress import (HEADER, RemoteBackend, ReplicaCollector, ReplicaHeader,
                                    router_snapshot)
from tep.server.ray.replica import ModelReplica, build_backend, replica_name

__all__ = ["deployment", "app", "build_app", "ingress_app", "HEADER"]

# The model-handle of the ingress being constructed in this process (set by its
# __init__, read by its ASGI builder right after, in the same call).
_BUILDING: list = []


def _asgi_builder(backend: Any, options: dict[str, Any], config: dict[str, Any]
                  ) -> Callable[[], Any]:
    """A zero-argument function building the whole app; it runs in the replica."""

    def build_tep_app() -> Any:
        from tep.server.app import create_app

        app = create_app(build_backend(backend, options), **config)
        app.asgi_app = ReplicaHeader(app.asgi_app, replica_name)
        return app

    return build_tep_app


def ingress_app(handle: Any, *, model_deployment: str, prefix_routing: bool = True,
                **config: Any) -> Any:
    """tep's Quart app over the model replicas behind ``handle`` (see the module)."""
    from tep.server.app import create_app

    backend = RemoteBackend(handle, prefix_routing=prefix_routing,
                            deployment=model_deployment)
    backend._replica_stats = lambda: (router_snapshot(model_deployment) or {}).get(
        "replica_stats", {})
    app = create_app(backend, **config)
    app.before_serving_funcs.insert(0, backend.connect)  # metadata before anything else
    state = app.extensions["tep"]
    if state.metrics.enabled:
        state.metrics.registry.register(
            ReplicaCollector(lambda: router_snapshot(model_deployment)))
    app.asgi_app = ReplicaHeader(app.asgi_app, replica_name)
    return app


def _max_ongoing(config: dict[str, Any]) -> int:
    from tep.serving.config import ServerConfig

    d = ServerConfig.from_env(**config)
    return d.max_concurrency + max(d.max_queue, 1)


def deployment(backend: str | Callable[[], Any] | None = None, *, name: str = "tep",
               num_replicas: int | str = 1, ray_actor_options: dict[str, Any] | None = None,
               max_ongoing_requests: int | None = None,
               backend_options: dict[str, Any] | None = None, **config: Any) -> Any:
    """A Ray Serve deployment of the whole tep app per replica (``prefix_routing=False``;
    call ``.bind()`` on it, or use :func:`app`).

    Args:
        backend: ``"module:Class"``, a short name, a Backend class or a zero-argument
            factory (built in each replica); None = ``$TEP_BACKEND`` / the toy backend.
        name: the deployment name.
        num_replicas: replicas (or ``"auto"`` for Ray's autoscaling).
        ray_actor_options: e.g. ``{"num_cpus": 4}`` or ``{"num_gpus": 1}``.
        max_ongoing_requests: requests Ray sends to one replica at once; default
            ``max_concurrency + max_queue``, so tep's own queue and 429 stay in charge.
        backend_options: keyword arguments for the backend (``model`` goes first).
        **config: :class:`tep.serving.config.ServerConfig` fields for every replica.
    """
    from ray import serve

    if max_ongoing_requests is None:
        max_ongoing_requests = _max_ongoing(config)

    @serve.deployment(name=name, num_replicas=num_replicas,
                      ray_actor_options=ray_actor_options or {},
                      max_ongoing_requests=max_ongoing_requests)
    @serve.ingress(_asgi_builder(backend, dict(backend_options or {}), dict(config)))
    class TepReplica:
        """One replica: its own backend and tep app (built by the ingress builder)."""

    return TepReplica


def app(backend: str | Callable[[], Any] | None = None, *, prefix_routing: bool = False,
        router: str | None = None, name: str = "tep", num_replicas: int | str = 1,
        ray_actor_options: dict[str, Any] | None = None,
        max_ongoing_requests: int | None = None,
        backend_options: dict[str, Any] | None = None,
        ingress_replicas: int = 1, ingress_actor_options: dict[str, Any] | None = None,
        imbalance: int = 8, routing_stats_period_s: float = 2.0,
        autoscaling_config: dict[str, Any] | None = None, **config: Any) -> Any:
    """A bound Ray Serve application (``serve.run(tep.server.ray.app(...))``).

    Args:
        backend, num_replicas, ray_actor_options, backend_options: as for
            :func:`deployment` (with ``prefix_routing`` they apply to the model replicas).
        prefix_routing: an ingress + model replicas with the prefix-aware router (see the
            module); False: the whole app per replica.
        router: with the ingress shape, ``"prefix"`` (the default when
            ``prefix_routing``) or ``"default"`` (Ray's power-of-two-choices router, for
            comparisons: same shape, routing blind to prompts).
        name: the ingress (or whole-app) deployment name; model replicas are
            ``<name>-model``.
        max_ongoing_requests: per model replica; default its engine's sequence slots
            (``max_num_seqs``) plus as many queued.
        ingress_replicas, ingress_actor_options: the ingress deployment's size (default
            1 replica, ``{"num_cpus": 0}``).
        imbalance: requests of load difference past which the router ignores prefixes.
        routing_stats_period_s: how often Ray polls each replica's prefix-cache counters.
        autoscaling_config: Ray's autoscaling settings for the model replicas (with
            ``num_replicas="auto"`` Ray's defaults apply).
        **config: :class:`tep.serving.config.ServerConfig` fields (the ingress's; the
            engine fields ``max_num_seqs``/``max_batch_tokens`` also size the replicas).
    """
    if router is not None and router not in ("prefix", "default"):
        raise ValueError(f"router must be 'prefix' or 'default', got {router!r}")
    if router is None and not prefix_routing:
        return deployment(backend, name=name, num_replicas=num_replicas,
                          ray_actor_options=ray_actor_options,
                          max_ongoing_requests=max_ongoing_requests,
                          backend_options=backend_options, **config).bind()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tep.serving.config import ServerConfig

    router = router or "prefix"
    model_name = f"{name}-model"
    cfg = ServerConfig.from_env(**config)
    if max_ongoing_requests is None:
        max_ongoing_requests = 2 * max(1, cfg.max_num_seqs)
    if router == "prefix":
        from tep.server.ray.router import PrefixRouter

        rcfg = RequestRouterConfig(request_router_class=PrefixRouter,
                                   request_router_kwargs={"imbalance": imbalance},
                                   request_routing_stats_period_s=routing_stats_period_s)
    else:
        from tep.server.ray.router import ObservedPow2Router

        rcfg = RequestRouterConfig(request_router_class=ObservedPow2Router,
                                   request_routing_stats_period_s=routing_stats_period_s)
    model_kw: dict[str, Any] = dict(name=model_name, ray_actor_options=ray_actor_options or {},
                                    max_ongoing_requests=max_ongoing_requests,
                                    request_router_config=rcfg)
    model_kw["num_replicas"] = num_replicas
    if autoscaling_config is not None:
        model_kw["autoscaling_config"] = autoscaling_config
    model_dep = serve.deployment(ModelReplica, **model_kw)
    opts = dict(backend_options or {})
    for k in ("max_num_seqs", "max_batch_tokens"):
        if k in config and k not in opts and isinstance(backend, str) and \
                backend in ("toy", "llamacpp"):
            opts[k] = config[k]
    ingress_config = dict(config)
    if "max_concurrency" not in ingress_config:
        # the ingress only relays: admit what the replicas can batch, Ray queues the rest
        ingress_config["max_concurrency"] = 256
    use_prefix = router == "prefix"

    def build() -> Any:
        return ingress_app(_BUILDING.pop(), model_deployment=model_name,
                           prefix_routing=use_prefix, **ingress_config)

    @serve.deployment(name=name, num_replicas=ingress_replicas,
                      ray_actor_options=ingress_actor_options or {"num_cpus": 0},
                      max_ongoing_requests=4096)
    @serve.ingress(build)
    class TepIngress:
        """The HTTP ingress: tep's app over the model replicas."""

        def __init__(self, model: Any) -> None:
            _BUILDING.append(model)   # the builder, called right after, takes it

    return TepIngress.bind(model_dep.bind(backend, opts))


_INT_ARGS = {"num_replicas", "max_concurrency", "max_queue", "max_body_bytes",
             "chat_max_tokens", "retry_after", "max_ongoing_requests", "max_num_seqs",
             "max_batch_tokens", "max_tokens_limit", "ingress_replicas", "imbalance"}
_FLOAT_ARGS = {"generation_timeout", "routing_stats_period_s"}
_BOOL_ARGS = {"metrics", "prefix_routing", "fast_path"}


def _value(v: str) -> Any:
    """A backend option from the command line: int, float, bool or text."""
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def build_app(args: dict[str, str]) -> Any:
    """Application builder for the ``serve`` CLI:
    ``serve run tep.server.ray:build_app backend=llamacpp num_replicas=2 prefix_routing=true
    model=/path/to.gguf``. ServerConfig fields and :func:`app`'s arguments are taken as
    such (``api_keys`` a comma list); every other ``key=value`` is a backend option."""
    from dataclasses import fields

    from tep.serving.config import ServerConfig

    known = {f.name for f in fields(ServerConfig)} | {
        "num_replicas", "max_ongoing_requests", "prefix_routing", "router", "name",
        "ingress_replicas", "imbalance", "routing_stats_period_s"}
    kw: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for k, v in args.items():
        if k == "backend":
            kw[k] = v
        elif k not in known:
            options[k] = _value(v)
        elif k in _INT_ARGS and not (k == "num_replicas" and v == "auto"):
            kw[k] = int(v)
        elif k in _FLOAT_ARGS:
            kw[k] = float(v)
        elif k == "api_keys":
            kw[k] = tuple(x.strip() for x in v.split(",") if x.strip())
        elif k in _BOOL_ARGS:
            kw[k] = v.strip().lower() not in ("0", "false", "no", "off")
        else:
            kw[k] = v
    if options:
        kw["backend_options"] = options
    return app(kw.pop("backend", None), **kw)
