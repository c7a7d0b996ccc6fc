"""Every HTTP route tep serves: the one list the server, the metrics labels, the
request telemetry and the OpenAPI document read."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["RouteSpec", "ROUTES", "INFERENCE_PATHS", "KNOWN_PATHS", "MODEL_PATH_PREFIX",
           "ANTHROPIC_PATHS", "RESPONSE_PATH_PREFIX", "endpoint_label", "needs_key",
           "error_style", "quart_path"]


class RouteSpec(NamedTuple):
    """One route: ``inference`` routes are POSTs that reach the backend (admission,
    events, the ASGI fast path); the others (metadata, stored responses) do not.
    ``errors`` names the error envelope the route answers in: ``"openai"`` or
    ``"anthropic"``."""

    method: str
    path: str
    inference: bool
    errors: str = "openai"


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", "/v1/completions", True),
    RouteSpec("POST", "/v1/chat/completions", True),
    RouteSpec("POST", "/v1/embeddings", True),
    RouteSpec("POST", "/v1/messages", True, "anthropic"),
    RouteSpec("POST", "/v1/messages/count_tokens", True, "anthropic"),
    RouteSpec("POST", "/tokenize", True),
    RouteSpec("POST", "/detokenize", True),
    RouteSpec("POST", "/apply-template", True),
    RouteSpec("POST", "/v1/responses", True),
    RouteSpec("GET", "/v1/responses/{response_id}", False),
    RouteSpec("DELETE", "/v1/responses/{response_id}", False),
    RouteSpec("GET", "/v1/responses/{response_id}/input_items", False),
    RouteSpec("GET", "/v1/models", False),
    RouteSpec("GET", "/v1/models/{model_id}", False),
    RouteSpec("GET", "/health", False),
    RouteSpec("GET", "/metrics", False),
    RouteSpec("GET", "/openapi.json", False),
    RouteSpec("GET", "/", False),            # the chat page (ServerConfig.ui)
)
INFERENCE_PATHS = frozenset(r.path for r in ROUTES if r.inference)
KNOWN_PATHS = frozenset(r.path for r in ROUTES if "{" not in r.path)
MODEL_PATH_PREFIX = "/v1/models/"
ANTHROPIC_PATHS = frozenset(r.path for r in ROUTES if r.errors == "anthropic")
# Routes outside /v1 that still compute with the model, so they need a key when keys are on.
_KEYED_TEXT_PATHS = frozenset(("/tokenize", "/detokenize", "/apply-template"))


def needs_key(path: str) -> bool:
    """Whether a request to ``path`` needs an API key (when keys are configured): every
    ``/v1`` route and the text routes (``/tokenize``, ``/detokenize``,
    ``/apply-template``)."""
    return path.startswith("/v1") or path in _KEYED_TEXT_PATHS


def error_style(path: str) -> str:
    """The error envelope a request path answers in: ``"anthropic"`` for the Messages
    routes, else ``"openai"``."""
    return "anthropic" if path in ANTHROPIC_PATHS else "openai"
RESPONSE_PATH_PREFIX = "/v1/responses/"


def endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a request path (metrics, events): the route's path
    template, or ``other`` so unknown paths cannot grow the label set."""
    if path in KNOWN_PATHS:
        return path
    if path.startswith(MODEL_PATH_PREFIX):
        return "/v1/models/{model_id}"
    if path.startswith(RESPONSE_PATH_PREFIX):
        return "/v1/responses/{response_id}/input_items" if path.endswith("/input_items") \
            else "/v1/responses/{response_id}"
    return "other"


def quart_path(template: str) -> str:
    """A route template in Quart's spelling: ``/v1/responses/{response_id}`` ->
    ``/v1/responses/<response_id>``."""
    return template.replace("{", "<").replace("}", ">")
