"""``POST /v1/messages`` (Anthropic's Messages API): the request parser and the answer
renderer, pure functions over tep's chat request model.

A Messages body is translated field by field into a chat-completions-shaped body (the
table is in docs/WIRE.md), which the one chat path validates and runs; the answer is
rendered back into Anthropic's shapes: content blocks, ``stop_reason``, ``usage`` and
the ``{"type": "error", "error": {...}}`` envelope.

Shapes::

    request  {model, max_tokens, messages: [{role: user|assistant, content: str | [block]}],
              system?: str | [text block], stop_sequences?, temperature?, top_p?, top_k?,
              tools?: [{name, description?, input_schema}], tool_choice?: {type: auto|any|
              tool|none, name?, disable_parallel_tool_use?}, output_config?: {format?:
              {type: json_schema, schema}}, stream?, seed? (tep)}
    block    {type: text, text} | {type: tool_use, id, name, input: {}}  (assistant)
             | {type: tool_result, tool_use_id, content?: str | [text block], is_error?}
    answer   {id: msg_..., type: message, role: assistant, model, content: [block],
              stop_reason: end_turn|max_tokens|stop_sequence|tool_use, stop_sequence,
              usage: {input_tokens, output_tokens}}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tep.errors import APIError, BadRequestError
from tep.wire.values import is_int, log_unknown

__all__ = ["MessagesRequest", "parse_messages_request", "rename_param", "message_answer",
           "content_blocks", "stop_reason", "error_type", "anthropic_error_body",
           "MAX_MESSAGES", "MAX_BLOCKS", "MESSAGES_FIELDS", "new_message_id", "tool_use_id"]

MAX_MESSAGES = 4096
"""Most messages in one request (each a 400 past it): a bound on the work one request
may cause before the context check (models without a context size take any length)."""

MAX_BLOCKS = 4096
"""Most content blocks in one message (and in ``system``)."""

# Every top-level field the parser reads; others are logged and ignored, as in chat.
MESSAGES_FIELDS = ("model", "max_tokens", "messages", "system", "stop_sequences",
                   "temperature", "top_p", "top_k", "tools", "tool_choice", "stream",
                   "metadata", "output_config", "seed")

# chat field (what prepare_chat names in its errors) -> the Messages field it came from
_RENAMES = {
    "stop": "stop_sequences",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "tool_choice.function.name": "tool_choice.name",
    "max_completion_tokens": "max_tokens",
    "response_format.json_schema.schema": "output_config.format.schema",
}


@dataclass
class MessagesRequest:
    """A parsed Messages body.

    Attributes:
        model: the requested model ID.
        chat: the chat-completions-shaped body it translates to (for the chat path).
        stream: whether the client asked for server-sent events.
        stop_sequences: the stop strings (to name the one that ended a reply).
        paths: for each chat message index, the Messages path it came from (errors).
    """

    model: str
    chat: dict
    stream: bool = False
    stop_sequences: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def _bad(msg: str, param: str, code: str = "invalid_value") -> BadRequestError:
    return BadRequestError(msg, param=param, code=code)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _block_text(b: dict, p: str) -> str:
    """The ``text`` of the text block ``b`` at path ``p`` (a 400 when it is not a string)."""
    if not isinstance(b.get("text"), str):
        raise _bad(f"'{p}.text' must be a string", f"{p}.text", "invalid_type")
    return b["text"]


def _text_blocks(v: Any, param: str) -> str:
    """A string, or a list of ``{"type": "text", "text": str}`` blocks joined."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise _bad(f"'{param}' must be a string or a list of text blocks, got "
                   f"{_type_name(v)}", param, "invalid_type")
    if len(v) > MAX_BLOCKS:
        raise _bad(f"'{param}' has more than {MAX_BLOCKS} blocks", param)
    parts = []
    for k, b in enumerate(v):
        p = f"{param}[{k}]"
        if not isinstance(b, dict) or b.get("type") != "text":
            got = b.get("type") if isinstance(b, dict) else _type_name(b)
            raise _bad(f"'{p}' must be a text block ({{\"type\": \"text\", \"text\": ...}}); "
                       f"got {json.dumps(got)[:40]}", p, "invalid_type")
        parts.append(_block_text(b, p))
    return "".join(parts)


