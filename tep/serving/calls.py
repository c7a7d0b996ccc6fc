"""What every inference route does around its backend calls: check the model, take an
admission slot, run backend code in the worker pool, map its failures, bound the
generation time, and give the slot back.

Metadata methods of the backend (``list_models``, ``supports_*``,
``embedding_dimensions``) are called on the event loop and must be cheap; everything
that computes (generation, embeddings, tokenize, detokenize) runs in the worker pool.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from tep import errors as E
from tep.backend import Backend, Completion, StreamSink, TokenLogprob
from tep.backend.sampling import Sampling
from tep.obs.telemetry import RequestRecord
from tep.serving.admission import QueueFull
from tep.serving.bridge import run_blocking
from tep.serving.state import ServerState

__all__ = ["check_model", "backend_failure", "call", "admit", "release", "deadline",
           "gather_choices", "tokenize_all", "check_max_tokens", "step_recorder", "replay", "echo_parts", "TOKEN_IDS_ONLY", "submitted", "submit_choice", "parse_structure",
           "max_tokens_limit", "fingerprint"]

log = logging.getLogger("tep.server")

TOKEN_IDS_ONLY = ("this server takes token IDs: the backend has no tokenize hook, so "
                  "'{param}' must be a list of integer token IDs")

# A cut-off non-streamed generation whose backend ignores the cancel flag is given up on
# this long after the generation timeout (its choice then comes back empty).
_TIMEOUT_GRACE_S = 2.0


def check_model(state: ServerState, model: str) -> None:
    """404 unless the backend lists ``model``."""
    if model not in state.backend.list_models():
        raise E.NotFoundError(f"The model '{model}' does not exist", param="model",
                              code="model_not_found")


def max_tokens_limit(state: ServerState, model: str) -> int:
    """The most tokens one request may ask for: the server's ``max_tokens_limit`` if
    set, else the backend's context size for ``model`` if it knows one, else the
    built-in default."""
    if state.config.max_tokens_limit > 0:
        return state.config.max_tokens_limit
    ctx = state.backend.context_size(model)
    return int(ctx) if ctx else state.config.DEFAULT_MAX_TOKENS_LIMIT


def check_max_tokens(state: ServerState, model: str, value: int, param: str) -> None:
    """400 when a request asks for more tokens than :func:`max_tokens_limit` allows."""
    limit = max_tokens_limit(state, model)
    if value > limit:
        raise E.BadRequestError(f"'{param}' must be <= {limit} (this server's limit for one "
                                f"request to '{model}'), got {value}", param=param)


def step_recorder(state: ServerState, rid: str, n_choices: int, logprobs: int | None):
    """A per-delta callback writing ``step`` run events, or None when none are written."""
    if logprobs is None or not state.events.enabled:
        return None
    counts = [0] * n_choices

    def record(k: int, entries: list) -> None:
        counts[k] += state.events.steps(rid, k, counts[k], entries)

    return record


def parse_structure(state: ServerState, body: dict, endpoint: str) -> Any:
    """The request's constraint and tools (:class:`tep.structured.Structured`), validated;
    400 naming the field when the backend cannot honour a constraint (never ignored)."""
    from tep.structured import parse_structured, unsupported

    structured = parse_structured(body, endpoint)  # type: ignore[arg-type]
    if structured.constraint is not None and not state.backend.supports_constraints():
        unsupported(structured)
    return structured


def backend_failure(exc: BaseException, what: str, rid: str | None) -> E.APIError:
    """Map an exception from backend code; log unexpected ones with the request ID."""
    if isinstance(exc, E.APIError):
        return exc
    rid = rid or "?"
    log.error("request %s: backend error during %s", rid, what,
              exc_info=(type(exc), exc, exc.__traceback__))
    return E.InternalServerError(f"The backend failed while handling request {rid}")


async def call(state: ServerState, rid: str | None, cancel: threading.Event, what: str,
               fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in the worker pool; failures become API errors."""
    try:
        return await run_blocking(state.pool(), cancel, fn, *args)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise backend_failure(e, what, rid) from None


