"""tep: serve your own Python model through the OpenAI HTTP API.

    import tep
    class MyModel(tep.Backend): ...
    app = tep.create_app(MyModel())

``import tep`` stays light: the web stack (Quart) is imported only when ``create_app`` is
first touched, so ``from tep.kernels import sample`` never pulls it in.
``quart --app tep run`` finds the ``create_app`` factory and serves the toy backend (or
``$TEP_BACKEND``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tep.backend import Backend, ChatStreamSink, Completion, Sampling, StreamSink, TokenLogprob
from tep.wire.chat import ChatRequest

__version__ = "0.1.0"

__all__ = [
    "Backend", "Completion", "TokenLogprob", "StreamSink", "ChatStreamSink", "Sampling",
    "ChatRequest", "create_app", "errors", "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from tep import errors
    from tep.server.app import create_app


def __getattr__(name: str) -> Any:
    # Lazy names (PEP 562). Only these two: `app` is deliberately not provided here, so
    # Quart's CLI falls through to the `create_app` factory.
    if name == "create_app":
        from tep.server.app import create_app

        return create_app
    if name == "errors":
        import tep.errors

        return tep.errors
    raise AttributeError(f"module 'tep' has no attribute {name!r}")
