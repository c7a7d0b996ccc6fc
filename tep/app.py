"""The Quart application: routes, error handlers and the streaming responses.

    app = tep.create_app(MyBackend())            # or create_app() for $TEP_BACKEND / the toy

Metadata methods of the backend (``list_models``, ``supports_*``,
``embedding_dimensions``) are called on the event loop and must be cheap; everything
that computes (generation, embeddings, tokenize, detokenize) runs in the app's worker pool.

Around the routes: API keys (:mod:`tep.auth`), admission with a bounded wait queue
(:mod:`tep.limits`), Prometheus metrics at ``/metrics`` (:mod:`tep.metrics`), JSONL run
events (:mod:`tep.events`) and a per-request record closed by an ASGI middleware
(:mod:`tep.telemetry`).
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import numpy as np
from quart import Quart, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from tep import errors as E
from tep import protocol as P
from tep.auth import KeyChecker
from tep.backend import Backend, ChatStreamSink, Completion, StreamSink, TokenLogprob, _overrides
from tep.config import ServerConfig, load_backend
from tep.events import EventLog, resolve_path
from tep.limits import Admission, QueueFull
from tep.metrics import Metrics
from tep.openapi import openapi_document
from tep.streaming import StreamBridge, run_blocking, sse
from tep.telemetry import SCOPE_KEY, RequestRecord, TelemetryMiddleware

__all__ = ["create_app"]

log = logging.getLogger("tep.server")

_TOKEN_IDS_ONLY = ("this server takes token IDs: the backend has no tokenize hook, so "
                   "'{param}' must be a list of integer token IDs")


# A cut-off non-streamed generation whose backend ignores the cancel flag is given up on
# this long after the generation timeout (its choice then comes back empty).
_TIMEOUT_GRACE_S = 2.0

# Most SSE events joined into one body write (see _coalesce).
_COALESCE_MAX = 64


class ServerState:
    """What the app shares between requests: backend, settings, worker pool, live
    requests, admission gate, keys, metrics and events."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.executor: ThreadPoolExecutor | None = None
        self.active: set[threading.Event] = set()
        self.slots: dict[threading.Event, Any] = {}   # cancel flag -> release()
        self._lock = threading.Lock()
        self.keys = KeyChecker(config.all_api_keys())
        self.metrics = Metrics(config.metrics)
        self.events = EventLog(resolve_path(config.events_jsonl) if config.events_jsonl
                               else None)
        self.admission = Admission(config.max_concurrency, config.max_queue,
                                   on_change=self._queue_changed)

    def _queue_changed(self, running: int, queued: int) -> None:
        if self.metrics.enabled:
            self.metrics.queue_depth.set(queued)

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:  # created in before_serving; lazily for bare test clients
            if self.executor is None:
                self.executor = ThreadPoolExecutor(
                    max_workers=self.config.max_concurrency, thread_name_prefix="tep-backend")
            return self.executor

    def shutdown(self) -> None:
        for ev in list(self.active):
            ev.set()
        for release in list(self.slots.values()):
            release()
        self.slots.clear()
        with self._lock:
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = None


