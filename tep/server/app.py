"""The Quart application: the app factory, hooks, metadata routes and error handlers.

    app = tep.create_app(MyBackend())            # or create_app() for $TEP_BACKEND / the toy

The inference routes live in :mod:`tep.serving.routes`. In front of Quart, an ASGI fast path
(:mod:`tep.server.fastpath`) answers ``POST`` on them without Quart's per-request machinery;
``create_app(..., fast_path=False)`` sends them through the Quart routes below instead
(same handlers, same bytes), e.g. when your own Quart hooks must see them
(``TEP_FAST_PATH=0`` does the same).

Around the routes: API keys (:mod:`tep.serving.auth`), admission with a bounded wait queue
(:mod:`tep.serving.admission`), Prometheus metrics at ``/metrics`` (:mod:`tep.obs.metrics`), JSONL run
events (:mod:`tep.obs.events`) and a per-request record closed by an ASGI middleware
(:mod:`tep.obs.telemetry`).
"""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Any

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from tep import errors as E
from tep.backend import Backend
from tep.obs.events import EventLog
from tep.obs.telemetry import SCOPE_KEY, RequestRecord, TelemetryMiddleware
from tep.server.chat_page import PAGE_HEADERS, chat_page
from tep.server.fastpath import FastPath
from tep.server.prelude import BODY_TIMEOUT_S, begin, http_error
from tep.serving.calls import check_model, release
from tep.serving.config import ServerConfig, load_backend
from tep.serving.replies import Reply, StreamReply, error_reply, json_reply, unexpected_reply
from tep.serving.responses import delete_response, get_response, list_input_items
from tep.serving.routes import HANDLERS, Handler
from tep.serving.state import ServerState
from tep.wire.openapi import openapi_document
from tep.wire.routes import ROUTES, endpoint_label, error_style, quart_path

__all__ = ["create_app", "ServerState"]

log = logging.getLogger("tep.server")


def create_app(backend: Backend | str | None = None, **config: Any) -> Quart:
    """Build the Quart app serving ``backend``.

    Args:
        backend: a :class:`tep.Backend` instance, a ``"module:Class"`` string, or None for
            ``$TEP_BACKEND`` (default: the toy model on the engine,
            ``tep.backends.toy:ToyEngineBackend``).
        **config: :class:`tep.serving.config.ServerConfig` fields (``max_concurrency``,
            ``max_queue``, ``max_body_bytes``, ``chat_max_tokens``, ``api_keys``,
            ``generation_timeout``, ``events_jsonl``, ``metrics``, ``fast_path``, ...);
            unset ones come from ``TEP_<NAME>`` environment variables.
    """
    if not isinstance(backend, Backend):
        backend = load_backend(backend)
    cfg = ServerConfig.from_env(**config)
    state = ServerState(backend, cfg)
    state.responses.open()   # a bad store file fails here (StoreError), not per request
    app = Quart("tep")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["tep"] = state
    _register(app, state)
    inner = app.asgi_app
    if cfg.fast_path:
        inner = FastPath(state, HANDLERS, inner)
    app.asgi_app = TelemetryMiddleware(inner, state.metrics,  # type: ignore[method-assign]
                                       lambda rec: _finish(state, rec))
    if state.events.enabled:
        # a process that dies without a clean shutdown still closes its events file;
        # after a clean shutdown run_end was written and this does nothing
        atexit.register(_run_end_at_exit, weakref.ref(state.events))
    return app

def _run_end_at_exit(ref: "weakref.ref[EventLog]") -> None:
    ev = ref()
    if ev is not None:
        ev.run_end("errored")


def _finish(state: ServerState, rec: RequestRecord) -> None:
    """Close a request (called once, by the middleware, after the last byte)."""
    if rec.cancel is not None:
        release(state, rec.cancel)
    seconds = time.perf_counter() - rec.start
    status, outcome = rec.final_status_and_outcome()
    state.metrics.request_done(rec.endpoint, status, outcome, seconds, rec.prompt_tokens,
                               rec.completion_tokens, rec.timed_out)
    if rec.inference:
        state.events.request(rec.eval_extra(status, outcome, seconds,
                                            with_sampling=state.events.enabled))


# --------------------------------------------------------------------------- helpers

def _response(reply: Reply | StreamReply) -> Response:
    """A route's reply as a Quart response."""
    resp = Response(reply.chunks if isinstance(reply, StreamReply) else reply.body,
                    status=reply.status, content_type=reply.content_type)
    for k, v in reply.headers:
        resp.headers[k] = v
    if isinstance(reply, StreamReply):
        resp.timeout = None  # a long generation must not hit RESPONSE_TIMEOUT
    return resp


def _json(obj: Any, status: int = 200) -> Response:
    return _response(json_reply(obj, status))


async def _read_body() -> bytes:
    data = await request.get_data(cache=False)
    g.body_read = True
    return data


