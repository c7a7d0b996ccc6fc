"""``POST /v1/chat/completions``: parse, admit, run one backend call per choice, answer
JSON or stream ``chat.completion.chunk`` deltas."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from tep import errors as E
from tep.backend import ChatStreamSink, Completion
from tep.backend.interface import _overrides
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving import prepare as P
from tep.serving.bridge import StreamBridge
from tep.serving.replies import Reply, StreamReply, json_reply
from tep.serving.sse import sse, sse_text_template
from tep.serving.state import ServerState
from tep.serving.stream import ChunkRenderer, first_event, stream_reply
from tep.wire.chat import ChatRequest, parse_chat_request
from tep.wire.shapes import chat_logprobs, new_id, now, usage
from tep.structured.tool_calls import (ToolCallStream, chunk_deltas, finish_reason,
                                       parse_tool_calls)
from tep.wire.values import parse_json_body

__all__ = ["chat", "prepare_chat", "run_chat", "stream_chat", "ChatChoice", "ChatOutcome",
           "calls_tools"]


async def chat(state: ServerState, rec: RequestRecord,
               read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/chat/completions``."""
    rid = rec.request_id = new_id("chatcmpl")
    body = parse_json_body(await read_body())
    req = await prepare_chat(state, rec, body, rid)
    cancel = await C.admit(state, rec)
    try:
        if req.stream:
            return await stream_chat(state, rec, req, rid, cancel,
                                     _Chunks(req, rid, C.fingerprint(state, req.model)))
        out = await run_chat(state, rec, req, rid, cancel)
    except BaseException:
        C.release(state, cancel)
        raise
    s = req.sampling
    choices = [{
        "index": j,
        "message": ch.message,
        "logprobs": chat_logprobs(ch.completion.logprobs or []) if s.logprobs is not None
        else None,
        "finish_reason": ch.finish_reason,
    } for j, ch in enumerate(out.choices)]
    return json_reply({"id": rid, "object": "chat.completion", "created": now(),
                       "model": req.model,
                       "system_fingerprint": C.fingerprint(state, req.model),
                       "choices": choices,
                       "usage": usage(out.prompt_tokens, out.completion_tokens)})


async def prepare_chat(state: ServerState, rec: RequestRecord, body: dict, rid: str,
                 endpoint: str = "chat") -> ChatRequest:
    """A chat-completions-shaped ``body`` validated into the one request model (400s name
    the field): the model exists, the constraint and tools parse, ``max_tokens`` is
    within the limit. The Responses and Messages APIs translate their bodies into this
    shape and come through here too."""
    if not state.backend.supports_chat():
        raise E.NotSupportedError("This backend does not support chat completions",
                                  param=None, code="chat_not_supported")
    req = parse_chat_request(body, rid, default_max_tokens=state.config.chat_max_tokens)
    rec.model, rec.sampling = req.model, req.sampling
    C.check_model(state, req.model)
    req.structured = await P.parse_structure(state, body, endpoint)
    if body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None:
        C.check_max_tokens(state, req.model, req.sampling.max_tokens,
                           "max_completion_tokens" if body.get("max_completion_tokens")
                           is not None else "max_tokens")
    else:  # the server's default answer length, within the model's limit
        req.sampling.max_tokens = min(req.sampling.max_tokens,
                                      C.max_tokens_limit(state, req.model))
    return req


@dataclass
class ChatChoice:
    """One finished choice: the backend's completion, the assistant message (``content``
    and, with tools, ``tool_calls`` parsed out of the text) and the finish reason
    (``stop``, ``length`` or ``tool_calls``)."""

    completion: Completion
    message: dict
    finish_reason: str
    tool_calls: Any = None  # the parsed calls (tep.structured.tool_calls), or None


@dataclass
class ChatOutcome:
    """A non-streamed chat generation: its choices and token counts."""

    choices: list[ChatChoice]
    prompt_tokens: int
    completion_tokens: int