def create_app(backend: Backend | str | None = None, **config: Any) -> Quart:
    """Build the Quart app serving ``backend``.

    Args:
        backend: a :class:`tep.Backend` instance, a ``"module:Class"`` string, or None for
            ``$TEP_BACKEND`` (default: the toy backend ``tep.backends.toy:ToyBackend``).
        **config: :class:`tep.config.ServerConfig` fields (``max_concurrency``,
            ``max_queue``, ``max_body_bytes``, ``chat_max_tokens``, ``api_keys``,
            ``generation_timeout``, ``events_jsonl``, ``metrics``, ...); unset ones come
            from ``TEP_<NAME>`` environment variables.
    """
    if not isinstance(backend, Backend):
        backend = load_backend(backend)
    cfg = ServerConfig.from_env(**config)
    state = ServerState(backend, cfg)
    app = Quart("tep")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # keep the OpenAI field order (id, object, created, ...)
    app.extensions["tep"] = state
    _register(app, state)
    app.asgi_app = TelemetryMiddleware(app.asgi_app, state.metrics,  # type: ignore[method-assign]
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
        _done(state, rec.cancel)
    seconds = time.perf_counter() - rec.start
    status, outcome = rec.final_status_and_outcome()
    state.metrics.request_done(rec.endpoint, status, outcome, seconds, rec.prompt_tokens,
                               rec.completion_tokens, rec.timed_out)
    if rec.inference:
        state.events.request(rec.eval_extra(status, outcome, seconds,
                                            with_sampling=state.events.enabled))


# --------------------------------------------------------------------------- helpers

def _json(obj: Any, status: int = 200) -> Response:
    resp = jsonify(obj)
    resp.status_code = status
    return resp


def _error_response(err: E.APIError) -> Response:
    return _json(err.body(), err.status)


async def _body() -> dict:
    data = await request.get_data(cache=False)
    g.body_read = True
    return P.parse_json_body(data)


def _rec() -> RequestRecord:
    """This request's record (a detached one when the app is called without the
    middleware, e.g. through ``app.handle_request``)."""
    rec = request.scope.get(SCOPE_KEY) if hasattr(request, "scope") else None
    if rec is None:
        rec = g.get("_tep_record")
        if rec is None:
            rec = g._tep_record = RequestRecord("other")
    return rec


def _check_model(state: ServerState, model: str) -> None:
    if model not in state.backend.list_models():
        raise E.NotFoundError(f"The model '{model}' does not exist", param="model",
                              code="model_not_found")


def _backend_failure(exc: BaseException, what: str, rid: str | None = None) -> E.APIError:
    """Map an exception from backend code; log unexpected ones with the request ID."""
    if isinstance(exc, E.APIError):
        return exc
    rid = rid or g.get("request_id", "?")
    log.error("request %s: backend error during %s", rid, what,
              exc_info=(type(exc), exc, exc.__traceback__))
    return E.InternalServerError(f"The backend failed while handling request {rid}")


async def _call(state: ServerState, cancel: threading.Event, what: str, fn: Any,
                *args: Any) -> Any:
    try:
        return await run_blocking(state.pool(), cancel, fn, *args)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise _backend_failure(e, what) from None


async def _admit(state: ServerState, rec: RequestRecord) -> threading.Event:
    """Wait for an admission slot (429 when the queue is full) and return the request's
    cancel flag; :func:`_done` with that flag gives the slot back."""
    try:
        await state.admission.acquire()
    except QueueFull:
        rec.outcome = "rejected"
        raise E.RateLimitError(
            f"The server is at capacity ({state.config.max_concurrency} running, "
            f"{state.config.max_queue} waiting); retry after {state.config.retry_after}s",
            retry_after=state.config.retry_after) from None
    except asyncio.CancelledError:
        rec.outcome = "dropped"  # the client left while waiting: the backend never ran
        raise
    ev = threading.Event()
    state.active.add(ev)
    state.slots[ev] = state.admission.release
    rec.cancel = ev
    return ev


def _done(state: ServerState, cancel: threading.Event) -> None:
    cancel.set()
    state.active.discard(cancel)
    release = state.slots.pop(cancel, None)
    if release is not None:
        release()


def _deadline(state: ServerState) -> float | None:
    t = state.config.generation_timeout
    return asyncio.get_running_loop().time() + t if t > 0 else None


async def _gather_choices(state: ServerState, rec: RequestRecord, cancel: threading.Event,
                          jobs: list) -> tuple[list[Completion], list[bool]]:
    """Run the per-choice jobs; with a generation timeout, set the cancel flag at the
    deadline (cooperative backends return what they have) and give up on a job
    ``_TIMEOUT_GRACE_S`` later. Returns the results and, per choice, whether the timeout
    cut it (its finish reason becomes "length")."""
    t = state.config.generation_timeout
    if t <= 0:
        if len(jobs) == 1:  # the common n=1 case: no gather task around the one job
            return [await jobs[0]], [False]
        return list(await asyncio.gather(*jobs)), [False] * len(jobs)
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(j) for j in jobs]
    fired: list[bool] = []
    early: set = set()
    for task in tasks:
        task.add_done_callback(lambda tk: None if fired else early.add(tk))
    timer = loop.call_later(t, lambda: (fired.append(True), cancel.set()))
    try:
        _, pending = await asyncio.wait(tasks, timeout=t + _TIMEOUT_GRACE_S)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    finally:
        timer.cancel()
    for task in pending:
        task.cancel()
    results, cut = [], []
    for task in tasks:
        if task in pending:
            results.append(Completion(finish_reason="length"))
            cut.append(True)
        else:
            results.append(task.result())  # re-raises a backend failure, like gather
            cut.append(task not in early)
    if any(cut):
        rec.timed_out = True
        rec.outcome = "timeout"
    return results, cut


