"""``POST /v1/responses`` and the stored-response routes (``GET``/``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``).

A Responses request is parsed (:mod:`tep.wire.responses`), the conversation it continues
is read back from the store (:mod:`tep.serving.response_store`), and the whole is turned
into a chat body that runs through the one chat path (``prepare_chat`` →
``run_chat``/``stream_chat``). The answer's output items come from
:class:`~tep.wire.responses.OutputBuilder`, fed the generated text; a stream is the same
builder's events, numbered, with the response object around them. With ``store`` the
response is written before its last byte goes out, so a ``previous_response_id`` sent
right after it (to any worker) finds it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from tep import errors as E
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving.chat import prepare_chat, run_chat, stream_chat
from tep.serving.replies import Reply, StreamReply, json_reply
from tep.serving.response_store import StoredResponse
from tep.serving.sse import sse_event, sse_text_template
from tep.serving.state import ServerState
from tep.serving.stream import ChunkRenderer
from tep.wire.chat import ChatRequest
from tep.wire.responses import (OutputBuilder, OutputEvent, ResponsesRequest, chat_body,
                                item_id, parse_responses_request, rename_chat_error,
                                response_object, responses_usage)
from tep.wire.shapes import now
from tep.wire.values import parse_json_body

__all__ = ["responses", "get_response", "delete_response", "list_input_items"]

log = logging.getLogger("tep.server")

_DELTA = "response.output_text.delta"   # the event a stream sends most


def _owner(rec: RequestRecord) -> str:
    """Whose responses these are: the API key's principal ID, ``""`` without keys."""
    return rec.principal_id or ""


def _not_found(rid: str, param: str | None = None) -> E.NotFoundError:
    return E.NotFoundError(f"Response with id '{rid[:200]}' not found.", param=param,
                           code="response_not_found")


