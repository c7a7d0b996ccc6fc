"""Request fields -> what to constrain: ``response_format``, the ``guided_*`` extras, tools.

:func:`parse_structured` is the one call the wire parser makes: it validates every
structured-output field of a chat or completions body and returns the final
:class:`ConstraintSpec` (tools and a response format already combined) plus the
:class:`ToolsSpec` the chat template and the tool-call parser need. Anything invalid is a
:class:`tep.errors.BadRequestError` whose ``param`` names the field, including a schema,
regex or grammar that llguidance refuses (compiled once here, cached by text).
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from tep.errors import BadRequestError
from tep.structured import grammar as G
from tep.structured.limits import (MAX_CHOICE_CHARS, MAX_CHOICES, MAX_GRAMMAR_CHARS,
                                   MAX_TOOLS, SCHEMA_NAME_PATTERN, TOOL_NAME_PATTERN)
from tep.structured.tools import tool_constraint
from tep.structured.types import ConstraintSpec, Structured, ToolsSpec
from tep.wire.fields import CONSTRAINT_FIELDS as _CF, TOOL_FIELDS as _TF

__all__ = ["ConstraintSpec", "ToolsSpec", "Structured", "parse_constraint", "parse_tools",
           "parse_structured", "CONSTRAINT_FIELDS", "TOOL_FIELDS", "unsupported"]

Endpoint = Literal["chat", "completions"]

# Body fields that carry a constraint (at most one per request) and the tool fields; the
# field table (tep.wire.fields) is their one source.
CONSTRAINT_FIELDS = tuple(f.name for f in _CF)
TOOL_FIELDS = tuple(f.name for f in _TF)


def _bad(msg: str, param: str, code: str = "invalid_value") -> BadRequestError:
    return BadRequestError(msg, param=param, code=code)


def _check_size(text: str, param: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _bad(f"'{param}' is longer than {MAX_GRAMMAR_CHARS} characters", param)


def _schema_grammar(schema: Any, param: str) -> str:
    if not isinstance(schema, (dict, bool)):
        raise _bad(f"'{param}' must be a JSON Schema object, got "
                   f"{type(schema).__name__}", param, "invalid_type")
    if schema is True:          # the schema every JSON value satisfies
        schema = {}
    elif schema is False:
        raise _bad(f"'{param}' is the schema 'false', which no output can satisfy", param)
    _check_size(json.dumps(schema), param)
    try:
        return G.json_schema_grammar(schema)
    except G.GrammarError as e:
        raise _bad(f"'{param}' is not a JSON Schema tep can enforce: {e}", param) from None


def _response_format(rf: Any) -> ConstraintSpec | None:
    p = "response_format"
    if not isinstance(rf, dict):
        raise _bad("'response_format' must be an object", p, "invalid_type")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        schema = {"type": "object"}
        return ConstraintSpec("json_object", p, _schema_grammar(schema, p), schema)
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("'response_format.json_schema' must be an object with 'name' and "
                       "'schema'", f"{p}.json_schema", "invalid_type")
        name = js.get("name")
        if not isinstance(name, str) or not re.match(SCHEMA_NAME_PATTERN, name):
            raise _bad("'response_format.json_schema.name' must be 1-64 letters, digits, "
                       "'_' or '-'", f"{p}.json_schema.name")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad("'response_format.json_schema.strict' must be a boolean",
                       f"{p}.json_schema.strict", "invalid_type")
        # OpenAI makes 'schema' optional; without one any JSON object is accepted.
        schema = js.get("schema", {"type": "object"})
        sp = f"{p}.json_schema.schema"
        return ConstraintSpec("json_schema", sp, _schema_grammar(schema, sp), schema)
    raise _bad("'response_format.type' must be 'text', 'json_object' or 'json_schema', got "
               f"{json.dumps(t)[:40]}", f"{p}.type")


def _guided_json(v: Any) -> ConstraintSpec:
    p = "guided_json"
    if isinstance(v, str):
        _check_size(v, p)
        try:
            v = json.loads(v)
        except ValueError as e:
            raise _bad(f"'guided_json' is not valid JSON: {e}", p) from None
    return ConstraintSpec("json_schema", p, _schema_grammar(v, p), v)


def _text_field(body: dict, p: str) -> str:
    v = body[p]
    if not isinstance(v, str) or not v:
        raise _bad(f"'{p}' must be a non-empty string", p, "invalid_type")
    _check_size(v, p)
    return v


def _guided_regex(body: dict) -> ConstraintSpec:
    p = "guided_regex"
    try:
        return ConstraintSpec("regex", p, G.regex_grammar(_text_field(body, p)))
    except G.GrammarError as e:
        raise _bad(f"'guided_regex' is not a regex tep can enforce: {e}", p) from None


def _guided_grammar(body: dict) -> ConstraintSpec:
    p = "guided_grammar"
    try:
        return ConstraintSpec("grammar", p, G.lark_grammar(_text_field(body, p)))
    except G.GrammarError as e:
        raise _bad(f"'guided_grammar' is not a Lark (or GBNF) grammar tep can enforce: {e}",
                   p) from None


def _guided_choice(v: Any) -> ConstraintSpec:
    p = "guided_choice"
    if (not isinstance(v, list) or not v or len(v) > MAX_CHOICES
            or not all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in v)):
        raise _bad(f"'guided_choice' must be a list of 1..{MAX_CHOICES} non-empty strings "
                   f"(each at most {MAX_CHOICE_CHARS} characters)", p, "invalid_type")
    try:
        return ConstraintSpec("choice", p, G.choice_grammar(tuple(dict.fromkeys(v))))
    except G.GrammarError as e:
        raise _bad(f"'guided_choice' could not be compiled: {e}", p) from None


def parse_constraint(body: dict, endpoint: Endpoint) -> ConstraintSpec | None:
    """The request's own constraint (``response_format`` or one ``guided_*`` field), or
    None. Tools are not looked at (see :func:`parse_structured`). More than one source is a
    400 naming the second; ``response_format: {"type": "text"}`` is no constraint."""
    present = [f for f in CONSTRAINT_FIELDS if body.get(f) is not None]
    if len(present) > 1:
        raise _bad(f"at most one of {', '.join(CONSTRAINT_FIELDS)} may be given; got "
                   f"{' and '.join(present)}", present[1])
    if not present:
        return None
    f = present[0]
    if f == "response_format":
        return _response_format(body[f])
    if f == "guided_json":
        return _guided_json(body[f])
    if f == "guided_regex":
        return _guided_regex(body)
    if f == "guided_grammar":
        return _guided_grammar(body)
    return _guided_choice(body[f])


def _tool(i: int, t: Any) -> dict:
    p = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or \
            not isinstance(t.get("function"), dict):
        raise _bad(f"'{p}' must be {{\"type\": \"function\", \"function\": {{...}}}}", p,
                   "invalid_type")
    fn = t["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.match(TOOL_NAME_PATTERN, name):
        raise _bad(f"'{p}.function.name' must be 1-64 letters, digits, '_' or '-'",
                   f"{p}.function.name")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise _bad(f"'{p}.function.description' must be a string",
                   f"{p}.function.description", "invalid_type")
    params = fn.get("parameters")
    pp = f"{p}.function.parameters"
    if params is None:
        params = {"type": "object", "properties": {}}
    elif not isinstance(params, dict):
        raise _bad(f"'{pp}' must be a JSON Schema object", pp, "invalid_type")
    elif params.get("type", "object") != "object":
        raise _bad(f"'{pp}' must describe an object (type 'object')", pp)
    _schema_grammar(params, pp)  # a schema llguidance refuses is this tool's 400
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"'{p}.function.strict' must be a boolean", f"{p}.function.strict",
                   "invalid_type")
    out = {"name": name, "parameters": params}
    if desc is not None:
        out["description"] = desc
    if strict is not None:
        out["strict"] = strict
    return {"type": "function", "function": out}


def parse_tools(body: dict) -> ToolsSpec | None:
    """Validate ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (None when the body
    has no tools; a ``tool_choice`` other than ``none`` without tools is a 400)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    par = body.get("parallel_tool_calls")
    if par is not None and not isinstance(par, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls",
                   "invalid_type")
    if tools is None:
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _bad(f"'tools' must be a list of at most {MAX_TOOLS} functions", "tools",
                   "invalid_type")
    if not tools:  # OpenAI rejects an empty list too
        raise _bad("'tools' must not be empty", "tools")
    norm = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t["function"]["name"] for t in norm]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise _bad(f"two functions in 'tools' are named {dup!r}", "tools")
    fn = None
    if choice is None:
        kind = "auto"
    elif choice in ("none", "auto", "required"):
        kind = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict):
        fn = choice["function"].get("name")
        if fn not in names:
            raise _bad(f"'tool_choice.function.name' {json.dumps(fn)[:70]} is not one of "
                       "the functions in 'tools'", "tool_choice.function.name")
        kind = "function"
    else:
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    # A named function is called exactly once (OpenAI's and vLLM's behaviour), whatever
    # parallel_tool_calls says: the grammar then ends after one call.
    return ToolsSpec(norm, kind, fn, kind != "function" and (True if par is None else par))