def _tokenize_all(backend: Backend, model: str, items: list, param: str) -> list[list[int]]:
    out = []
    for it in items:
        if isinstance(it, str):
            ids = backend.tokenize(model, it)
            out.append([int(t) for t in ids])
        else:
            out.append(it)
    return out


def _replay(sampling: P.Sampling, c: Completion, sink_cls: type = StreamSink,
            token_text: Any = None) -> Completion:
    """Apply stops/stop_token_ids to a Completion a backend built itself."""
    sink = sink_cls(sampling, token_text=token_text)
    sink.emit_completion(c)
    out = sink.result()
    out.prompt_tokens = c.prompt_tokens
    if c.completion_tokens is not None and out.finish_reason == c.finish_reason and \
            out.text == c.text:
        out.completion_tokens = c.completion_tokens
    return out


def _echo_parts(backend: Backend, model: str, prompt: str | list[int], ids: list[int],
                want_lp: bool) -> tuple[str, list[TokenLogprob]]:
    """The echoed prompt text and (when logprobs are on) its logprob entries."""
    text = prompt if isinstance(prompt, str) else backend.detokenize(model, ids)
    entries: list[TokenLogprob] = []
    if want_lp:
        off = 0
        for t in ids:
            tok = backend.detokenize(model, [t])
            entries.append(TokenLogprob(token=tok, logprob=None, token_id=t, top=None,
                                        text_offset=off))
            off += len(tok)
    return text, entries


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
    async def _before() -> Response | None:
        g.request_id = request.headers.get("X-Request-Id") or P.new_id("req")
        rec = _rec()
        rec.request_id = g.request_id
        if state.keys.enabled and request.path.startswith("/v1"):
            principal = state.keys.check(request.headers.get("Authorization"))
            if principal is None:
                resp = _error_response(E.AuthenticationError(
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'"))
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
            rec.principal_id = principal
        return None

    @app.after_request
    async def _after(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = g.get("request_id", "")
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
        if err.status >= 500:
            log.warning("request %s: %d %s", g.get("request_id", "?"), err.status, err.message)
        resp = _error_response(err)
        if isinstance(err, E.RateLimitError):
            resp.headers["Retry-After"] = str(err.retry_after)
        return resp

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        code = err.code or 500
        if code == 404:
            e: E.APIError = E.NotFoundError(f"No route {request.method} {request.path}")
        elif code == 405:
            e = E.MethodNotAllowedError(f"Method {request.method} is not allowed for "
                                        f"{request.path}")
        elif code == 413:
            e = E.PayloadTooLargeError(f"The request body is larger than "
                                       f"{state.config.max_body_bytes} bytes")
        elif code < 500:
            e = E.APIError(err.description or err.name, status=code,
                           type="invalid_request_error", code=None)
        else:
            e = E.InternalServerError(err.description or err.name)
        resp = _error_response(e)
        if code == 405 and getattr(err, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(err.valid_methods)
        return resp

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        log.error("request %s: unhandled error", g.get("request_id", "?"), exc_info=err)
        return _error_response(E.InternalServerError(
            f"Internal error while handling request {g.get('request_id', '?')}"))

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
        return {"id": mid, "object": "model", "created": 0, "owned_by": "tep"}

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [_model_card(m) for m in backend.list_models()]})

    @app.get("/v1/models/<path:model_id>")
    async def model(model_id: str) -> Response:
        _check_model(state, model_id)
        return _json(_model_card(model_id))

    # ---- completions
    @app.post("/v1/completions")
    async def completions() -> Response:
        rid = g.request_id = P.new_id("cmpl")
        rec = _rec()
        rec.request_id = rid
        req = P.parse_completion_request(await _body(), rid)
        rec.model, rec.sampling = req.model, req.sampling
        _check_model(state, req.model)
        s = req.sampling
        if any(isinstance(p, str) for p in req.prompts) and not backend.supports_tokenize():
            raise E.BadRequestError(_TOKEN_IDS_ONLY.format(param="prompt"), param="prompt")
        if s.echo and not backend.supports_detokenize() and \
                not all(isinstance(p, str) for p in req.prompts):
            raise E.NotSupportedError("'echo' with token-ID prompts needs a backend with a "
                                      "detokenize hook", param="echo")
        cancel = await _admit(state, rec)
        try:
            prompt_ids = await _call(state, cancel, "tokenize", _tokenize_all, backend,
                                     req.model, req.prompts, "prompt")
            rec.prompt_tokens = sum(len(x) for x in prompt_ids)
            echoes: list[tuple[str, list[TokenLogprob]]] = []
            if s.echo:
                for p, ids in zip(req.prompts, prompt_ids):
                    echoes.append(await _call(state, cancel, "detokenize", _echo_parts,
                                              backend, req.model, p, ids,
                                              s.logprobs is not None))
            if req.stream:
                return await _stream_completions(state, req, rid, prompt_ids, echoes, cancel)
            return await _complete(state, req, rid, prompt_ids, echoes, cancel)
        except BaseException:
            _done(state, cancel)
            raise

    # ---- chat
    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        if not backend.supports_chat():
            raise E.NotSupportedError("This backend does not support chat completions",
                                      param=None, code="chat_not_supported")
        rid = g.request_id = P.new_id("chatcmpl")
        rec = _rec()
        rec.request_id = rid
        req = P.parse_chat_request(await _body(), rid,
                                   default_max_tokens=state.config.chat_max_tokens)
        rec.model, rec.sampling = req.model, req.sampling
        _check_model(state, req.model)
        cancel = await _admit(state, rec)
        try:
            if req.stream:
                return await _stream_chat(state, req, rid, cancel)
            return await _chat(state, req, rid, cancel)
        except BaseException:
            _done(state, cancel)
            raise

    # ---- embeddings
    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        if not backend.supports_embeddings():
            raise E.NotSupportedError("This backend does not support embeddings",
                                      code="embeddings_not_supported")
        rec = _rec()
        req = P.parse_embedding_request(await _body(), g.request_id)
        rec.model = req.model
        _check_model(state, req.model)
        dim = backend.embedding_dimensions(req.model)
        if req.dimensions is not None and dim is not None and req.dimensions > dim:
            raise E.BadRequestError(f"'dimensions' must be <= {dim} for model '{req.model}', "
                                    f"got {req.dimensions}", param="dimensions")
        if any(isinstance(x, str) for x in req.inputs) and not backend.supports_tokenize():
            raise E.BadRequestError(_TOKEN_IDS_ONLY.format(param="input"), param="input")
        cancel = await _admit(state, rec)
        try:
            ids = await _call(state, cancel, "tokenize", _tokenize_all, backend, req.model,
                              req.inputs, "input")
            rec.prompt_tokens = sum(len(x) for x in ids)
            vecs = await _call(state, cancel, "embeddings", _embed_all, backend, req.model, ids)
        finally:
            _done(state, cancel)
        data = []
        for i, v in enumerate(vecs):
            v = np.asarray(v, dtype=np.float32).reshape(-1)
            if req.dimensions is not None:
                if req.dimensions > v.shape[0]:
                    raise E.BadRequestError(f"'dimensions' must be <= {v.shape[0]} for model "
                                            f"'{req.model}', got {req.dimensions}",
                                            param="dimensions")
                v = v[:req.dimensions]
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            data.append(P.embedding_item(v, i, req.encoding_format))
        n = sum(len(x) for x in ids)
        return _json({"object": "list", "data": data, "model": req.model,
                      "usage": {"prompt_tokens": n, "total_tokens": n}})


def _embed_all(backend: Backend, model: str, ids: list[list[int]]) -> list[Any]:
    vecs = backend.generate_embeddings_batch(model, ids)
    if len(vecs) != len(ids):
        raise ValueError(f"generate_embeddings_batch returned {len(vecs)} vectors "
                         f"for {len(ids)} inputs")
    out = []
    for v in vecs:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim != 1:
            raise ValueError(f"an embedding has shape {v.shape}, expected [D]")
        out.append(v)
    return out


# --------------------------------------------------------------------------- completions

async def _complete(state: ServerState, req: P.CompletionRequest, rid: str,
                    prompt_ids: list[list[int]], echoes: list, cancel: threading.Event
                    ) -> Response:
    backend, s = state.backend, req.sampling
    own = _overrides(backend, "generate_from_tokens")
    token_text = backend._token_text_fn(req.model)
    rec = _rec()
    try:
        jobs = []
        for ids in prompt_ids:
            for j in range(s.n):
                if s.max_tokens == 0:
                    jobs.append(asyncio.sleep(0, Completion(finish_reason="length")))
                else:
                    jobs.append(_call(state, cancel, "generation", backend.generate_from_tokens,
                                      req.model, ids, s.for_choice(j)))
        results, cut = await _gather_choices(state, rec, cancel, jobs)
    finally:
        _done(state, cancel)
    choices = []
    completion_tokens = 0
    for k, c in enumerate(results):
        if own:
            c = _replay(s, c, token_text=token_text)
        if cut[k]:
            c.finish_reason = "length"
        if s.logprobs is not None and state.events.enabled:
            state.events.steps(rid, k, 0, c.logprobs or [])
        p = k // s.n
        echo_text, echo_lp = echoes[p] if s.echo else ("", [])
        completion_tokens += c.completion_tokens if c.completion_tokens is not None \
            else len(c.token_ids)
        lp = None
        if s.logprobs is not None:
            lp = P.completion_logprobs(echo_lp, 0)
            gen = P.completion_logprobs(c.logprobs or [], len(echo_text))
            for key in lp:
                lp[key] += gen[key]
        choices.append({"index": k, "text": echo_text + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason})
    prompt_tokens = sum(len(x) for x in prompt_ids)
    rec.completion_tokens = completion_tokens
    return _json({"id": rid, "object": "text_completion", "created": P.now(),
                  "model": req.model, "choices": choices,
                  "usage": P.usage(prompt_tokens, completion_tokens)})


async def _first_event(bridge: StreamBridge, deadline: float | None = None
                       ) -> tuple[AsyncIterator[tuple], tuple | None]:
    """Wait for the first event before sending headers, so a backend that fails at once
    gets a real HTTP error status instead of a 200 stream with an error event."""
    it = bridge.events(deadline).__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        return it, None
    if first[0] == "error":
        raise _backend_failure(first[2], "generation", bridge.request_id)
    return it, first


async def _coalesce(gen: AsyncIterator[bytes], bridge: StreamBridge) -> AsyncIterator[bytes]:
    """Join the SSE events that are ready into one body write: a fast backend's tokens
    leave in a few large writes instead of one small write (and one round through the
    server) each, while a slow one still gets every event flushed as soon as it exists."""
    buf: list[bytes] = []
    first = True
    try:
        async for b in gen:
            buf.append(b)
            # the first event goes at once (time to first token); later ones wait only
            # while more are ready, up to a bound so a backend that outruns the socket
            # still streams
            if first or len(buf) >= _COALESCE_MAX or not bridge.has_pending():
                yield buf[0] if len(buf) == 1 else b"".join(buf)
                buf = []
                first = False
        if buf:
            yield b"".join(buf)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]  # its finally releases the request


def _stream_response(gen: AsyncIterator[bytes], bridge: StreamBridge) -> Response:
    resp = Response(_coalesce(gen, bridge), status=200, content_type="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.timeout = None  # a long generation must not hit RESPONSE_TIMEOUT
    return resp


async def _stream_completions(state: ServerState, req: P.CompletionRequest, rid: str,
                              prompt_ids: list[list[int]], echoes: list,
                              cancel: threading.Event) -> Response:
    backend, s = state.backend, req.sampling
    created = P.now()
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    n_choices = len(prompt_ids) * s.n
    for k in range(n_choices):
        ids, sk = prompt_ids[k // s.n], s.for_choice(k % s.n)
        if s.max_tokens == 0:
            bridge.start(k, lambda on_delta, on_role, sk=sk: StreamSink(sk, cancel=cancel),
                         lambda sink: None)
            continue
        bridge.start(
            k,
            lambda on_delta, on_role, sk=sk, ids=ids: StreamSink(
                sk, cancel=cancel, on_delta=on_delta, token_text=token_text,
                prompt_tokens=len(ids)),
            lambda sink, sk=sk, ids=ids: backend.generate_stream_from_tokens(
                req.model, ids, sk, sink))
    rec = _rec()
    it, first = await _first_event(bridge, _deadline(state))
    usage_null = {"usage": None} if s.include_usage else {}
    echo_len = [len(echoes[k // s.n][0]) if s.echo else 0 for k in range(n_choices)]
    want_steps = s.logprobs is not None and state.events.enabled

    def chunk(k: int, text: str, lps: list | None, finish: str | None, base: int) -> bytes:
        lp = None
        if s.logprobs is not None and lps is not None:
            lp = P.completion_logprobs(lps, base)
        return sse({"id": rid, "object": "text_completion", "created": created,
                    "model": req.model,
                    "choices": [{"index": k, "text": text, "logprobs": lp,
                                 "finish_reason": finish}], **usage_null})

    async def gen() -> AsyncIterator[bytes]:
        completion_tokens = 0
        finished: set[int] = set()
        steps = [0] * n_choices
        try:
            if s.echo:
                for k in range(n_choices):
                    text, lps = echoes[k // s.n]
                    yield chunk(k, text, lps, None, 0)
            pending = [first] if first is not None else []
            async for ev in _chain(pending, it):
                kind, k = ev[0], ev[1]
                if kind == "delta":
                    rec.token(k)
                    if want_steps:
                        steps[k] += state.events.steps(rid, k, steps[k], ev[3] or [])
                    yield chunk(k, ev[2], ev[3], None, echo_len[k])
                elif kind == "finish":
                    finished.add(k)
                    completion_tokens += ev[3]
                    yield chunk(k, "", [], ev[2], echo_len[k])
                elif kind == "timeout":
                    rec.timed_out, rec.outcome = True, "timeout"
                    for k2 in range(n_choices):
                        if k2 not in finished:
                            finished.add(k2)
                            completion_tokens += _sink_tokens(bridge, k2)
                            yield chunk(k2, "", [], "length", echo_len[k2])
                elif kind == "error":
                    rec.outcome = "error"
                    yield sse(_backend_failure(ev[2], "generation", rid).body())
                    yield sse("[DONE]")
                    return
            if s.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": req.model, "choices": [],
                           "usage": P.usage(sum(len(x) for x in prompt_ids), completion_tokens)})
            yield sse("[DONE]")
        finally:
            _done(state, cancel)
            rec.completion_tokens = completion_tokens + sum(
                _sink_tokens(bridge, k) for k in range(n_choices) if k not in finished)

    return _stream_response(gen(), bridge)


def _sink_tokens(bridge: StreamBridge, k: int) -> int:
    sink = bridge.sinks.get(k)
    return sink.n_tokens if sink is not None else 0


async def _chain(first: list, rest: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    for ev in first:
        yield ev
    async for ev in rest:
        yield ev


# --------------------------------------------------------------------------- chat

async def _chat(state: ServerState, req: P.ChatRequest, rid: str,
                cancel: threading.Event) -> Response:
    backend, s = state.backend, req.sampling
    own = _overrides(backend, "chat_completion")
    rec = _rec()
    try:
        jobs = []
        for j in range(s.n):
            if s.max_tokens == 0:
                jobs.append(asyncio.sleep(0, Completion(finish_reason="length", prompt_tokens=0)))
            else:
                jobs.append(_call(state, cancel, "chat completion", backend.chat_completion,
                                  req.for_choice(j)))
        results, cut = await _gather_choices(state, rec, cancel, jobs)
    finally:
        _done(state, cancel)
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for j, c in enumerate(results):
        if own:
            c = _replay(s, c, ChatStreamSink, backend._token_text_fn(req.model))
        if cut[j]:
            c.finish_reason = "length"
        if s.logprobs is not None and state.events.enabled:
            state.events.steps(rid, j, 0, c.logprobs or [])
        completion_tokens += c.completion_tokens if c.completion_tokens is not None \
            else len(c.token_ids)
        prompt_tokens = max(prompt_tokens, c.prompt_tokens or 0)
        choices.append({
            "index": j,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": P.chat_logprobs(c.logprobs or []) if s.logprobs is not None else None,
            "finish_reason": c.finish_reason,
        })
    rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens
    return _json({"id": rid, "object": "chat.completion", "created": P.now(),
                  "model": req.model, "choices": choices,
                  "usage": P.usage(prompt_tokens, completion_tokens)})


async def _stream_chat(state: ServerState, req: P.ChatRequest, rid: str,
                       cancel: threading.Event) -> Response:
    backend, s = state.backend, req.sampling
    created = P.now()
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    for j in range(s.n):
        rj = req.for_choice(j)
        if s.max_tokens == 0:
            bridge.start(j, lambda on_delta, on_role, rj=rj: ChatStreamSink(rj.sampling,
                                                                            cancel=cancel),
                         lambda sink: None)
            continue
        bridge.start(
            j,
            lambda on_delta, on_role, rj=rj: ChatStreamSink(
                rj.sampling, cancel=cancel, on_delta=on_delta, on_role=on_role,
                token_text=token_text),
            lambda sink, rj=rj: backend.chat_completion_stream(rj, sink))
    rec = _rec()
    it, first = await _first_event(bridge, _deadline(state))
    usage_null = {"usage": None} if s.include_usage else {}
    role_sent = [False] * s.n
    want_steps = s.logprobs is not None and state.events.enabled

    def chunk(j: int, delta: dict, lps: list | None, finish: str | None) -> bytes:
        lp = P.chat_logprobs(lps) if (s.logprobs is not None and lps is not None) else None
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": req.model,
                    "choices": [{"index": j, "delta": delta, "logprobs": lp,
                                 "finish_reason": finish}], **usage_null})

    def role(j: int, name: str = "assistant") -> list[bytes]:
        if role_sent[j]:
            return []
        role_sent[j] = True
        return [chunk(j, {"role": name, "content": ""}, None, None)]

    async def gen() -> AsyncIterator[bytes]:
        completion_tokens, prompt_tokens = 0, 0
        finished: set[int] = set()
        steps = [0] * s.n
        try:
            pending = [first] if first is not None else []
            async for ev in _chain(pending, it):
                kind, j = ev[0], ev[1]
                if kind == "role":
                    for b in role(j, ev[2]):
                        yield b
                elif kind == "delta":
                    rec.token(j)
                    if want_steps:
                        steps[j] += state.events.steps(rid, j, steps[j], ev[3] or [])
                    for b in role(j):
                        yield b
                    yield chunk(j, {"content": ev[2]}, ev[3], None)
                elif kind == "finish":
                    finished.add(j)
                    for b in role(j):
                        yield b
                    completion_tokens += ev[3]
                    prompt_tokens = max(prompt_tokens, ev[4] or 0)
                    yield chunk(j, {}, None, ev[2])
                elif kind == "timeout":
                    rec.timed_out, rec.outcome = True, "timeout"
                    for j2 in range(s.n):
                        if j2 not in finished:
                            finished.add(j2)
                            completion_tokens += _sink_tokens(bridge, j2)
                            sink = bridge.sinks.get(j2)
                            prompt_tokens = max(prompt_tokens, (sink.prompt_tokens or 0)
                                                if sink is not None else 0)
                            for b in role(j2):
                                yield b
                            yield chunk(j2, {}, None, "length")
                elif kind == "error":
                    rec.outcome = "error"
                    yield sse(_backend_failure(ev[2], "chat completion", rid).body())
                    yield sse("[DONE]")
                    return
            if s.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": req.model, "choices": [],
                           "usage": P.usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        finally:
            _done(state, cancel)
            for j2, sink in list(bridge.sinks.items()):
                if j2 not in finished:
                    completion_tokens += sink.n_tokens
                    prompt_tokens = max(prompt_tokens, sink.prompt_tokens or 0)
            rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens

    return _stream_response(gen(), bridge)