def _rec() -> RequestRecord:
    """This request's record (a detached one when the app is called without the
    middleware, e.g. through ``app.handle_request``)."""
    rec = request.scope.get(SCOPE_KEY) if hasattr(request, "scope") else None
    if rec is None:
        rec = g.get("_tep_record")
        if rec is None:
            rec = g._tep_record = RequestRecord(endpoint_label(request.path))
    return rec


def _route(app: Quart, state: ServerState, path: str, route: Handler) -> None:
    """Serve one inference route through Quart (used when the fast path is off)."""

    async def view() -> Response:
        return _response(await route(state, _rec(), _read_body))

    view.__name__ = view.__qualname__ = "route_" + path.strip("/").replace("/", "_")
    app.post(path)(view)


# --------------------------------------------------------------------------- routes

def _register(app: Quart, state: ServerState) -> None:
    backend = state.backend

    @app.before_serving
    async def _startup() -> None:
        state.pool()
        try:
            models: Any = backend.list_models()
        except Exception as e:  # reported per request; the server still starts
            models = f"<list_models failed: {e!r}>"
        log.info("tep serving %s (%s), models: %s, max_concurrency=%d, max_queue=%d",
                 type(backend).__name__, backend.device_kind(), models,
                 state.config.max_concurrency, state.config.max_queue)
        state.events.run_start(backend=backend, models=models, config=state.config.public())

    @app.after_serving
    async def _shutdown() -> None:
        state.shutdown()
        state.events.run_end("ok")
        state.metrics.mark_process_dead()

    @app.before_request
    async def _before() -> None:
        begin(state, _rec(), request.path, request.headers.get("X-Request-Id"),
              request.headers.get("Authorization"), request.headers.get("x-api-key"))

    @app.after_request
    async def _after(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = _rec().request_id or ""
        if request.method in ("POST", "PUT", "PATCH") and not g.get("body_read"):
            # An early answer (401, 404, 501, ...) leaves the body unread; the server can
            # then only close the connection, and a client that already reused it sees
            # "disconnected without a response". Read it so keep-alive stays usable.
            if resp.status_code == 413:
                resp.headers["Connection"] = "close"
            else:
                try:
                    await request.get_data()
                except Exception:  # too large or the client went away: do not reuse
                    resp.headers["Connection"] = "close"
        return resp

    # ---- errors: everything becomes the OpenAI envelope
    @app.errorhandler(E.APIError)
    async def _api_error(err: E.APIError) -> Response:
        return _response(error_reply(err, _rec().request_id, error_style(request.path)))

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        e = http_error(state, err, request.method, request.path)
        resp = _response(error_reply(e, _rec().request_id, error_style(request.path)))
        if e.status == 405 and getattr(err, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(err.valid_methods)
        return resp

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        return _response(unexpected_reply(err, _rec().request_id, error_style(request.path)))

    # ---- the chat page (off: "/" is an unknown path, a 404 in the envelope)
    if state.config.ui:
        @app.get("/")
        async def chat() -> Response:
            resp = Response(chat_page(), status=200, content_type="text/html; charset=utf-8")
            for k, v in PAGE_HEADERS:
                resp.headers[k] = v
            return resp

    # ---- metadata
    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document())

    @app.get("/metrics")
    async def metrics() -> Response:
        if not state.metrics.enabled:
            raise E.NotSupportedError("Metrics are off (metrics=False, or prometheus-client "
                                      "is not installed)", code="metrics_disabled")
        body, ctype = state.metrics.render()
        return Response(body, status=200, content_type=ctype)

    def _model_card(mid: str) -> dict:
        # OpenAI's fields, plus the context length as vLLM (max_model_len) and
        # OpenRouter-style clients (context_length) read it; null when unknown
        ctx = backend.context_size(mid)
        ctx = int(ctx) if ctx else None
        return {"id": mid, "object": "model", "created": 0, "owned_by": "tep",
                "context_length": ctx, "max_model_len": ctx}

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [_model_card(m) for m in backend.list_models()]})

    @app.get("/v1/models/<path:model_id>")
    async def model(model_id: str) -> Response:
        check_model(state, model_id)
        return _json(_model_card(model_id))

    # ---- stored responses (paths from tep.wire.routes.ROUTES)
    stored = {(r.method, r.path): quart_path(r.path) for r in ROUTES
              if r.path.startswith("/v1/responses/")}
    one = stored[("GET", "/v1/responses/{response_id}")]

    @app.get(one)
    async def response_get(response_id: str) -> Response:
        return _response(await get_response(state, _rec(), response_id))

    @app.delete(stored[("DELETE", "/v1/responses/{response_id}")])
    async def response_delete(response_id: str) -> Response:
        return _response(await delete_response(state, _rec(), response_id))

    @app.get(stored[("GET", "/v1/responses/{response_id}/input_items")])
    async def response_input_items(response_id: str) -> Response:
        return _response(await list_input_items(state, _rec(), response_id, request.args))

    # ---- inference (normally answered by the fast path; here for fast_path=False and
    # so that other methods on these paths get Quart's 405 with Allow)
    for path, route in HANDLERS.items():
        _route(app, state, path, route)