def _user_blocks(i: int, content: list, out: list[dict], paths: list[str]) -> None:
    """A user message's blocks: text runs become user messages, each ``tool_result`` a
    ``tool`` message (in their order)."""
    text: list[str] = []

    def flush() -> None:
        if text:
            out.append({"role": "user", "content": "".join(text)})
            paths.append(f"messages[{i}]")
            text.clear()

    for k, b in enumerate(content):
        p = f"messages[{i}].content[{k}]"
        t = b.get("type") if isinstance(b, dict) else None
        if t == "text":
            text.append(_block_text(b, p))
        elif t == "tool_result":
            tid = b.get("tool_use_id")
            if not isinstance(tid, str) or not tid:
                raise _bad(f"'{p}.tool_use_id' must be a non-empty string",
                           f"{p}.tool_use_id", "invalid_type")
            c = b.get("content")
            body = "" if c is None else _text_blocks(c, f"{p}.content")
            err = b.get("is_error")
            if err is not None and not isinstance(err, bool):
                raise _bad(f"'{p}.is_error' must be a boolean", f"{p}.is_error", "invalid_type")
            flush()
            out.append({"role": "tool", "tool_call_id": tid,
                        "content": f"Error: {body}" if err else body})
            paths.append(p)
        elif t == "tool_use":
            raise _bad(f"'{p}': tool_use blocks belong in assistant messages", p)
        else:
            raise _unsupported_block(b, p)
    flush()


def _unsupported_block(b: Any, p: str) -> BadRequestError:
    if not isinstance(b, dict):
        return _bad(f"'{p}' must be a content block object, got {_type_name(b)}", p,
                    "invalid_type")
    t = b.get("type")
    if isinstance(t, str) and t in ("image", "document", "thinking", "redacted_thinking",
                                    "search_result", "server_tool_use", "container_upload"):
        return _bad(f"'{p}': {t} blocks are not supported by this server (text, tool_use "
                    "and tool_result are)", p, "unsupported_value")
    return _bad(f"'{p}.type' must be 'text', 'tool_use' or 'tool_result', got "
                f"{json.dumps(t)[:40]}", f"{p}.type")


def _assistant_blocks(i: int, content: list) -> dict:
    """An assistant message's blocks: text joined, ``tool_use`` blocks as ``tool_calls``."""
    text: list[str] = []
    calls: list[dict] = []
    for k, b in enumerate(content):
        p = f"messages[{i}].content[{k}]"
        t = b.get("type") if isinstance(b, dict) else None
        if t == "text":
            text.append(_block_text(b, p))
        elif t == "tool_use":
            for key in ("id", "name"):
                if not isinstance(b.get(key), str) or not b[key]:
                    raise _bad(f"'{p}.{key}' must be a non-empty string", f"{p}.{key}",
                               "invalid_type")
            inp = b.get("input", {})
            if not isinstance(inp, dict):
                raise _bad(f"'{p}.input' must be an object", f"{p}.input", "invalid_type")
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"],
                                       "arguments": json.dumps(inp, ensure_ascii=False,
                                                               separators=(",", ":"))}})
        elif t == "tool_result":
            raise _bad(f"'{p}': tool_result blocks belong in user messages", p)
        else:
            raise _unsupported_block(b, p)
    m: dict = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        m["tool_calls"] = calls
    return m


def _messages(v: Any) -> tuple[list[dict], list[str]]:
    if v is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(v, list) or not v:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    if len(v) > MAX_MESSAGES:
        raise _bad(f"'messages' has {len(v)} messages; this server takes at most "
                   f"{MAX_MESSAGES}", "messages")
    out: list[dict] = []
    paths: list[str] = []
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{p}' must be an object with 'role' and 'content'", p, "invalid_type")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"'{p}.role' must be 'user' or 'assistant' (the system prompt goes in "
                       f"'system'), got {json.dumps(role)[:40]}", f"{p}.role")
        c = m.get("content")
        if isinstance(c, str):
            out.append({"role": role, "content": c})
            paths.append(p)
            continue
        if not isinstance(c, list):
            raise _bad(f"'{p}.content' must be a string or a list of content blocks, got "
                       f"{_type_name(c)}", f"{p}.content", "invalid_type")
        if len(c) > MAX_BLOCKS:
            raise _bad(f"'{p}.content' has more than {MAX_BLOCKS} blocks", f"{p}.content")
        if role == "user":
            _user_blocks(i, c, out, paths)
        else:
            out.append(_assistant_blocks(i, c))
            paths.append(p)
    if v[-1].get("role") == "assistant":
        # Anthropic continues a final assistant turn ("prefill"); the chat templates tep
        # renders always open a new turn, so that would silently answer something else
        raise _bad("the last message must have role 'user': continuing a final assistant "
                   "message (prefill) is not supported by this server", "messages")
    return out, paths


