"""Tools: what the chat template sees, and the grammar a tool call must follow.

Tool calls use the Hermes format (NousResearch Hermes, Qwen 2.5, many ChatML models)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline. ``tool_choice`` picks the grammar:
``required`` = one or more calls to any function, a named function = exactly one call to it,
``auto`` = either a plain answer or calls, ``none`` = no tool grammar (and no tools shown to
the model). ``parallel_tool_calls: false`` allows exactly one call. Every call's
``arguments`` are constrained by that function's ``parameters`` schema.

Templates that take a ``tools`` variable get the tools that way; for templates that do not
(SmolLM2's, the toy's) :func:`prepare_messages` writes a system instruction listing them
and turns earlier calls and tool results into Hermes-format text.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

from tep.errors import BadRequestError
from tep.structured import grammar as G
from tep.structured.limits import JSON_COMPILE_OPTIONS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from tep.structured.types import ConstraintSpec, ToolsSpec

__all__ = ["tool_constraint", "tool_call_lark", "template_tools", "template_supports_tools",
           "tool_system_prompt", "prepare_messages", "text_not_starting_with"]

_RX_SPECIAL = set("\\.+*?()|[]{}^$#&-~")


def _rx(ch: str) -> str:
    return "\\" + ch if ch in _RX_SPECIAL else ch


def text_not_starting_with(tag: str) -> str:
    """A regex (Rust syntax) for non-empty text that does not start with ``tag``.

    llguidance has no lookahead, so it is spelled out: text that leaves the tag at its
    k-th character (``tag[:k]`` then any other character, then anything), or a proper
    prefix of the tag on its own."""
    alts = []
    for k, ch in enumerate(tag):
        alts.append("".join(_rx(c) for c in tag[:k]) + "[^" + _rx(ch) + "](.|\\n)*")
    alts += ["".join(_rx(c) for c in tag[:k]) for k in range(1, len(tag))]
    return "(" + "|".join(alts) + ")"


def _strict_json(schema: Any) -> Any:
    """The schema with tep's JSON compile options attached (``x-guidance``), for inline
    ``%json`` blocks, which do not take compile options otherwise."""
    if isinstance(schema, dict):
        return {**schema, "x-guidance": {**JSON_COMPILE_OPTIONS,
                                         **schema.get("x-guidance", {})}}
    return schema


def _call_schema(tools: Sequence[dict]) -> dict:
    branches = []
    for t in tools:
        fn = t["function"]
        branches.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tool_call_lark(spec: ToolsSpec, content: ConstraintSpec | None = None) -> str:
    """The Lark grammar for ``spec`` (see the module docstring). With ``auto``, the
    plain-answer branch is ``content``'s JSON schema when given, else free text that does
    not start with the tool-call tag."""
    tools = spec.callable_tools
    if not tools:
        raise ValueError("tool_choice 'none' has no tool-call grammar")
    body = json.dumps(_strict_json(_call_schema(tools)), ensure_ascii=False)
    lines = [
        f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} call_body "
        f"{json.dumps(chr(10) + TOOL_CALL_CLOSE)}",
        f"call_body: %json {body}",
        'calls: call ("\\n" call)*' if spec.parallel else "calls: call",
    ]
    if spec.choice == "auto":
        if content is None:
            lines.insert(0, "start: TEXT | calls")
            lines.append(f"TEXT: /{text_not_starting_with(TOOL_CALL_OPEN)}/")
        else:
            lines.insert(0, "start: answer | calls")
            lines.append("answer: %json " + json.dumps(_strict_json(content.schema),
                                                       ensure_ascii=False))
    else:
        lines.insert(0, "start: calls")
    return "\n".join(lines) + "\n"


def tool_constraint(spec: ToolsSpec, content: ConstraintSpec | None = None) -> ConstraintSpec:
    """The validated tool-call constraint (``param`` ``"tools"``)."""
    try:
        g = G.lark_grammar(tool_call_lark(spec, content))
    except G.GrammarError as e:
        raise BadRequestError(f"the tools could not be compiled into a grammar: {e}",
                              param="tools") from None
    return ConstraintSpec("tools", "tools", g)


def template_tools(spec: ToolsSpec | None) -> list[dict] | None:
    """The ``tools`` value for the chat template (OpenAI-shaped dicts), or None when the
    model is not to see any (no tools, or ``tool_choice: "none"``)."""
    if spec is None or spec.choice == "none":
        return None
    return [json.loads(json.dumps(t)) for t in spec.callable_tools]


_TOOLS_VAR = re.compile(r"\btools\b")


def template_supports_tools(template: str | None) -> bool:
    """Whether a Jinja chat template reads a ``tools`` variable (if not, tools must be
    described in a system message: :func:`prepare_messages`)."""
    return bool(template) and bool(_TOOLS_VAR.search(template))


def tool_system_prompt(tools: Sequence[dict], *, parallel: bool = True) -> str:
    """The default instruction that lists ``tools`` for a template without tool support.

    It tells the model the Hermes format; the grammar enforces it anyway."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    many = ("You may call one or more functions" if parallel
            else "You may call one function")
    return (
        f"You are a function calling AI model. {many} to assist with the user query. "
        "The functions, as JSON signatures, are in the <tools></tools> XML tags:\n"
        f"<tools>\n{sigs}\n</tools>\n"
        "For each function call return a JSON object with the function name and its "
        f"arguments within {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
        f"{TOOL_CALL_CLOSE}")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _calls_text(calls: Sequence[dict]) -> str:
    out = []
    for c in calls:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args_obj = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            args_obj = args
        call = json.dumps({"name": fn.get("name"), "arguments": args_obj},
                          ensure_ascii=False, separators=(",", ":"))
        out.append(f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}")
    return "\n".join(out)


def prepare_messages(messages: Sequence[dict], spec: ToolsSpec | None,
                     template: str | None) -> tuple[list[dict], list[dict] | None]:
    """Messages and ``tools`` to render with ``template``.

    A template that reads ``tools`` gets the messages unchanged and the tools list. For one
    that does not: the tool instruction (:func:`tool_system_prompt`) is put first in the
    system message (added if missing), assistant ``tool_calls`` become Hermes text, and
    ``tool`` messages become user messages wrapped in ``<tool_response>`` tags. Returns
    ``(messages, tools_for_template)``."""
    tools = template_tools(spec)
    if template_supports_tools(template):
        return list(messages), tools
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            text = _content_text(m.get("content"))
            calls = _calls_text(m["tool_calls"])
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        elif role == "tool":
            out.append({"role": "user", "content":
                        f"<tool_response>\n{_content_text(m.get('content'))}\n</tool_response>"})
        else:
            out.append(dict(m))
    if tools:
        prompt = tool_system_prompt(tools, parallel=spec.parallel if spec else True)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system",
                      "content": prompt + "\n\n" + _content_text(out[0].get("content"))}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None