async def run_chat(state: ServerState, rec: RequestRecord, req: ChatRequest, rid: str,
                   cancel: threading.Event) -> ChatOutcome:
    """Generate every choice of an admitted chat request (the one generation path of chat
    completions, Responses and Messages) and give its slot back."""
    backend, s = state.backend, req.sampling
    submit = await P.chat_submitter(state, req, rid, cancel)   # a non-blocking entry
    own = submit is None and _overrides(backend, "chat_completion")
    token_text = backend._token_text_fn(req.model)
    try:
        jobs = []
        for j in range(req.wire.n):
            if s.max_tokens == 0:
                jobs.append(asyncio.sleep(0, Completion(finish_reason="length", prompt_tokens=0)))
            elif submit is not None:
                rj = req.for_choice(j)
                jobs.append(C.submit_choice(
                    rid, cancel, "chat completion",
                    ChatStreamSink(rj.sampling, cancel=cancel, token_text=token_text),
                    lambda sink, done, rj=rj: submit(rj, sink, done)))
            else:
                jobs.append(C.call(state, rid, cancel, "chat completion",
                                   backend.chat_completion, req.for_choice(j)))
        results, cut = await C.gather_choices(state, rec, cancel, jobs)
    finally:
        C.release(state, cancel)
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for j, c in enumerate(results):
        if own:
            c = C.replay(s, c, ChatStreamSink, token_text)
        if cut[j]:
            c.finish_reason = "length"
        if s.logprobs is not None and state.events.enabled:
            state.events.steps(rid, j, 0, c.logprobs or [])
        completion_tokens += c.completion_tokens if c.completion_tokens is not None \
            else len(c.token_ids)
        prompt_tokens = max(prompt_tokens, c.prompt_tokens or 0)
        message, finish, parsed = {"role": "assistant", "content": c.text}, c.finish_reason, None
        if calls_tools(req):
            parsed = parse_tool_calls(c.text)
            message, finish = parsed.message(), finish_reason(c.finish_reason, parsed)
        choices.append(ChatChoice(c, message, finish, parsed))
    rec.prompt_tokens, rec.completion_tokens = prompt_tokens, completion_tokens
    return ChatOutcome(choices, prompt_tokens, completion_tokens)


def calls_tools(req: ChatRequest) -> bool:
    """Whether the answer may hold tool calls (tools given, ``tool_choice`` not none)."""
    st = req.structured
    return st is not None and st.tools is not None and st.tools.choice != "none"


class _Chunks(ChunkRenderer):
    """``chat.completion.chunk`` deltas: the role once per choice, before its content.
    With tools, each choice's text goes through a tool-call parser and comes out as
    ``content`` and ``tool_calls`` deltas (OpenAI's shape: a call's id, type and name in its
    first delta, then its arguments in pieces), and a reply that made calls finishes with
    ``"tool_calls"``."""

    prompt_tokens = None  # from the backend's finish events

    def __init__(self, req: ChatRequest, rid: str, fingerprint: str | None = None) -> None:
        self.req, self.rid, self.created = req, rid, now()
        self.fingerprint = fingerprint
        self.n_choices = req.wire.n
        self.include_usage = req.wire.include_usage
        self._usage_null = {"usage": None} if self.include_usage else {}
        self._want_lp = req.sampling.logprobs is not None
        self._role_sent = [False] * self.n_choices
        self._calls = [ToolCallStream() for _ in range(self.n_choices)] \
            if calls_tools(req) else None
        # the common chunk (a token's text, no logprobs) from a byte template
        self._plain = None if self._want_lp else sse_text_template(
            lambda j, text: self._payload(j, {"content": text}, None, None))

    def _payload(self, j: int, delta: dict, lp: Any, finish: str | None) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.req.model, "system_fingerprint": self.fingerprint,
                "choices": [{"index": j, "delta": delta, "logprobs": lp,
                             "finish_reason": finish}], **self._usage_null}

    def _chunk(self, j: int, delta: dict, lps: list | None, finish: str | None) -> bytes:
        lp = chat_logprobs(lps) if self._want_lp and lps is not None else None
        return sse(self._payload(j, delta, lp, finish))

    def role(self, j: int, role: str = "assistant") -> list[bytes]:
        if self._role_sent[j]:
            return []
        self._role_sent[j] = True
        return [self._chunk(j, {"role": role, "content": ""}, None, None)]

    def delta(self, j: int, text: str, lps: list | None) -> Iterable[bytes]:
        out = self.role(j)
        if self._calls is not None:
            for k, d in enumerate(chunk_deltas(self._calls[j].feed(text))):
                out.append(self._chunk(j, d, lps if k == 0 else None, None))
            return out
        out.append(self._plain(j, text) if self._plain is not None else
                   self._chunk(j, {"content": text}, lps, None))
        return out

    def finish(self, j: int, reason: str) -> Iterable[bytes]:
        out = self.role(j)
        if self._calls is not None:
            parser = self._calls[j]
            for d in chunk_deltas(parser.finish()):
                out.append(self._chunk(j, d, None, None))
            reason = finish_reason(reason, parser)
        out.append(self._chunk(j, {}, None, reason))
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.req.model, "system_fingerprint": self.fingerprint,
                    "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})


async def stream_chat(state: ServerState, rec: RequestRecord, req: ChatRequest, rid: str,
                      cancel: threading.Event, render: ChunkRenderer) -> StreamReply:
    """Start every choice of an admitted chat request and stream it through ``render``
    (chat chunks, Responses events or Messages events: one driver, one renderer per wire
    format). The slot is given back when the stream ends."""
    backend, s = state.backend, req.sampling
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    submit = await P.chat_submitter(state, req, rid, cancel)   # a non-blocking entry
    for j in range(req.wire.n):
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
        else:
            bridge.start(j, make, lambda sink, rj=rj: backend.chat_completion_stream(rj, sink))
    events, first = await first_event(state, bridge, C.deadline(state), "chat completion")
    return stream_reply(state, rec, bridge, events, first, render, "chat completion",
                        C.step_recorder(state, rid, render.n_choices, s.logprobs))
