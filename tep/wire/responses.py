"""``POST /v1/responses`` (OpenAI's Responses API): the request parser and the answer's
renderer, pure functions over the chat request model.

A Responses body is validated here (400s name Responses' own fields), its input items are
normalised (each gets an ``id``, string content becomes one text part) and, together with
the stored conversation it continues, translated field by field into a chat-completions
body (:func:`chat_body`; the table is in docs/WIRE.md). The server then runs that body
through the one chat path. On the way back, :class:`OutputBuilder` turns the generated
text into output items — ``message`` items with one ``output_text`` part, and
``function_call`` items when tools are on — as typed :class:`OutputEvent` values, the same
way for a whole text and for streamed pieces, so a stream assembles to the non-streamed
answer.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from tep.errors import APIError, BadRequestError
from tep.structured.tool_calls import ContentDelta, ToolCallDelta, ToolCallStream
from tep.wire.values import is_int, log_unknown

__all__ = ["ResponsesRequest", "parse_responses_request", "chat_body", "OutputEvent",
           "OutputBuilder", "response_object", "responses_usage", "rename_chat_error",
           "item_id", "request_schema", "RESPONSES_FIELDS", "MAX_METADATA"]

# Sampling knobs a Responses body may carry (tep extensions besides temperature/top_p),
# passed to the chat body unchanged; the chat parser validates them.
_KNOBS = ("temperature", "top_p", "seed", "top_k", "min_p", "stop", "stop_token_ids",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
          "allowed_token_ids", "user")
RESPONSES_FIELDS = ("model", "input", "instructions", "previous_response_id", "store",
                    "stream", "max_output_tokens", "tools", "tool_choice",
                    "parallel_tool_calls", "text", "metadata", "truncation", "background",
                    "include", "reasoning", "conversation", "prompt", "service_tier",
                    "stream_options", "max_tool_calls", "prompt_cache_key",
                    "safety_identifier", "top_logprobs", *_KNOBS)
MAX_METADATA = 16            # OpenAI's bounds: 16 pairs, keys <= 64 chars, values <= 512
_ROLES = ("user", "system", "developer", "assistant")

_ids = random.Random()


def item_id(prefix: str) -> str:
    """``prefix_<32 hex>`` (``resp_``, ``msg_``, ``fc_``, ...): unique, not secret."""
    return f"{prefix}_{_ids.getrandbits(128):032x}"


def request_schema() -> dict:
    """The JSON Schema of a Responses body, for ``/openapi.json`` (the knobs' ranges come
    from the field table, :mod:`tep.wire.fields`)."""
    from tep.wire.fields import F, schema_of

    text_part = {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["input_text", "output_text", "refusal"]}, "text": {"type": "string"}}}
    item = {"type": "object", "properties": {
        "type": {"enum": ["message", "function_call", "function_call_output"]},
        "role": {"enum": list(_ROLES)},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
        "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string"}, "output": {"type": "string"}}}
    tool = {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "function"}, "name": {"type": "string"},
        "description": {"type": "string"}, "parameters": {"type": "object"},
        "strict": {"type": "boolean"}}}
    fmt = {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "name": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": "boolean"}}}
    props: dict = {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": item}]},
        "instructions": {"type": ["string", "null"]},
        "previous_response_id": {"type": ["string", "null"]},
        "store": {"type": ["boolean", "null"]}, "stream": {"type": ["boolean", "null"]},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "tools": {"type": "array", "items": tool},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"],
            "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "text": {"type": "object", "properties": {"format": fmt}},
        "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA,
                     "additionalProperties": {"type": "string", "maxLength": 512}},
        "truncation": {"enum": ["disabled", None]},
    }
    for k in _KNOBS:
        props[k] = schema_of(getattr(F, k))
    return {"type": "object", "required": ["model"], "properties": props}


def _bad(msg: str, param: str | None, code: str = "invalid_value") -> BadRequestError:
    return BadRequestError(msg, param=param, code=code)


@dataclass
class ResponsesRequest:
    """A validated Responses body.

    Attributes:
        model: the model ID.
        input_items: this request's own input items, normalised, each with an ``id``.
        instructions: the system text for this turn only (not carried to the next).
        previous_response_id: the stored response this one continues, or None.
        store: keep the response (and its input) in the store.
        stream: answer with server-sent events.
        max_output_tokens: most tokens to generate (None = the server's default).
        tools: the function tools in Responses' flat shape, as given (echoed back).
        tool_choice: as given (``"auto"`` when absent).
        parallel_tool_calls: more than one call allowed.
        text_format: ``{"type": "text" | "json_object" | "json_schema", ...}``.
        metadata: up to 16 string pairs, echoed.
        raw: the whole body (the sampling knobs are read from it).
    """

    model: str
    input_items: list[dict]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = None
    tools: list[dict] = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text_format: dict = field(default_factory=lambda: {"type": "text"})
    metadata: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold function calls."""
        return bool(self.tools) and self.tool_choice != "none"


# --------------------------------------------------------------------------- parsing

def _opt(body: dict, name: str, kind: type | tuple, what: str) -> Any:
    v = body.get(name)
    if v is not None and (not isinstance(v, kind) or
                          (kind is not bool and isinstance(v, bool))):
        raise _bad(f"'{name}' must be {what}", name, "invalid_type")
    return v


def _text_parts(i: int, role: str, content: Any) -> list[dict]:
    """A message's content as a list of text parts (``input_text``, or ``output_text``
    for the assistant)."""
    p = f"input[{i}].content"
    want = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part = {"type": want, "text": content}
        return [{**part, "annotations": []} if want == "output_text" else part]
    if not isinstance(content, list):
        raise _bad(f"'{p}' must be a string or a list of content parts", p, "invalid_type")
    allowed = ("output_text", "refusal") if role == "assistant" else ("input_text",)
    out = []
    for j, part in enumerate(content):
        pj = f"{p}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"'{pj}' must be an object", pj, "invalid_type")
        t = part.get("type")
        if t not in allowed:
            extra = " (this server takes text only)" if t in (
                "input_image", "input_file", "input_audio") else ""
            raise _bad(f"'{pj}.type' must be {' or '.join(map(repr, allowed))} in a "
                       f"{role} message, got {json.dumps(t)[:40]}{extra}", f"{pj}.type")
        key = "refusal" if t == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise _bad(f"'{pj}.{key}' must be a string", f"{pj}.{key}", "invalid_type")
        out.append({"type": t, key: part[key], **(
            {"annotations": []} if t == "output_text" else {})})
    return out


def _normalise_item(i: int, it: Any) -> dict:
    """One input item, checked and given an ``id``."""
    p = f"input[{i}]"
    if not isinstance(it, dict):
        raise _bad(f"'{p}' must be an object", p, "invalid_type")
    t = it.get("type", "message" if "role" in it else None)
    iid = it.get("id")
    if iid is not None and (not isinstance(iid, str) or not 0 < len(iid) <= 128):
        raise _bad(f"'{p}.id' must be a string of 1-128 characters", f"{p}.id")
    if t == "message":
        role = it.get("role")
        if role not in _ROLES:
            raise _bad(f"'{p}.role' must be one of {', '.join(_ROLES)}, got "
                       f"{json.dumps(role)[:40]}", f"{p}.role")
        return {"type": "message", "id": iid or item_id("msg"), "role": role,
                "content": _text_parts(i, role, it.get("content")), "status": "completed"}
    if t == "function_call":
        for k in ("call_id", "name", "arguments"):
            if not isinstance(it.get(k), str) or (k != "arguments" and not it[k]):
                raise _bad(f"'{p}.{k}' must be a{' non-empty' if k != 'arguments' else ''} "
                           "string", f"{p}.{k}", "invalid_type")
        return {"type": "function_call", "id": iid or item_id("fc"), "call_id": it["call_id"],
                "name": it["name"], "arguments": it["arguments"], "status": "completed"}
    if t == "function_call_output":
        if not isinstance(it.get("call_id"), str) or not it["call_id"]:
            raise _bad(f"'{p}.call_id' must be a non-empty string", f"{p}.call_id",
                       "invalid_type")
        out = it.get("output")
        if isinstance(out, list):   # a list of input_text parts
            out = "".join(q["text"] for q in _text_parts(i, "user", out))
        elif not isinstance(out, str):
            raise _bad(f"'{p}.output' must be a string or a list of input_text parts",
                       f"{p}.output", "invalid_type")
        return {"type": "function_call_output", "id": iid or item_id("fco"),
                "call_id": it["call_id"], "output": out, "status": "completed"}
    kinds = "'message', 'function_call' or 'function_call_output'"
    if t in ("item_reference", "reasoning", "file_search_call", "web_search_call",
             "computer_call", "computer_call_output", "image_generation_call",
             "code_interpreter_call", "local_shell_call", "mcp_call", "custom_tool_call"):
        raise _bad(f"'{p}.type' {t!r} is not supported by this server; it takes {kinds}",
                   f"{p}.type", "unsupported_value")
    raise _bad(f"'{p}.type' must be {kinds}, got {json.dumps(t)[:40]}", f"{p}.type")


def _tools(body: dict) -> list[dict]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools", "tools", "invalid_type")
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise _bad(f"'{p}' must be an object", p, "invalid_type")
        if t.get("type") != "function":
            raise _bad(f"'{p}.type' must be 'function' (this server runs no built-in "
                       f"tools), got {json.dumps(t.get('type'))[:40]}", f"{p}.type",
                       "unsupported_value")
        if "function" in t:   # the chat shape sent to /v1/responses
            raise _bad(f"'{p}' must be flat ({{\"type\": \"function\", \"name\", "
                       "\"parameters\", \"strict\"}), not chat's nested 'function'", p)
    return tools


def _tool_choice(body: dict) -> Any:
    c = body.get("tool_choice")
    if c is None:
        return "auto"
    if c in ("none", "auto", "required"):
        return c
    if isinstance(c, dict) and c.get("type") == "function" and isinstance(c.get("name"), str):
        return {"type": "function", "name": c["name"]}
    raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
               "\"name\": ...}", "tool_choice")


