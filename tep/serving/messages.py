"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` (Anthropic's Messages
API) over the one chat path.

The body is translated into a chat request (:mod:`tep.wire.messages`), validated and run
by :mod:`tep.serving.chat` (same template, sampling, tool-call grammar and parser), and
the answer rendered in Anthropic's shapes. Streams go through the one stream driver with
:class:`MessageEvents` as the renderer: ``message_start``, ``ping``, per block
``content_block_start`` / ``content_block_delta`` (``text_delta`` or
``input_json_delta``) / ``content_block_stop``, then ``message_delta`` (stop reason and
usage) and ``message_stop``; a failure after the start is an ``error`` event.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Iterable

from tep import errors as E
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving.chat import calls_tools, prepare_chat, run_chat, stream_chat
from tep.serving.replies import Reply, StreamReply, json_reply
from tep.serving.sse import sse_event
from tep.serving.state import ServerState
from tep.serving.stream import ChunkRenderer
from tep.serving.tokenize import chat_prompt_ids, run_text_job
from tep.structured.tool_calls import ContentDelta, ToolCallStream
from tep.wire.messages import (MessagesRequest, anthropic_error_body, content_blocks,
                               message_answer, new_message_id, parse_messages_request,
                               rename_param, stop_reason, tool_use_id)
from tep.wire.values import parse_json_body

__all__ = ["messages", "count_tokens", "MessageEvents", "text_delta_event"]


async def _prepare(state: ServerState, rec: RequestRecord, mreq: MessagesRequest, rid: str) -> Any:
    try:
        return await prepare_chat(state, rec, mreq.chat, rid)
    except E.BadRequestError as e:
        raise rename_param(e, mreq) from None