def _tools(v: Any) -> list[dict]:
    if not isinstance(v, list):
        raise _bad(f"'tools' must be a list of tools, got {_type_name(v)}", "tools",
                   "invalid_type")
    out = []
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise _bad(f"'{p}' must be an object with 'name' and 'input_schema'", p,
                       "invalid_type")
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"'{p}.type' {json.dumps(kind)[:40]}: only custom tools (name, "
                       "description, input_schema) are supported by this server",
                       f"{p}.type", "unsupported_value")
        name = t.get("name")
        if not isinstance(name, str):
            raise _bad(f"'{p}.name' must be a string", f"{p}.name", "invalid_type")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"'{p}.input_schema' must be a JSON Schema object", f"{p}.input_schema",
                       "invalid_type" if schema is not None else "missing_required_parameter")
        fn: dict = {"name": name, "parameters": schema}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(v: Any, chat: dict) -> None:
    p = "tool_choice"
    if not isinstance(v, dict):
        raise _bad(f"'{p}' must be an object such as {{\"type\": \"auto\"}}", p, "invalid_type")
    t = v.get("type")
    if t == "auto":
        chat["tool_choice"] = "auto"
    elif t == "any":
        chat["tool_choice"] = "required"
    elif t == "none":
        chat["tool_choice"] = "none"
    elif t == "tool":
        name = v.get("name")
        if not isinstance(name, str):
            raise _bad("'tool_choice.name' must be a string naming one of 'tools'",
                       "tool_choice.name", "invalid_type")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _bad("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none', got "
                   f"{json.dumps(t)[:40]}", "tool_choice.type")
    dp = v.get("disable_parallel_tool_use")
    if dp is not None:
        if not isinstance(dp, bool):
            raise _bad("'tool_choice.disable_parallel_tool_use' must be a boolean",
                       "tool_choice.disable_parallel_tool_use", "invalid_type")
        chat["parallel_tool_calls"] = not dp


def _output_config(v: Any, chat: dict) -> None:
    """``output_config.format`` ``{"type": "json_schema", "schema"}`` -> the chat
    ``response_format`` (the same constrained decoding); ``effort`` has no meaning here."""
    if not isinstance(v, dict):
        raise _bad("'output_config' must be an object", "output_config", "invalid_type")
    fmt = v.get("format")
    if fmt is None:
        return
    p = "output_config.format"
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _bad(f"'{p}' must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}", p,
                   "invalid_type")
    if not isinstance(fmt.get("schema"), dict):
        raise _bad(f"'{p}.schema' must be a JSON Schema object", f"{p}.schema",
                   "invalid_type")
    chat["response_format"] = {"type": "json_schema",
                               "json_schema": {"name": "output", "schema": fmt["schema"]}}