def parse_structured(body: dict, endpoint: Endpoint) -> Structured:
    """Everything structured about a request, validated (400 naming the field otherwise).

    Chat: ``response_format``, ``guided_*``, ``tools``/``tool_choice``/
    ``parallel_tool_calls``. Completions: ``response_format`` and ``guided_*``; tools are a
    400 there (completions have no tool calls). With tools the model may call
    (``tool_choice`` not ``none``), the returned constraint is the tool-call grammar; with
    ``auto`` its plain-answer branch is free text, or the requested JSON schema
    (``response_format``/``guided_json``). A regex, grammar or choice together with callable
    tools is a 400 (they cannot be combined)."""
    if endpoint not in ("chat", "completions"):
        raise ValueError(f"endpoint must be 'chat' or 'completions', got {endpoint!r}")
    content = parse_constraint(body, endpoint)
    if endpoint == "completions":
        for f in TOOL_FIELDS:
            if body.get(f) is not None:
                raise _bad(f"'{f}' is a chat parameter; /v1/completions has no tool calls", f)
        return Structured(content, None)
    tools = parse_tools(body)
    if tools is None or tools.choice == "none":
        return Structured(content, tools)
    if content is not None and content.kind not in ("json_schema", "json_object"):
        raise _bad(f"'{content.param}' cannot be combined with tool calls; use "
                   "'tool_choice': 'none' or a JSON response_format", content.param)
    return Structured(tool_constraint(tools, content), tools)


def unsupported(structured: Structured, backend: str = "this backend") -> None:
    """For a backend that cannot constrain its output: a 400 naming the constraint's field
    when the request has one (never ignore it); nothing otherwise."""
    c = structured.constraint
    if c is not None:
        raise _bad(f"{backend} cannot constrain its output; '{c.param}' cannot be honoured",
                   c.param, "unsupported_parameter")