async def messages(state: ServerState, rec: RequestRecord,
                   read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/messages``."""
    if not state.backend.supports_chat():
        raise E.NotSupportedError("This backend does not support chat (messages)",
                                  code="chat_not_supported")
    rid = rec.request_id = new_message_id()
    mreq = parse_messages_request(parse_json_body(await read_body()), rid)
    req = await _prepare(state, rec, mreq, rid)
    cancel = await C.admit(state, rec)
    try:
        if mreq.stream:
            return await stream_chat(state, rec, req, rid, cancel,
                                     MessageEvents(req, rid, calls_tools(req)))
        out = await run_chat(state, rec, req, rid, cancel)
    except E.BadRequestError as e:
        C.release(state, cancel)
        raise rename_param(e, mreq) from None
    except BaseException:
        C.release(state, cancel)
        raise
    ch = out.choices[0]
    c = ch.completion
    text, calls = c.text, []
    if ch.tool_calls is not None:   # the reply parsed by the chat path's tool-call parser
        text, calls = ch.tool_calls.content, ch.tool_calls.tool_calls
    reason = stop_reason(c.finish_reason, bool(calls), c.stop_sequence)
    return json_reply(message_answer(
        rid, req.model, content_blocks(text, calls), reason,
        c.stop_sequence if reason == "stop_sequence" else None,
        out.prompt_tokens, out.completion_tokens))


async def count_tokens(state: ServerState, rec: RequestRecord,
                       read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``, the length of the
    prompt the same body would generate from (template, system prompt and tools
    included)."""
    backend = state.backend
    if not (backend.supports_chat() and backend.supports_chat_template()
            and backend.supports_tokenize()):
        raise E.NotSupportedError("This backend cannot count chat prompt tokens (it needs "
                                  "a chat template and a tokenizer)",
                                  code="chat_template_not_supported")
    rid = rec.request_id or ""
    mreq = parse_messages_request(parse_json_body(await read_body()), rid, count_only=True)
    req = await _prepare(state, rec, mreq, rid)
    try:
        ids = await run_text_job(state, rec, "count_tokens",
                                 lambda: chat_prompt_ids(backend, req))
    except E.BadRequestError as e:
        raise rename_param(e, mreq) from None
    rec.prompt_tokens = len(ids)
    return json_reply({"input_tokens": len(ids)})


# The per-token event, the one every stream sends most, from bytes around the two values
# (the same bytes as sse_event("content_block_delta", {...}) without a dict and a dumps).
_TD_PRE = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TD_MID = b',"delta":{"type":"text_delta","text":'
_TD_POST = b"}}\n\n"
_encode_str = json.encoder.encode_basestring  # json.dumps(str, ensure_ascii=False)


def text_delta_event(index: int, text: str) -> bytes:
    """``content_block_delta`` with a ``text_delta`` for block ``index``."""
    return b"".join((_TD_PRE, str(index).encode(), _TD_MID, _encode_str(text).encode(),
                     _TD_POST))


class MessageEvents(ChunkRenderer):
    """Anthropic's stream events for one reply (see the module docstring).

    Content blocks are opened as the text calls for them: plain text goes into a text
    block; with tools, the text runs through the same tool-call parser as chat, and each
    call becomes a ``tool_use`` block whose ``input`` arrives as ``input_json_delta``
    pieces of the arguments JSON. A reply with no content at all still gets one empty
    text block, as the non-streamed answer does."""

    n_choices = 1

    def __init__(self, req: Any, rid: str, tools: bool) -> None:
        self.req, self.rid = req, rid
        self._calls = ToolCallStream() if tools else None
        self._started = False
        self._open: str | None = None   # kind of the open block ("text" | "tool_use")
        self._index = -1                # index of the last block opened
        self._made_calls = False
        self._reason = "end_turn"
        self._stop: str | None = None
        self._sinks: dict = {}

    # ---- helpers
    def _start(self) -> list[bytes]:
        """``message_start`` and a ``ping``, before the first block. Sent with the first
        backend event, when the prompt has been tokenized (its length is also repeated in
        ``message_delta``, which the client's accumulator reads last)."""
        if self._started:
            return []
        self._started = True
        sink = self._sinks.get(0)
        n = (sink.prompt_tokens or 0) if sink is not None else 0
        msg = message_answer(self.rid, self.req.model, [], None, None, n, 0)
        return [sse_event("message_start", {"type": "message_start", "message": msg}),
                sse_event("ping", {"type": "ping"})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [sse_event("content_block_stop", {"type": "content_block_stop",
                                                 "index": self._index})]

    def _open_block(self, block: dict) -> list[bytes]:
        out = self._close()
        self._index += 1
        self._open = block["type"]
        out.append(sse_event("content_block_start", {"type": "content_block_start",
                                                     "index": self._index,
                                                     "content_block": block}))
        return out

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        out = [] if self._open == "text" else self._open_block({"type": "text", "text": ""})
        out.append(text_delta_event(self._index, text))
        return out

    def _deltas(self, deltas: list) -> list[bytes]:
        out: list[bytes] = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                out += self._text(d.text)
            elif d.id is not None:          # a new call: its own tool_use block
                self._made_calls = True
                out += self._open_block({"type": "tool_use", "id": tool_use_id(d.id),
                                         "name": d.name, "input": {}})
                if d.arguments:
                    out += self._args(d.arguments)
            else:
                out += self._args(d.arguments)
        return out

    def _args(self, piece: str) -> list[bytes]:
        if not piece:
            return []
        return [sse_event("content_block_delta", {
            "type": "content_block_delta", "index": self._index,
            "delta": {"type": "input_json_delta", "partial_json": piece}})]

    # ---- the renderer
    def bind(self, sinks: dict) -> None:
        self._sinks = sinks

    def role(self, index: int, role: str) -> Iterable[bytes]:
        return self._start()

    def delta(self, index: int, text: str, logprobs: list | None) -> Iterable[bytes]:
        out = self._start()
        if self._calls is not None:
            return out + self._deltas(self._calls.feed(text))
        return out + self._text(text)

    def finish(self, index: int, reason: str) -> Iterable[bytes]:
        out = self._start()
        if self._calls is not None:
            out += self._deltas(self._calls.finish())
        if self._index < 0:                 # nothing at all: one empty text block
            out += self._open_block({"type": "text", "text": ""})
        out += self._close()
        sink = self._sinks.get(index)
        stop = sink.stop_sequence if sink is not None else None
        self._reason = stop_reason(reason, self._made_calls, stop)
        self._stop = stop if self._reason == "stop_sequence" else None
        return out

    def done(self, prompt_tokens: int, completion_tokens: int) -> Iterable[bytes]:
        return [*self._start(), sse_event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._reason, "stop_sequence": self._stop},
                    "usage": {"input_tokens": prompt_tokens,
                              "output_tokens": completion_tokens}}),
                sse_event("message_stop", {"type": "message_stop"})]

    def error(self, err: E.APIError) -> Iterable[bytes]:
        # an error event may come before any other (the client still raises on it)
        return [sse_event("error", anthropic_error_body(err, self.rid))]