def parse_messages_request(body: dict, request_id: str, *, count_only: bool = False
                           ) -> MessagesRequest:
    """Validate a Messages body and translate it into a chat-shaped body (400 naming the
    Messages field otherwise). ``count_only``: a ``count_tokens`` body (no
    ``max_tokens``, no ``stream``)."""
    log_unknown(body, MESSAGES_FIELDS, request_id)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a string)", "model",
                   "missing_required_parameter" if model is None else "invalid_type")
    chat: dict = {"model": model}
    msgs, paths = _messages(body.get("messages"))
    system = body.get("system")
    if system is not None:
        text = _text_blocks(system, "system")
        msgs.insert(0, {"role": "system", "content": text})
        paths.insert(0, "system")
    chat["messages"] = msgs
    if not count_only:
        mt = body.get("max_tokens")
        if mt is None:
            raise _bad("'max_tokens' is required", "max_tokens", "missing_required_parameter")
        if not is_int(mt) or mt < 1:
            raise _bad(f"'max_tokens' must be an integer >= 1, got {json.dumps(mt)[:40]}",
                       "max_tokens", "invalid_type" if not is_int(mt) else "invalid_value")
        chat["max_tokens"] = mt
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    if stream and not count_only:
        chat["stream"] = True
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop_sequences' must be a list of strings", "stop_sequences",
                       "invalid_type")
        if stops:
            chat["stop"] = stops
    for k in ("temperature", "top_p", "top_k", "seed"):
        if body.get(k) is not None:
            chat[k] = body[k]
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise _bad("'metadata' must be an object", "metadata", "invalid_type")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        chat["user"] = meta["user_id"]
    if body.get("output_config") is not None:
        _output_config(body["output_config"], chat)
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
        if chat.get("tools") is None and chat["tool_choice"] != "none":
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
    return MessagesRequest(model, chat, bool(stream) and not count_only,
                           list(stops or []), paths)


def rename_param(err: BadRequestError, req: MessagesRequest) -> BadRequestError:
    """An error the chat path raised, reworded with the Messages field it came from
    (``stop`` -> ``stop_sequences``, ``tools[0].function.parameters`` ->
    ``tools[0].input_schema``, ``messages[3]`` -> where that message came from)."""
    p = err.param
    if p is None:
        return err
    new = _RENAMES.get(p)
    if new is None and p.startswith("tools[") and ".function." in p:
        head, _, rest = p.partition(".function.")
        new = head + "." + ("input_schema" + rest[len("parameters"):]
                            if rest.startswith("parameters") else rest)
    if new is None and p.startswith("messages["):
        idx, _, rest = p[len("messages["):].partition("]")
        if idx.isdigit() and int(idx) < len(req.paths):
            new = req.paths[int(idx)] + rest
    if new is None or new == p:
        return err
    msg = err.message.replace(f"'{p}'", f"'{new}'")
    return BadRequestError(msg, param=new, code=err.code)


# --------------------------------------------------------------------------- answers

def new_message_id() -> str:
    """``msg_`` + 24 hex digits, the shape of Anthropic's message ids."""
    from tep.wire.shapes import new_id

    return "msg_" + new_id("m")[2:26]


def tool_use_id(call_id: str) -> str:
    """A tool_use block id from tep's call id (``call_<hex>`` -> ``toolu_<hex>``)."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(finish: str, tool_calls: bool, stop_sequence: str | None) -> str:
    """Anthropic's ``stop_reason`` from the engine's finish reason: ``max_tokens`` when
    the length ran out, ``tool_use`` when the reply made calls, ``stop_sequence`` when a
    stop string ended it, else ``end_turn``."""
    if finish == "length":
        return "max_tokens"
    if tool_calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def content_blocks(text: str | None, calls: list) -> list[dict]:
    """The answer's content: a text block (when there is text, or nothing at all) then
    one ``tool_use`` block per call (``calls``: :class:`tep.structured.tool_calls.ToolCall`)."""
    out: list[dict] = []
    if text or not calls:
        out.append({"type": "text", "text": text or ""})
    for c in calls:
        try:
            inp = json.loads(c.arguments) if c.arguments else {}
        except ValueError:       # cut off by max_tokens: what was written, as a string
            inp = {"_partial_json": c.arguments}
        out.append({"type": "tool_use", "id": tool_use_id(c.id), "name": c.name,
                    "input": inp})
    return out


def message_answer(mid: str, model: str, content: list[dict], reason: str | None,
                   stop_sequence: str | None, input_tokens: int, output_tokens: int) -> dict:
    """The ``message`` object (non-streamed answer, and ``message_start`` with empty
    content and ``reason`` None)."""
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


# --------------------------------------------------------------------------- errors

_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "not_found_error", 413: "request_too_large",
          429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``api_error`` for other 5xx,
    ``invalid_request_error`` for other 4xx)."""
    t = _TYPES.get(status)
    if t is not None:
        return t
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(err: APIError, request_id: str | None = None) -> dict:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    out: dict = {"type": "error", "error": {"type": error_type(err.status),
                                            "message": err.message}}
    if request_id:
        out["request_id"] = request_id
    return out
