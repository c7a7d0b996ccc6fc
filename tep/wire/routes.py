"""Every HTTP route tep serves: the one list the server, the metrics labels, the
request telemetry and the OpenAPI document read."""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["RouteSpec", "ROUTES", "INFERENCE_PATHS", "KNOWN_PATHS", "MODEL_PATH_PREFIX",
           "RESPONSE_PATH_PREFIX", "endpoint_label", "quart_path"]


class RouteSpec(NamedTuple):
    """One route: ``inference`` routes are POSTs that reach the backend (admission,
    events, the ASGI fast path); the others (metadata, stored responses) do not."""

    method: str
    path: str
    inference: bool


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("POST", "/v1/completions", True),
    RouteSpec("POST", "/v1/chat/completions", True),
    RouteSpec("POST", "/v1/embeddings", True),
    RouteSpec("POST", "/v1/responses", True),
    RouteSpec("GET", "/v1/responses/{response_id}", False),
    RouteSpec("DELETE", "/v1/responses/{response_id}", False),
    RouteSpec("GET", "/v1/responses/{response_id}/input_items", False),
    RouteSpec("GET", "/v1/models", False),
    RouteSpec("GET", "/v1/models/{model_id}", False),
    RouteSpec("GET", "/health", False),
    RouteSpec("GET", "/metrics", False),
    RouteSpec("GET", "/openapi.json", False),
)
INFERENCE_PATHS = frozenset(r.path for r in ROUTES if r.inference)
KNOWN_PATHS = frozenset(r.path for r in ROUTES if "{" not in r.path)
MODEL_PATH_PREFIX = "/v1/models/"
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