async def responses(state: ServerState, rec: RequestRecord,
                    read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/responses``."""
    if not state.backend.supports_chat():
        raise E.NotSupportedError("This backend does not support chat, so it cannot answer "
                                  "/v1/responses", param=None, code="chat_not_supported")
    rid = rec.request_id = item_id("resp")
    body = parse_json_body(await read_body())
    req = parse_responses_request(body, rid)
    history: list[dict] = []
    if req.previous_response_id is not None:
        try:
            found = await state.responses.conversation(
                req.previous_response_id, _owner(rec), max_bytes=state.config.max_body_bytes)
        except OverflowError:
            raise E.BadRequestError(
                f"The conversation of '{req.previous_response_id}' holds more than "
                f"{state.config.max_body_bytes} bytes (the request body limit); start a "
                "new one", param="previous_response_id") from None
        except LookupError as e:
            raise E.NotFoundError(
                f"Response '{e.args[0]}', an earlier turn of the conversation of "
                f"'{req.previous_response_id}', is no longer stored (deleted or pruned)",
                param="previous_response_id", code="response_not_found") from None
        if found is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
        history = found
    body = chat_body(req, history)   # 400s here already name Responses' fields
    try:
        creq = await prepare_chat(state, rec, body, rid)
    except E.APIError as e:
        raise rename_chat_error(e) from None
    cancel = await C.admit(state, rec)
    created = now()
    try:
        if req.stream:
            return await _stream(state, rec, req, creq, rid, created, cancel)
        outcome = await run_chat(state, rec, creq, rid, cancel)
    except BaseException:
        C.release(state, cancel)
        raise
    choice = outcome.choices[0]
    builder = OutputBuilder(req.calls_tools)
    builder.feed(choice.completion.text)
    builder.finish(choice.finish_reason)
    final = _final(req, rid, created, choice.finish_reason, builder.items,
                   outcome.prompt_tokens, outcome.completion_tokens, _keeps(state, req))
    await _save(state, rec, req, final)
    return json_reply(final)


def _keeps(state: ServerState, req: ResponsesRequest) -> bool:
    """Whether this response is to be stored (``store`` and a store that keeps)."""
    return req.store and state.responses.enabled


def _final(req: ResponsesRequest, rid: str, created: int, reason: str, items: list[dict],
           prompt_tokens: int, completion_tokens: int, stored: bool) -> dict:
    return response_object(req, rid, created,
                           status="incomplete" if reason == "length" else "completed",
                           output=items, usage=responses_usage(prompt_tokens,
                                                               completion_tokens),
                           stored=stored)


async def _save(state: ServerState, rec: RequestRecord, req: ResponsesRequest,
                final: dict) -> None:
    """Write the response when it is to be kept; a failed write is logged and the
    answer says ``store: false``."""
    store = state.responses
    if not final["store"]:
        return
    try:
        await store.save(StoredResponse(
            id=final["id"], owner=_owner(rec), previous_id=req.previous_response_id,
            created_at=float(final["created_at"]),
            body={k: v for k, v in final.items() if k != "output"},
            input_items=req.input_items, output_items=final["output"]))
    except Exception as e:  # noqa: BLE001 - the answer stands; it is just not kept
        log.error("responses store %s: could not store %s: %s", store.path, final["id"], e)
        final["store"] = False


class _Events(ChunkRenderer):
    """Responses' typed stream: ``response.created``, ``response.in_progress``, the
    output builder's item/part/delta events, then ``response.completed`` (or
    ``response.incomplete`` at ``max_output_tokens``, ``response.failed`` after a
    failure), each with the next ``sequence_number``. The closing event is held back
    (:attr:`closing`) so it can go out after the response is stored."""

    n_choices = 1

    def __init__(self, req: ResponsesRequest, rid: str, created: int, stored: bool) -> None:
        self.req, self.rid, self.created, self.stored = req, rid, created, stored
        self.seq = 0
        self.builder = OutputBuilder(req.calls_tools)
        self.reason = "stop"
        self.final: dict | None = None      # set by done()
        self._tpl_key: tuple | None = None  # the text-delta byte template's item
        self._tpl: Callable[[int, str], bytes] | None = None

    def _ev(self, etype: str, data: dict) -> bytes:
        if etype == _DELTA and not data["logprobs"]:
            key = (data["item_id"], data["output_index"])
            if key != self._tpl_key:   # one byte template per message item
                self._tpl_key = key
                self._tpl = sse_text_template(
                    lambda n, text: {"type": _DELTA, "sequence_number": n, **data,
                                     "delta": text}, _DELTA)
            if self._tpl is not None:
                self.seq += 1
                return self._tpl(self.seq - 1, data["delta"])
        obj = {"type": etype, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse_event(etype, obj)

    def _events(self, evs: list[OutputEvent]) -> list[bytes]:
        return [self._ev(e.type, e.data) for e in evs]

    def opening(self) -> Iterable[bytes]:
        r = response_object(self.req, self.rid, self.created, status="in_progress",
                            output=[], usage=None, stored=self.stored)
        return [self._ev("response.created", {"response": r}),
                self._ev("response.in_progress", {"response": r})]

    def delta(self, index: int, text: str, logprobs: list | None) -> Iterable[bytes]:
        # the common case, a token of an open message: its byte template, no dicts
        if text and self._tpl is not None and self.builder.open_text() == self._tpl_key:
            self.builder.add_text(text)
            self.seq += 1
            return (self._tpl(self.seq - 1, text),)
        return self._events(self.builder.feed(text))

    def finish(self, index: int, reason: str) -> Iterable[bytes]:
        self.reason = reason
        return self._events(self.builder.finish(reason))

    def done(self, prompt_tokens: int, completion_tokens: int) -> Iterable[bytes]:
        self.final = _final(self.req, self.rid, self.created, self.reason,
                            self.builder.items, prompt_tokens, completion_tokens, self.stored)
        return ()

    def closing(self) -> bytes:
        """The last event: ``response.completed`` or ``response.incomplete``."""
        assert self.final is not None
        kind = "response.incomplete" if self.final["status"] == "incomplete" \
            else "response.completed"
        return self._ev(kind, {"response": self.final})

    def error(self, err: E.APIError) -> Iterable[bytes]:
        r = response_object(self.req, self.rid, self.created, status="failed",
                            output=self.builder.items, usage=None, stored=False,
                            error={"code": err.code or "server_error", "message": err.message})
        return [self._ev("response.failed", {"response": r})]


async def _stream(state: ServerState, rec: RequestRecord, req: ResponsesRequest,
                  creq: ChatRequest, rid: str, created: int,
                  cancel: threading.Event) -> StreamReply:
    render = _Events(req, rid, created, _keeps(state, req))
    reply = await stream_chat(state, rec, creq, rid, cancel, render)
    inner = reply.chunks

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for b in inner:
                yield b
        finally:
            await inner.aclose()  # type: ignore[attr-defined]  # releases the slot
        if render.final is not None:   # the generation ended: store, then close
            await _save(state, rec, req, render.final)
            yield render.closing()

    reply.chunks = chunks()
    return reply


# --------------------------------------------------------------------------- stored

async def get_response(state: ServerState, rec: RequestRecord, response_id: str) -> Reply:
    """``GET /v1/responses/{id}``."""
    r = await state.responses.get(response_id, _owner(rec))
    if r is None:
        raise _not_found(response_id)
    return json_reply(r)


async def delete_response(state: ServerState, rec: RequestRecord, response_id: str) -> Reply:
    """``DELETE /v1/responses/{id}``."""
    if not await state.responses.delete(response_id, _owner(rec)):
        raise _not_found(response_id)
    return json_reply({"id": response_id, "object": "response.deleted", "deleted": True})


_MAX_LIMIT = 100


async def list_input_items(state: ServerState, rec: RequestRecord, response_id: str,
                           args: Any) -> Reply:
    """``GET /v1/responses/{id}/input_items?limit=&order=&after=`` (a list page)."""
    raw_limit = args.get("limit")
    try:
        limit = 20 if raw_limit in (None, "") else int(raw_limit)
    except ValueError:
        limit = -1
    if not 1 <= limit <= _MAX_LIMIT:
        raise E.BadRequestError(f"'limit' must be an integer in [1, {_MAX_LIMIT}]",
                                param="limit")
    order = args.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise E.BadRequestError("'order' must be 'asc' or 'desc'", param="order")
    after = args.get("after") or None
    try:
        page = await state.responses.input_items(response_id, _owner(rec), limit=limit,
                                                 order=order, after=after)
    except KeyError:
        raise E.BadRequestError(f"'after' {after[:200]!r} is not an input item of "
                                f"'{response_id[:200]}'", param="after") from None
    if page is None:
        raise _not_found(response_id)
    data = page.data
    return json_reply({"object": "list", "data": data,
                       "first_id": data[0]["id"] if data else None,
                       "last_id": data[-1]["id"] if data else None,
                       "has_more": page.has_more})
