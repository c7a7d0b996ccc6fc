"""Serve a tep backend on Ray Serve (optional extra: ``pip install "tep-serve[ray]"``).

    # mymodel.py
    import tep.server.ray
    app = tep.server.ray.app("mymodel:MyModel", num_replicas=2)     # a Ray Serve Application

    $ serve run mymodel:app                                   # or serve.run(app) in Python
    $ serve run tep.server.ray:build_app backend=mymodel:MyModel num_replicas=2

The same Quart app as ``tep serve`` is mounted with ``serve.ingress`` through a *builder*
function: Ray calls it inside each replica, so every replica imports and constructs its
own backend (weights are never pickled from the driver) and runs the app's startup and
shutdown (thread pool, ``run_start``/``run_end`` events). The Serve proxy spreads
requests over the replicas; streams (SSE) pass through it.

Per replica: metrics at ``/metrics`` are that replica's (a scrape through the proxy
reaches one replica at a time; scrape replicas directly or use Ray's own metrics), and
an events path should contain ``{pid}`` so each replica writes its own file.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["deployment", "app", "build_app"]


def _asgi_builder(backend: Any, config: dict[str, Any]) -> Callable[[], Any]:
    """A zero-argument function building the app; it runs in the replica."""

    def build_tep_app() -> Any:
        from tep.server.app import create_app
        from tep.backend import Backend

        b = backend
        if b is not None and not isinstance(b, (str, Backend)) and callable(b):
            b = b()  # a class or factory: constructed here, once per replica
        return create_app(b, **config)

    return build_tep_app


def deployment(backend: str | Callable[[], Any] | None = None, *, name: str = "tep",
               num_replicas: int | str = 1, ray_actor_options: dict[str, Any] | None = None,
               max_ongoing_requests: int | None = None, **config: Any) -> Any:
    """A Ray Serve deployment of tep (call ``.bind()`` on it, or use :func:`app`).

    Args:
        backend: ``"module:Class"``, a Backend class or a zero-argument factory (built in
            each replica); None = ``$TEP_BACKEND`` / the toy backend.
        name: the deployment name.
        num_replicas: replicas (or ``"auto"`` for Ray's autoscaling).
        ray_actor_options: e.g. ``{"num_cpus": 4}`` or ``{"num_gpus": 1}``.
        max_ongoing_requests: requests Ray sends to one replica at once; default
            ``max_concurrency + max_queue``, so tep's own queue and 429 stay in charge.
        **config: :class:`tep.serving.config.ServerConfig` fields for every replica.
    """
    from ray import serve

    from tep.serving.config import ServerConfig

    if max_ongoing_requests is None:
        defaults = ServerConfig.from_env(**config)
        max_ongoing_requests = defaults.max_concurrency + max(defaults.max_queue, 1)

    @serve.deployment(name=name, num_replicas=num_replicas,
                      ray_actor_options=ray_actor_options or {},
                      max_ongoing_requests=max_ongoing_requests)
    @serve.ingress(_asgi_builder(backend, dict(config)))
    class TepReplica:
        """One replica: its own backend and tep app (built by the ingress builder)."""

    return TepReplica


def app(backend: str | Callable[[], Any] | None = None, **kwargs: Any) -> Any:
    """A bound Ray Serve application (``serve.run(tep.server.ray.app(...))``); arguments as
    for :func:`deployment`."""
    return deployment(backend, **kwargs).bind()


_INT_ARGS = {"num_replicas", "max_concurrency", "max_queue", "max_body_bytes",
             "chat_max_tokens", "retry_after", "max_ongoing_requests"}


def build_app(args: dict[str, str]) -> Any:
    """Application builder for the ``serve`` CLI:
    ``serve run tep.server.ray:build_app backend=mod:Class num_replicas=2 max_concurrency=4``.
    ``api_keys`` is a comma list; ``generation_timeout`` a float; others as in
    :func:`deployment`."""
    kw: dict[str, Any] = {}
    for k, v in args.items():
        if k in _INT_ARGS and not (k == "num_replicas" and v == "auto"):
            kw[k] = int(v)
        elif k == "generation_timeout":
            kw[k] = float(v)
        elif k == "api_keys":
            kw[k] = tuple(x.strip() for x in v.split(",") if x.strip())
        elif k == "metrics":
            kw[k] = v.strip().lower() not in ("0", "false", "no", "off")
        else:
            kw[k] = v
    return app(kw.pop("backend", None), **kw)
