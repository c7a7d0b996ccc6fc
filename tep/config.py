"""Server settings (from keyword arguments or ``TEP_*`` environment variables) and
loading a backend from a ``module:Class`` string."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ServerConfig", "load_backend", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "tep.backends.toy:ToyEngineBackend"


def _bool(v: str) -> bool:
    if v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {v!r}")


def _keys(v: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in v.split(",") if k.strip())


@dataclass
class ServerConfig:
    """Settings of one app.

    Attributes:
        max_concurrency: threads in the backend pool = requests whose backend work runs at
            once (a request with ``n`` choices uses up to ``n`` of the threads).
        max_queue: requests that may wait for a free slot when all ``max_concurrency`` are
            busy; past that a request gets 429 with ``Retry-After``. 0 = no waiting.
        max_body_bytes: largest accepted request body (413 above). Token-ID prompts are
            ~6 bytes per token in JSON, so the default fits millions of tokens.
        chat_max_tokens: ``max_tokens`` of a chat request that does not set one.
        api_key: one accepted key (kept for compatibility; see ``api_keys``).
        api_keys: accepted keys (``TEP_API_KEYS`` is a comma list). When any key is set,
            every ``/v1`` request needs ``Authorization: Bearer <key>`` (401 otherwise).
        generation_timeout: seconds a completion/chat request may generate before it is
            ended with ``finish_reason: "length"`` (0 = no limit).
        retry_after: seconds sent in ``Retry-After`` with a 429.
        events_jsonl: path of the JSONL run-events file (None = no events, no file I/O).
            ``{worker}`` and ``{pid}`` in the path are replaced per process.
        metrics: serve ``GET /metrics`` and record Prometheus metrics.
        fast_path: answer ``POST`` on the inference routes in an ASGI layer in front of
            Quart (:mod:`tep.fastpath`; same answers, less overhead). Quart's own
            ``before_request``/``after_request`` hooks and extensions do not see those
            requests; False routes them through Quart.
    """

    max_concurrency: int = 8
    max_queue: int = 256
    max_body_bytes: int = 32 * 1024 * 1024
    chat_max_tokens: int = 256
    api_key: str | None = None
    api_keys: tuple[str, ...] = ()
    generation_timeout: float = 0.0
    retry_after: int = 1
    events_jsonl: str | None = None
    metrics: bool = True
    fast_path: bool = True

    # how each field is read from its TEP_<NAME> variable
    _PARSE = {"api_key": str, "api_keys": _keys, "events_jsonl": str,
              "generation_timeout": float, "metrics": _bool,
              "fast_path": _bool}

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        """Defaults, then ``TEP_<FIELD>`` variables, then ``overrides`` (None = unset)."""
        cfg = cls()
        for f in fields(cls):
            env = os.environ.get("TEP_" + f.name.upper())
            if env not in (None, ""):
                try:
                    setattr(cfg, f.name, cls._PARSE.get(f.name, int)(env))
                except ValueError as e:
                    raise ValueError(f"TEP_{f.name.upper()}: {e}") from None
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown tep setting(s): {', '.join(sorted(unknown))}")
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, tuple(v) if k == "api_keys" else v)
        if cfg.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if cfg.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if cfg.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if cfg.chat_max_tokens < 1:
            raise ValueError("chat_max_tokens must be >= 1")
        if cfg.generation_timeout < 0:
            raise ValueError("generation_timeout must be >= 0 (0 = no limit)")
        if cfg.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        return cfg

    def all_api_keys(self) -> tuple[str, ...]:
        """Every accepted key (``api_key`` and ``api_keys``), empty = no auth."""
        keys = tuple(self.api_keys) + ((self.api_key,) if self.api_key else ())
        return tuple(dict.fromkeys(k for k in keys if k))

    def public(self) -> dict[str, Any]:
        """The settings as a JSON-able dict with the keys left out (for run_start)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("api_key", "api_keys")}
        out["api_keys"] = len(self.all_api_keys())
        return out


def load_backend(spec: str | None = None) -> Any:
    """Instantiate a backend from ``"module:Class"`` (or ``"module:factory"``).

    ``None`` reads ``TEP_BACKEND`` and falls back to the toy backend. The attribute is
    called with no arguments. When it is (or gives) a :class:`tep.engine.Model` rather
    than a :class:`tep.Backend`, it is served by :class:`tep.engine.EngineBackend` with
    ``$TEP_MAX_NUM_SEQS`` / ``$TEP_MAX_BATCH_TOKENS`` (default 256 / 2048).
    """
    spec = spec or os.environ.get("TEP_BACKEND") or DEFAULT_BACKEND
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"backend must be 'module:Class', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    from tep.backend import Backend

    backend = obj() if callable(obj) and not isinstance(obj, Backend) and \
        not _is_engine_model(obj) else obj
    if not isinstance(backend, Backend) and _is_engine_model(backend):
        backend = _engine_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"{spec} did not give a tep.Backend (got {type(backend).__name__})")
    return backend


def _is_engine_model(obj: Any) -> bool:
    """A tep.engine.Model instance (not a class): it has a batched forward."""
    return not isinstance(obj, type) and all(
        hasattr(obj, n) for n in ("forward", "release", "vocab_size", "list_models"))


def _engine_backend(model: Any) -> Any:
    from tep.engine import EngineBackend

    def env(name: str, default: int) -> int:
        v = os.environ.get(name)
        return int(v) if v not in (None, "") else default

    seqs = env("TEP_MAX_NUM_SEQS", 256)
    return EngineBackend(model, max_num_seqs=seqs,
                         max_batch_tokens=max(env("TEP_MAX_BATCH_TOKENS", 2048), seqs))