async def submitted(rid: str | None, cancel: threading.Event, what: str,
                    start: Callable[[Callable], None]) -> Any:
    """Await a backend's non-blocking entry (:class:`tep.engine.EngineBackend`):
    ``start(on_done)`` queues the work and the backend's thread calls ``on_done(exc)``
    (or ``on_done(value, exc)``) when it is done. No worker thread waits; a cancelled
    await sets ``cancel``."""
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
        raise backend_failure(e, what, rid) from None


async def submit_choice(rid: str, cancel: threading.Event, what: str, sink: StreamSink,
                        start: Callable[[StreamSink, Callable], None]) -> Completion:
    """One choice through a non-blocking backend entry, collected into a Completion."""
    await submitted(rid, cancel, what, lambda done: start(sink, done))
    return sink.result()


async def admit(state: ServerState, rec: RequestRecord) -> threading.Event:
    """Wait for an admission slot (429 when the queue is full) and return the request's
    cancel flag; :func:`release` with that flag gives the slot back. While the server
    shuts down, 503."""
    if state.draining:
        rec.outcome = "rejected"
        raise E.ServiceUnavailableError("The server is shutting down; retry the request")
    try:
        await state.admission.acquire()
    except QueueFull:
        rec.outcome = "rejected"
        raise E.RateLimitError(
            f"The server is at capacity ({state.admission.max_running} running, "
            f"{state.config.max_queue} waiting); retry after {state.config.retry_after}s",
            retry_after=state.config.retry_after) from None
    except asyncio.CancelledError:
        rec.outcome = "dropped"  # the client left while waiting: the backend never ran
        raise
    except E.ServiceUnavailableError:
        rec.outcome = "rejected"  # still waiting when the shutdown ran out of time
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


def deadline(state: ServerState) -> float | None:
    """The loop time at which the request's generation is cut (None = never)."""
    t = state.config.generation_timeout
    return asyncio.get_running_loop().time() + t if t > 0 else None


async def gather_choices(state: ServerState, rec: RequestRecord, cancel: threading.Event,
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


def tokenize_all(backend: Backend, model: str, items: list) -> list[list[int]]:
    """Token IDs for each prompt/input (text through the backend's tokenizer)."""
    return [[int(t) for t in backend.tokenize(model, it)] if isinstance(it, str) else it
            for it in items]


def replay(sampling: Sampling, c: Completion, sink_cls: type = StreamSink,
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


def echo_parts(backend: Backend, model: str, prompt: str | list[int], ids: list[int],
               top_n: int | None) -> tuple[str, list[TokenLogprob]]:
    """The echoed prompt text and (when logprobs are on, ``top_n`` not None) its logprob
    entries from the backend's :meth:`~tep.Backend.prompt_logprobs` (only the first
    token's logprob is null)."""
    text = prompt if isinstance(prompt, str) else backend.detokenize(model, ids)
    entries: list[TokenLogprob] = []
    if top_n is not None:
        entries = list(backend.prompt_logprobs(model, ids, top_n))
        if len(entries) != len(ids) or any(e.logprob is None for e in entries[1:]):
            raise ValueError(f"prompt_logprobs gave {len(entries)} entries for {len(ids)} "
                             "tokens, or a null logprob after the first")
        off = 0
        for e in entries:
            e.text_offset = off
            off += len(e.token)
    return text, entries


def fingerprint(state: ServerState, model: str) -> str | None:
    """The answer's ``system_fingerprint`` (the backend's, computed once; None when it
    has none or its hook fails, which is logged and never fails the request)."""
    try:
        fp = state.backend.fingerprint(model)
    except Exception:  # noqa: BLE001 - a metadata hook must not fail an answer
        log.exception("the backend's fingerprint() failed")
        return None
    return fp if isinstance(fp, str) else None
