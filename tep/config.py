"""Server settings (from keyword arguments or ``TEP_*`` environment variables) and
loading a backend from a ``module:Class`` string."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["ServerConfig", "load_backend", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "tep.backends.toy:ToyBackend"


@dataclass
class ServerConfig:
    """Settings of one app.

    Attributes:
        max_concurrency: threads in the backend pool = backend calls running at once.
        max_body_bytes: largest accepted request body (413 above). Token-ID prompts are
            ~6 bytes per token in JSON, so the default fits millions of tokens.
        chat_max_tokens: ``max_tokens`` of a chat request that does not set one.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <key>``
            (401 otherwise).
    """

    max_concurrency: int = 8
    max_body_bytes: int = 32 * 1024 * 1024
    chat_max_tokens: int = 256
    api_key: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        """Defaults, then ``TEP_<FIELD>`` variables, then ``overrides`` (None = unset)."""
        cfg = cls()
        for f in fields(cls):
            env = os.environ.get("TEP_" + f.name.upper())
            if env not in (None, ""):
                setattr(cfg, f.name, env if f.name == "api_key" else int(env))
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown tep setting(s): {', '.join(sorted(unknown))}")
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if cfg.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if cfg.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if cfg.chat_max_tokens < 1:
            raise ValueError("chat_max_tokens must be >= 1")
        return cfg


def load_backend(spec: str | None = None) -> Any:
    """Instantiate a backend from ``"module:Class"`` (or ``"module:factory"``).

    ``None`` reads ``TEP_BACKEND`` and falls back to the toy backend. The attribute is
    called with no arguments.
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

    backend = obj() if callable(obj) and not isinstance(obj, Backend) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{spec} did not give a tep.Backend (got {type(backend).__name__})")
    return backend
