"""Request preparation that computes, kept off the event loop.

Compiling a grammar (a JSON schema with hundreds of properties takes tens of milliseconds,
a pathological regex seconds) and rendering a chat template are CPU work: on the event loop
they would stall every stream the server is sending. They run in the server's preparation
pool instead (``ServerState.prep_pool``, a few threads beside the backend pool, so they
never wait behind a running generation), and a grammar compile that takes longer than ``ServerConfig.grammar_compile_timeout`` is a
400 naming the field (the compile thread finishes in the background; llguidance's own
limits bound it).

For an engine backend (:class:`tep.engine.EngineBackend`) the handlers ask
:func:`chat_submitter` / :func:`prepared_constraints` for everything the engine needs, so
the non-blocking ``submit`` they then call on the loop only queues.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from tep import errors as E
from tep.serving import calls as C
from tep.serving.bridge import run_blocking
from tep.serving.state import ServerState

__all__ = ["parse_structure", "prepared_constraints", "chat_submitter", "compile_budgeted"]

# Every body field tep.structured reads (the field table is their one source).
def _structured_names() -> tuple[str, ...]:
    from tep.wire.fields import CONSTRAINT_FIELDS, TOOL_FIELDS

    return tuple(f.name for f in CONSTRAINT_FIELDS + TOOL_FIELDS)


_NAMES = _structured_names()


async def compile_budgeted(state: ServerState, param: str, fn: Callable[..., Any],
                           *args: Any) -> Any:
    """``fn(*args)`` in the worker pool within the server's grammar compile budget; past
    it, a 400 naming ``param``. API errors from ``fn`` pass through; anything else is a
    500 (a bug, logged)."""
    budget = state.config.grammar_compile_timeout
    job = run_blocking(state.prep_pool(), threading.Event(), fn, *args)
    try:
        return await (asyncio.wait_for(job, budget) if budget > 0 else job)
    except asyncio.TimeoutError:
        raise E.BadRequestError(
            f"compiling '{param}' took longer than this server's limit of {budget:g} s; "
            "simplify it", param=param, code="grammar_too_complex") from None
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - mapped like every backend failure
        raise C.backend_failure(e, "grammar compile", None) from None


async def parse_structure(state: ServerState, body: dict, endpoint: str) -> Any:
    """:func:`tep.serving.calls.parse_structure` in the worker pool (it compiles the
    grammar once to validate it), within the compile budget. A body without structured
    fields is parsed here at once (nothing to compile)."""
    present = [f for f in _NAMES if body.get(f) is not None]
    if not present:
        return C.parse_structure(state, body, endpoint)
    return await compile_budgeted(state, present[0], C.parse_structure, state, body,
                                  endpoint)


def _constraints(backend: Any, spec: Any, count: int) -> list:
    first = backend.make_constraint(spec)
    return [first] + [first.copy() for _ in range(count - 1)]


async def prepared_constraints(state: ServerState, spec: Any, count: int) -> list | None:
    """``count`` fresh matchers for ``spec`` (one compile, copied), built and probed in
    the worker pool within the compile budget; None without a constraint or when the
    backend builds its own (it has no ``make_constraint``)."""
    make = getattr(state.backend, "make_constraint", None)
    if spec is None or make is None or count < 1:
        return None
    return await compile_budgeted(state, spec.param, _constraints, state.backend, spec,
                                  count)


async def _prepared_chat(state: ServerState, rid: str, cancel: threading.Event,
                         prepare: Callable[[Any], Any], req: Any) -> Any:
    try:
        return await run_blocking(state.prep_pool(), cancel, prepare, req)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - mapped like every backend failure
        raise C.backend_failure(e, "chat template", rid) from None


async def chat_submitter(state: ServerState, req: Any, rid: str,
                         cancel: threading.Event) -> Callable | None:
    """The ``submit(req_for_choice, sink, on_done)`` the chat handler calls per choice,
    or None for a backend without a non-blocking entry.

    For an engine backend (``prepare_chat``), the template is rendered and the grammar
    compiled here, in the worker pool (concurrently), and ``req.sampling.max_tokens`` is
    settled before the handler makes its sinks; the returned function only queues."""
    backend = state.backend
    prepare = getattr(backend, "prepare_chat", None)
    if prepare is None or req.sampling.max_tokens == 0:
        return getattr(backend, "submit_chat", None)
    spec = req.structured.constraint if req.structured is not None else None
    prep, cons = await asyncio.gather(
        _prepared_chat(state, rid, cancel, prepare, req),
        prepared_constraints(state, spec, req.wire.n))
    req.sampling.max_tokens = prep.max_tokens

    def submit(rj: Any, sink: Any, on_done: Callable) -> None:
        sink.prompt_tokens = len(prep.token_ids)
        backend.submit(rj.model, prep.token_ids, rj.sampling, sink, on_done,
                       constraint=cons[rj.choice_index] if cons else None)

    return submit