def _text_format(body: dict) -> dict:
    text = body.get("text")
    if text is None:
        return {"type": "text"}
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text", "invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                            "json_schema"):
        raise _bad("'text.format.type' must be 'text', 'json_object' or 'json_schema'",
                   "text.format.type")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str):
            raise _bad("'text.format.name' must be a string", "text.format.name",
                       "invalid_type")
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format.schema' must be a JSON Schema object",
                       "text.format.schema", "invalid_type")
        st = fmt.get("strict")
        if st is not None and not isinstance(st, bool):
            raise _bad("'text.format.strict' must be a boolean", "text.format.strict",
                       "invalid_type")
    return fmt


def _metadata(body: dict) -> dict:
    md = body.get("metadata")
    if md is None:
        return {}
    if not isinstance(md, dict) or len(md) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in md.items()):
        raise _bad(f"'metadata' must be an object of at most {MAX_METADATA} string pairs "
                   "(keys <= 64, values <= 512 characters)", "metadata")
    return md


def parse_responses_request(body: dict, request_id: str = "") -> ResponsesRequest:
    """Validate a Responses body (400 naming the Responses field otherwise). The
    sampling knobs are checked later, by the chat parser, under the same names."""
    log_unknown(body, RESPONSES_FIELDS, request_id)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a string)", "model",
                   "missing_required_parameter" if model is None else "invalid_type")
    for name, why in (("background", "background responses"),
                      ("conversation", "the Conversations API"),
                      ("prompt", "stored prompt templates")):
        if body.get(name) not in (None, False):
            raise _bad(f"'{name}': this server does not support {why}", name,
                       "unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise _bad("'truncation' must be 'disabled' (this server never drops input; a "
                   "conversation longer than the context is a 400)", "truncation")
    prev = _opt(body, "previous_response_id", str, "a string")
    raw_in = body.get("input")
    if raw_in is None:
        if prev is None:
            raise _bad("'input' is required", "input", "missing_required_parameter")
        items: list[dict] = []
    elif isinstance(raw_in, str):
        items = [_normalise_item(0, {"role": "user", "content": raw_in})]
    elif isinstance(raw_in, list):
        items = [_normalise_item(i, it) for i, it in enumerate(raw_in)]
    else:
        raise _bad("'input' must be a string or a list of items", "input", "invalid_type")
    if not items and prev is None:
        raise _bad("'input' must not be empty", "input")
    mot = body.get("max_output_tokens")
    if mot is not None and (not is_int(mot) or mot < 1):
        raise _bad(f"'max_output_tokens' must be an integer >= 1, got "
                   f"{json.dumps(mot)[:40]}", "max_output_tokens",
                   "invalid_type" if not is_int(mot) else "invalid_value")
    par = _opt(body, "parallel_tool_calls", bool, "a boolean")
    store = _opt(body, "store", bool, "a boolean")
    stream = _opt(body, "stream", bool, "a boolean")
    return ResponsesRequest(
        model=model, input_items=items,
        instructions=_opt(body, "instructions", str, "a string"),
        previous_response_id=prev, store=True if store is None else store,
        stream=bool(stream), max_output_tokens=mot, tools=_tools(body),
        tool_choice=_tool_choice(body), parallel_tool_calls=True if par is None else par,
        text_format=_text_format(body), metadata=_metadata(body), raw=body)


# --------------------------------------------------------------------------- to chat

def _joined(parts: list[dict]) -> str:
    return "".join(p.get("text", p.get("refusal", "")) for p in parts)


def chat_body(req: ResponsesRequest, history: list[dict]) -> dict:
    """The chat-completions body that asks for the same answer.

    ``history`` is the stored conversation (its items, oldest first); then come this
    request's items. ``instructions`` becomes the first (system) message; ``developer``
    turns are system turns; ``function_call`` items are assistant ``tool_calls`` (joined
    onto the assistant turn before them); ``function_call_output`` items are ``tool``
    messages. A ``function_call_output`` whose ``call_id`` was never called is a 400."""
    messages: list[dict] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    called: set[str] = set()
    n_hist = len(history)
    for k, it in enumerate([*history, *req.input_items]):
        t = it["type"]
        if t == "message":
            role = "system" if it["role"] == "developer" else it["role"]
            messages.append({"role": role, "content": _joined(it["content"])})
        elif t == "function_call":
            called.add(it["call_id"])
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif t == "function_call_output":
            if it["call_id"] not in called:
                i = k - n_hist
                raise _bad(f"'input[{i}].call_id' {json.dumps(it['call_id'])[:70]} names no "
                           "function_call earlier in the conversation",
                           f"input[{i}].call_id" if i >= 0 else "previous_response_id")
            messages.append({"role": "tool", "tool_call_id": it["call_id"],
                             "content": it["output"]})
    if not messages:
        raise _bad("the conversation is empty: give 'input'", "input")
    body: dict = {"model": req.model, "messages": messages}
    for k in _KNOBS:
        if req.raw.get(k) is not None:
            body[k] = req.raw[k]
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}}
            for t in req.tools]
        tc = req.tool_choice
        body["tool_choice"] = tc if isinstance(tc, str) else \
            {"type": "function", "function": {"name": tc["name"]}}
        body["parallel_tool_calls"] = req.parallel_tool_calls
    elif req.tool_choice not in ("auto", "none"):
        raise _bad("'tool_choice' needs 'tools'", "tool_choice")
    fmt = req.text_format
    if fmt["type"] == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt["type"] == "json_schema":
        js = {"name": fmt["name"], "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            js["strict"] = fmt["strict"]
        body["response_format"] = {"type": "json_schema", "json_schema": js}
    return body


# The chat parser's param names -> this format's (longest first).
_PARAMS = (("response_format.json_schema.", "text.format."),
           ("response_format", "text.format"),
           ("tool_choice.function.name", "tool_choice.name"),
           ("max_completion_tokens", "max_output_tokens"),
           ("max_tokens", "max_output_tokens"),
           ("messages", "input"))


def rename_chat_error(err: APIError) -> APIError:
    """A chat-path error with its ``param`` (and the message's field names) spelled as
    in a Responses body (``tools[0].function.parameters`` -> ``tools[0].parameters``)."""
    def fix(s: str) -> str:
        for a, b in _PARAMS:
            s = s.replace(a, b)
        return s.replace(".function.", ".")

    if err.param:
        p = fix(err.param)
        if p.startswith("input["):   # chat's message index is not the item index
            p = "input"
        err.param = p
    err.message = fix(err.message)
    err.args = (err.message,)
    return err


# --------------------------------------------------------------------------- answers

def responses_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """Responses' ``usage`` object."""
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


class OutputEvent(NamedTuple):
    """One stream event before numbering: its ``type`` and its other fields."""

    type: str
    data: dict


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OutputBuilder:
    """Generated text -> output items, as stream events.

    Feed it text as it is generated (:meth:`feed`), then :meth:`finish` once; the events
    say what a stream sends, and :attr:`items` is the answer's ``output`` afterwards.
    Text becomes a ``message`` item with one ``output_text`` part; with tools, the text
    goes through the chat path's tool-call parser and each call becomes a
    ``function_call`` item. Fed in one piece or in many, the items are the same.

    Args:
        calls_tools: parse tool calls out of the text.
        new_id: makes item ids (``msg_...``/``fc_...``).
    """

    def __init__(self, calls_tools: bool, new_id: Callable[[str], str] = item_id) -> None:
        self.items: list[dict] = []
        self._new_id = new_id
        self._parser = ToolCallStream() if calls_tools else None
        self._open: dict | None = None     # the item being written
        self._text: list[str] = []         # the open message's text so far

    def feed(self, text: str) -> list[OutputEvent]:
        """Events for a piece of generated text (possibly none)."""
        out: list[OutputEvent] = []
        if self._parser is None:
            self._content(text, out)
            return out
        for d in self._parser.feed(text):
            self._delta(d, out)
        return out

    def open_text(self) -> tuple[str, int] | None:
        """``(item_id, output_index)`` of the message being written when text goes
        straight into it (no tool-call parsing), else None: then :meth:`add_text` may
        stand for :meth:`feed` (it records the text; the caller sends the one
        ``response.output_text.delta`` event itself)."""
        o = self._open
        if self._parser is None and o is not None and o["type"] == "message":
            return o["id"], len(self.items) - 1
        return None

    def add_text(self, text: str) -> None:
        """Record text for the open message (see :meth:`open_text`)."""
        self._text.append(text)

    def finish(self, reason: str) -> list[OutputEvent]:
        """Close everything: ``reason`` is the engine's finish reason (``"length"``
        leaves the last item ``incomplete``). An answer with no text at all is one
        empty message."""
        out: list[OutputEvent] = []
        if self._parser is not None:
            for d in self._parser.finish():
                self._delta(d, out)
        if not self.items and self._open is None:
            self._start_message(out)
        self._close(out, "incomplete" if reason == "length" else "completed")
        return out

    # ---- items
    def _delta(self, d: Any, out: list[OutputEvent]) -> None:
        if isinstance(d, ContentDelta):
            self._content(d.text, out)
        elif isinstance(d, ToolCallDelta):
            if d.id is not None:       # a new call
                self._close(out, "completed")
                item = {"type": "function_call", "id": self._new_id("fc"), "call_id": d.id,
                        "name": d.name, "arguments": "", "status": "in_progress"}
                self._open = item
                self.items.append(item)
                out.append(OutputEvent("response.output_item.added",
                                       {"output_index": len(self.items) - 1,
                                        "item": dict(item)}))
            elif d.arguments and self._open is not None:
                self._open["arguments"] += d.arguments
                out.append(OutputEvent("response.function_call_arguments.delta",
                                       {"item_id": self._open["id"],
                                        "output_index": len(self.items) - 1,
                                        "delta": d.arguments}))

    def _start_message(self, out: list[OutputEvent]) -> None:
        item = {"type": "message", "id": self._new_id("msg"), "status": "in_progress",
                "role": "assistant", "content": []}
        self._open, self._text = item, []
        self.items.append(item)
        k = len(self.items) - 1
        out.append(OutputEvent("response.output_item.added",
                               {"output_index": k, "item": json.loads(json.dumps(item))}))
        out.append(OutputEvent("response.content_part.added",
                               {"item_id": item["id"], "output_index": k,
                                "content_index": 0, "part": _text_part("")}))

    def _content(self, text: str, out: list[OutputEvent]) -> None:
        if not text:
            return
        if self._open is None or self._open["type"] != "message":
            self._close(out, "completed")
            self._start_message(out)
        assert self._open is not None
        self._text.append(text)
        out.append(OutputEvent("response.output_text.delta",
                               {"item_id": self._open["id"], "output_index": len(self.items) - 1,
                                "content_index": 0, "delta": text, "logprobs": []}))

    def _close(self, out: list[OutputEvent], status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        k = len(self.items) - 1
        if item["type"] == "message":
            text = "".join(self._text)
            part = _text_part(text)
            out.append(OutputEvent("response.output_text.done",
                                   {"item_id": item["id"], "output_index": k,
                                    "content_index": 0, "text": text, "logprobs": []}))
            out.append(OutputEvent("response.content_part.done",
                                   {"item_id": item["id"], "output_index": k,
                                    "content_index": 0, "part": part}))
            item["content"] = [part]
        else:
            out.append(OutputEvent("response.function_call_arguments.done",
                                   {"item_id": item["id"], "output_index": k,
                                    "name": item["name"], "arguments": item["arguments"]}))
        item["status"] = status
        out.append(OutputEvent("response.output_item.done",
                               {"output_index": k, "item": json.loads(json.dumps(item))}))


def response_object(req: ResponsesRequest, rid: str, created_at: int, *, status: str,
                    output: list[dict], usage: dict | None, stored: bool,
                    error: dict | None = None) -> dict:
    """The ``response`` object (``status``: ``in_progress``, ``completed``,
    ``incomplete`` — then ``incomplete_details.reason`` is ``max_output_tokens`` — or
    ``failed`` with ``error``). The request's settings are echoed as OpenAI echoes them."""
    tools = [{"type": "function", "name": t.get("name"),
              "description": t.get("description"),
              "parameters": t.get("parameters"),
              "strict": t.get("strict", True)} for t in req.tools]
    raw = req.raw
    return {
        "id": rid, "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
        else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "model": req.model, "output": output,
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": stored,
        "temperature": raw.get("temperature", 1.0), "text": {"format": req.text_format},
        "tool_choice": req.tool_choice, "tools": tools,
        "top_p": raw.get("top_p", 1.0), "truncation": "disabled",
        "usage": usage, "user": raw.get("user"), "metadata": req.metadata,
    }
