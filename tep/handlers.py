"""The inference routes: ``POST /v1/completions``, ``/v1/chat/completions`` and
``/v1/embeddings``, independent of the web layer.

Each route is ``async def route(state, rec, read_body) -> Reply | StreamReply``: ``rec``
is the request's :class:`~tep.telemetry.RequestRecord` (its ``request_id`` set by the
caller; completions and chat replace it with their response ID), ``read_body()`` returns
the raw body (raising 413 past the limit). A route raises :class:`tep.errors.APIError`
for every refusal; the caller renders it with :func:`tep.replies.error_reply`. The Quart
routes (:mod:`tep.app`) and the ASGI fast path (:mod:`tep.fastpath`) both call these, so
there is one implementation of parsing, validation, admission and response building.

Metadata methods of the backend (``list_models``, ``supports_*``,
``embedding_dimensions``) are called on the event loop and must be cheap; everything
that computes (generation, embeddings, tokenize, detokenize) runs in the worker pool.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from werkzeug.exceptions import HTTPException

from tep import errors as E
from tep import protocol as P
from tep.backend import Backend, ChatStreamSink, Completion, StreamSink, TokenLogprob, _overrides
from tep.limits import QueueFull
from tep.replies import Reply, StreamReply, json_reply
from tep.state import ServerState
from tep.streaming import StreamBridge, run_blocking, sse, sse_text_template
from tep.telemetry import RequestRecord

__all__ = ["Route", "ROUTES", "completions", "chat", "embeddings", "authenticate",
           "body_too_large", "check_model", "http_error", "release"]

log = logging.getLogger("tep.server")

Route = Callable[[ServerState, RequestRecord, Callable[[], Awaitable[bytes]]],
                 Awaitable["Reply | StreamReply"]]

_TOKEN_IDS_ONLY = ("this server takes token IDs: the backend has no tokenize hook, so "
                   "'{param}' must be a list of integer token IDs")


# A cut-off non-streamed generation whose backend ignores the cancel flag is given up on
# this long after the generation timeout (its choice then comes back empty).
_TIMEOUT_GRACE_S = 2.0

# Most SSE events joined into one body write (see _coalesce). Larger batches save a few
# percent of aggregate throughput but let a fast stream finish in a handful of loop turns
# while later streams still wait for their first token (measured: 64 -> 21-64 of 64
# streams interleaved, 16 -> 64 of 64; one stream's tokens/s the same within noise).
_COALESCE_MAX = 16


# --------------------------------------------------------------------------- helpers

def check_model(state: ServerState, model: str) -> None:
    """404 unless the backend lists ``model``."""
    if model not in state.backend.list_models():
        raise E.NotFoundError(f"The model '{model}' does not exist", param="model",
                              code="model_not_found")


def _backend_failure(exc: BaseException, what: str, rid: str | None) -> E.APIError:
    """Map an exception from backend code; log unexpected ones with the request ID."""
    if isinstance(exc, E.APIError):
        return exc
    rid = rid or "?"
    log.error("request %s: backend error during %s", rid, what,
              exc_info=(type(exc), exc, exc.__traceback__))
    return E.InternalServerError(f"The backend failed while handling request {rid}")


async def _call(state: ServerState, rid: str | None, cancel: threading.Event, what: str,
                fn: Any, *args: Any) -> Any:
    try:
        return await run_blocking(state.pool(), cancel, fn, *args)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise _backend_failure(e, what, rid) from None


async def _submitted(rid: str | None, cancel: threading.Event, what: str,
                     start: Callable[[Callable], None]) -> Any:
    """Await a backend's non-blocking entry: ``start(on_done)`` queues the work and the
    backend's thread calls ``on_done(exc)`` (or ``on_done(value, exc)``) when it is done.
    No worker thread waits; a cancelled await sets ``cancel``."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    def on_done(*args: Any) -> None:  # on the backend's thread
        value, exc = (None, args[0]) if len(args) == 1 else args
        try:
            loop.call_soon_threadsafe(settle, value, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    try:
        start(on_done)
        return await fut
    except asyncio.CancelledError:
        cancel.set()
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise _backend_failure(e, what, rid) from None


async def _submit_choice(rid: str, cancel: threading.Event, what: str, sink: StreamSink,
                         start: Callable[[StreamSink, Callable], None]) -> Completion:
    """One choice through a non-blocking backend entry, collected into a Completion."""
    await _submitted(rid, cancel, what, lambda done: start(sink, done))
    return sink.result()


async def _admit(state: ServerState, rec: RequestRecord) -> threading.Event:
    """Wait for an admission slot (429 when the queue is full) and return the request's
    cancel flag; :func:`release` with that flag gives the slot back."""
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


def release(state: ServerState, cancel: threading.Event) -> None:
    """End a request's backend work: set its cancel flag and give its admission slot
    back (idempotent: the slot is given back once)."""
    cancel.set()
    state.active.discard(cancel)
    give_back = state.slots.pop(cancel, None)
    if give_back is not None:
        give_back()


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



# --------------------------------------------------------------------------- checks

def authenticate(state: ServerState, authorization: str | None) -> str:
    """The principal ID of the request's key; 401 when keys are on and it has none."""
    principal = state.keys.check(authorization)
    if principal is None:
        raise E.AuthenticationError("Missing or invalid API key: send "
                                    "'Authorization: Bearer <key>'")
    return principal


def body_too_large(state: ServerState) -> E.PayloadTooLargeError:
    """The 413 for a body over ``max_body_bytes``."""
    return E.PayloadTooLargeError(f"The request body is larger than "
                                  f"{state.config.max_body_bytes} bytes")


def http_error(state: ServerState, err: HTTPException, method: str, path: str) -> E.APIError:
    """The OpenAI error for a werkzeug HTTP exception (no route, wrong method, body too
    large or too slow, ...)."""
    code = err.code or 500
    if code == 404:
        return E.NotFoundError(f"No route {method} {path}")
    if code == 405:
        return E.MethodNotAllowedError(f"Method {method} is not allowed for {path}")
    if code == 413:
        return body_too_large(state)
    if code < 500:
        return E.APIError(err.description or err.name, status=code,
                          type="invalid_request_error", code=None)
    return E.InternalServerError(err.description or err.name)


# --------------------------------------------------------------------------- routes

async def completions(state: ServerState, rec: RequestRecord,
                      read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/completions``."""
    backend = state.backend
    rid = rec.request_id = P.new_id("cmpl")
    req = P.parse_completion_request(P.parse_json_body(await read_body()), rid)
    rec.model, rec.sampling = req.model, req.sampling
    check_model(state, req.model)
    s = req.sampling
    texts = any(isinstance(p, str) for p in req.prompts)
    if texts and not backend.supports_tokenize():
        raise E.BadRequestError(_TOKEN_IDS_ONLY.format(param="prompt"), param="prompt")
    if s.echo and not backend.supports_detokenize() and \
            not all(isinstance(p, str) for p in req.prompts):
        raise E.NotSupportedError("'echo' with token-ID prompts needs a backend with a "
                                  "detokenize hook", param="echo")
    cancel = await _admit(state, rec)
    try:
        # token-ID prompts need no tokenizer: no trip through the pool for them
        prompt_ids = (await _call(state, rid, cancel, "tokenize", _tokenize_all, backend,
                                  req.model, req.prompts, "prompt")
                      if texts else req.prompts)
        rec.prompt_tokens = sum(len(x) for x in prompt_ids)
        echoes: list[tuple[str, list[TokenLogprob]]] = []
        if s.echo:
            for p, ids in zip(req.prompts, prompt_ids):
                echoes.append(await _call(state, rid, cancel, "detokenize", _echo_parts,
                                          backend, req.model, p, ids,
                                          s.logprobs is not None))
        if req.stream:
            return await _stream_completions(state, rec, req, rid, prompt_ids, echoes,
                                             cancel)
        return await _complete(state, rec, req, rid, prompt_ids, echoes, cancel)
    except BaseException:
        release(state, cancel)
        raise


async def chat(state: ServerState, rec: RequestRecord,
               read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/chat/completions``."""
    if not state.backend.supports_chat():
        raise E.NotSupportedError("This backend does not support chat completions",
                                  param=None, code="chat_not_supported")
    rid = rec.request_id = P.new_id("chatcmpl")
    req = P.parse_chat_request(P.parse_json_body(await read_body()), rid,
                               default_max_tokens=state.config.chat_max_tokens)
    rec.model, rec.sampling = req.model, req.sampling
    check_model(state, req.model)
    cancel = await _admit(state, rec)
    try:
        if req.stream:
            return await _stream_chat(state, rec, req, rid, cancel)
        return await _chat(state, rec, req, rid, cancel)
    except BaseException:
        release(state, cancel)
        raise


async def embeddings(state: ServerState, rec: RequestRecord,
                     read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /v1/embeddings``."""
    backend = state.backend
    if not backend.supports_embeddings():
        raise E.NotSupportedError("This backend does not support embeddings",
                                  code="embeddings_not_supported")
    rid = rec.request_id
    req = P.parse_embedding_request(P.parse_json_body(await read_body()), rid or "?")
    rec.model = req.model
    check_model(state, req.model)
    dim = backend.embedding_dimensions(req.model)
    if req.dimensions is not None and dim is not None and req.dimensions > dim:
        raise E.BadRequestError(f"'dimensions' must be <= {dim} for model '{req.model}', "
                                f"got {req.dimensions}", param="dimensions")
    if any(isinstance(x, str) for x in req.inputs) and not backend.supports_tokenize():
        raise E.BadRequestError(_TOKEN_IDS_ONLY.format(param="input"), param="input")
    cancel = await _admit(state, rec)
    try:
        ids = await _call(state, rid, cancel, "tokenize", _tokenize_all, backend, req.model,
                          req.inputs, "input")
        rec.prompt_tokens = sum(len(x) for x in ids)
        if getattr(backend, "submit_embeddings", None) is not None:
            # batched with other requests' inputs (tep.engine.BatchedEmbeddings)
            vecs = _check_vectors(await _submitted(
                rid, cancel, "embeddings",
                lambda done: backend.submit_embeddings(req.model, ids, done)), len(ids))
        else:
            vecs = await _call(state, rid, cancel, "embeddings", _embed_all, backend,
                               req.model, ids)
    finally:
        release(state, cancel)
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
    return json_reply({"object": "list", "data": data, "model": req.model,
                       "usage": {"prompt_tokens": n, "total_tokens": n}})


ROUTES: dict[str, Route] = {"/v1/completions": completions,
                            "/v1/chat/completions": chat,
                            "/v1/embeddings": embeddings}
"""The inference routes by path (all ``POST``)."""


def _embed_all(backend: Backend, model: str, ids: list[list[int]]) -> list[Any]:
    return _check_vectors(backend.generate_embeddings_batch(model, ids), len(ids))


def _check_vectors(vecs: Any, n: int) -> list[Any]:
    if len(vecs) != n:
        raise ValueError(f"generate_embeddings_batch returned {len(vecs)} vectors "
                         f"for {n} inputs")
    out = []
    for v in vecs:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim != 1:
            raise ValueError(f"an embedding has shape {v.shape}, expected [D]")
        out.append(v)
    return out


# --------------------------------------------------------------------------- completions

async def _complete(state: ServerState, rec: RequestRecord, req: P.CompletionRequest,
                    rid: str, prompt_ids: list[list[int]], echoes: list,
                    cancel: threading.Event) -> Reply:
    backend, s = state.backend, req.sampling
    submit = getattr(backend, "submit", None)   # a non-blocking entry (tep.engine)
    own = submit is None and _overrides(backend, "generate_from_tokens")
    token_text = backend._token_text_fn(req.model)
    try:
        jobs = []
        for ids in prompt_ids:
            for j in range(s.n):
                if s.max_tokens == 0:
                    jobs.append(asyncio.sleep(0, Completion(finish_reason="length")))
                elif submit is not None:
                    sk = s.for_choice(j)
                    jobs.append(_submit_choice(
                        rid, cancel, "generation",
                        StreamSink(sk, cancel=cancel, token_text=token_text,
                                   prompt_tokens=len(ids)),
                        lambda sink, done, ids=ids, sk=sk: submit(req.model, ids, sk, sink,
                                                                   done)))
                else:
                    jobs.append(_call(state, rid, cancel, "generation",
                                      backend.generate_from_tokens, req.model, ids,
                                      s.for_choice(j)))
        results, cut = await _gather_choices(state, rec, cancel, jobs)
    finally:
        release(state, cancel)
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
    return json_reply({"id": rid, "object": "text_completion", "created": P.now(),
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
                if bridge.has_pending():
                    # More is ready, so this stream would not suspend before its next
                    # write (neither the queue nor the socket write waits): give the
                    # other streams and new connections their turn first, or a fast
                    # backend's stream runs to its end while the others wait.
                    await asyncio.sleep(0)
        if buf:
            yield b"".join(buf)
    finally:
        await gen.aclose()  # type: ignore[attr-defined]  # its finally releases the request


def _stream_reply(gen: AsyncIterator[bytes], bridge: StreamBridge) -> StreamReply:
    return StreamReply(_coalesce(gen, bridge))


async def _stream_completions(state: ServerState, rec: RequestRecord,
                              req: P.CompletionRequest, rid: str,
                              prompt_ids: list[list[int]], echoes: list,
                              cancel: threading.Event) -> StreamReply:
    backend, s = state.backend, req.sampling
    created = P.now()
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    submit = getattr(backend, "submit", None)   # a non-blocking entry (tep.engine)
    n_choices = len(prompt_ids) * s.n
    for k in range(n_choices):
        ids, sk = prompt_ids[k // s.n], s.for_choice(k % s.n)
        if s.max_tokens == 0:
            bridge.start(k, lambda on_delta, on_role, sk=sk: StreamSink(sk, cancel=cancel),
                         lambda sink: None)
            continue
        make = (lambda on_delta, on_role, sk=sk, ids=ids: StreamSink(
            sk, cancel=cancel, on_delta=on_delta, token_text=token_text,
            prompt_tokens=len(ids)))
        if submit is not None:
            bridge.start_submitted(k, make, lambda sink, done, sk=sk, ids=ids: submit(
                req.model, ids, sk, sink, done))
            continue
        bridge.start(
            k, make,
            lambda sink, sk=sk, ids=ids: backend.generate_stream_from_tokens(
                req.model, ids, sk, sink))
    it, first = await _first_event(bridge, _deadline(state))
    usage_null = {"usage": None} if s.include_usage else {}
    echo_len = [len(echoes[k // s.n][0]) if s.echo else 0 for k in range(n_choices)]
    want_steps = s.logprobs is not None and state.events.enabled

    def payload(k: int, text: str, lp: Any, finish: str | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created,
                "model": req.model,
                "choices": [{"index": k, "text": text, "logprobs": lp,
                             "finish_reason": finish}], **usage_null}

    def chunk(k: int, text: str, lps: list | None, finish: str | None, base: int) -> bytes:
        lp = None
        if s.logprobs is not None and lps is not None:
            lp = P.completion_logprobs(lps, base)
        return sse(payload(k, text, lp, finish))

    # the common chunk (a token's text, no logprobs) from a template
    plain = None if s.logprobs is not None else sse_text_template(
        lambda k, text: payload(k, text, None, None))

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
                    yield plain(k, ev[2]) if plain is not None else \
                        chunk(k, ev[2], ev[3], None, echo_len[k])
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
            release(state, cancel)
            rec.completion_tokens = completion_tokens + sum(
                _sink_tokens(bridge, k) for k in range(n_choices) if k not in finished)

    return _stream_reply(gen(), bridge)


def _sink_tokens(bridge: StreamBridge, k: int) -> int:
    sink = bridge.sinks.get(k)
    return sink.n_tokens if sink is not None else 0


async def _chain(first: list, rest: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    for ev in first:
        yield ev
    async for ev in rest:
        yield ev


# --------------------------------------------------------------------------- chat

async def _chat(state: ServerState, rec: RequestRecord, req: P.ChatRequest, rid: str,
                cancel: threading.Event) -> Reply:
    backend, s = state.backend, req.sampling
    submit = getattr(backend, "submit_chat", None)   # a non-blocking entry (tep.engine)
    own = submit is None and _overrides(backend, "chat_completion")
    token_text = backend._token_text_fn(req.model)
    try:
        jobs = []
        for j in range(s.n):
            if s.max_tokens == 0:
                jobs.append(asyncio.sleep(0, Completion(finish_reason="length", prompt_tokens=0)))
            elif submit is not None:
                rj = req.for_choice(j)
                jobs.append(_submit_choice(
                    rid, cancel, "chat completion",
                    ChatStreamSink(rj.sampling, cancel=cancel, token_text=token_text),
                    lambda sink, done, rj=rj: submit(rj, sink, done)))
            else:
                jobs.append(_call(state, rid, cancel, "chat completion",
                                  backend.chat_completion, req.for_choice(j)))
        results, cut = await _gather_choices(state, rec, cancel, jobs)
    finally:
        release(state, cancel)
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
    return json_reply({"id": rid, "object": "chat.completion", "created": P.now(),
                  "model": req.model, "choices": choices,
                  "usage": P.usage(prompt_tokens, completion_tokens)})


async def _stream_chat(state: ServerState, rec: RequestRecord, req: P.ChatRequest,
                       rid: str, cancel: threading.Event) -> StreamReply:
    backend, s = state.backend, req.sampling
    created = P.now()
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    submit = getattr(backend, "submit_chat", None)   # a non-blocking entry (tep.engine)
    for j in range(s.n):
        rj = req.for_choice(j)
        if s.max_tokens == 0:
            bridge.start(j, lambda on_delta, on_role, rj=rj: ChatStreamSink(rj.sampling,
                                                                            cancel=cancel),
                         lambda sink: None)
            continue
        make = (lambda on_delta, on_role, rj=rj: ChatStreamSink(
            rj.sampling, cancel=cancel, on_delta=on_delta, on_role=on_role,
            token_text=token_text))
        if submit is not None:
            bridge.start_submitted(j, make, lambda sink, done, rj=rj: submit(rj, sink, done))
            continue
        bridge.start(j, make, lambda sink, rj=rj: backend.chat_completion_stream(rj, sink))
    it, first = await _first_event(bridge, _deadline(state))
    usage_null = {"usage": None} if s.include_usage else {}
    role_sent = [False] * s.n
    want_steps = s.logprobs is not None and state.events.enabled

    def payload(j: int, delta: dict, lp: Any, finish: str | None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": req.model,
                "choices": [{"index": j, "delta": delta, "logprobs": lp,
                             "finish_reason": finish}], **usage_null}

    def chunk(j: int, delta: dict, lps: list | None, finish: str | None) -> bytes:
        lp = P.chat_logprobs(lps) if (s.logprobs is not None and lps is not None) else None
        return sse(payload(j, delta, lp, finish))

    # the common chunk (a token's text, no logprobs) from a template
    plain = None if s.logprobs is not None else sse_text_template(
        lambda j, text: payload(j, {"content": text}, None, None))

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
                    yield plain(j, ev[2]) if plain is not None else \
                        chunk(j, {"content": ev[2]}, ev[3], None)
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
            release(state, cancel)
            for j2, sink in list(bridge.sinks.items()):
                if j2 not in finished:
                    completion_tokens += sink.n_tokens
                    prompt_tokens = max(prompt_tokens, sink.prompt_tokens or 0)
            rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens

    return _stream_reply(gen(), bridge)
