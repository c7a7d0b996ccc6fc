"""Request parsing: every invalid structured-output field is a 400 that names it."""
from __future__ import annotations

import json

import pytest

from tep.errors import BadRequestError
from tep.structured import parse_structured
from tep.structured.limits import MAX_CHOICES, MAX_GRAMMAR_CHARS, MAX_TOOLS

W = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def fn(name="get_weather", params=W, **kw):
    return {"type": "function", "function": {"name": name, "parameters": params, **kw}}


BAD = [
    # (endpoint, body, param)
    ("chat", {"response_format": "json"}, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"schema": W}}},
     "response_format.json_schema.name"),
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "bad name!", "schema": W}}},
     "response_format.json_schema.name"),
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": W, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": [1, 2]}}},
     "response_format.json_schema.schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}},
     "response_format.json_schema.schema"),
    ("completions", {"guided_json": "{not json"}, "guided_json"),
    ("completions", {"guided_json": 5}, "guided_json"),
    ("completions", {"guided_json": False}, "guided_json"),
    ("completions", {"guided_json": "false"}, "guided_json"),
    ("completions", {"guided_json": {"type": "integer", "minimum": "a"}}, "guided_json"),
    ("completions", {"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json"),
    ("completions", {"guided_regex": "a[b"}, "guided_regex"),
    ("completions", {"guided_regex": ""}, "guided_regex"),
    ("completions", {"guided_regex": 3}, "guided_regex"),
    ("completions", {"guided_grammar": "start: foo"}, "guided_grammar"),
    ("completions", {"guided_grammar": "start: (("}, "guided_grammar"),
    ("completions", {"guided_grammar": ["start: \"a\""]}, "guided_grammar"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_choice": "yes"}, "guided_choice"),
    ("completions", {"guided_choice": ["a", 2]}, "guided_choice"),
    ("completions", {"guided_choice": ["a", ""]}, "guided_choice"),
    ("completions", {"guided_choice": ["x"] * (MAX_CHOICES + 1)}, "guided_choice"),
    ("completions", {"guided_regex": "a" * (MAX_GRAMMAR_CHARS + 1)}, "guided_regex"),
    # two sources: the second one is named
    ("completions", {"guided_json": W, "guided_regex": "a+"}, "guided_regex"),
    ("chat", {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
     "guided_choice"),
    # tools
    ("completions", {"tools": [fn()]}, "tools"),
    ("completions", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"tools": "get_weather"}, "tools"),
    ("chat", {"tools": []}, "tools"),
    ("chat", {"tools": [fn()] * (MAX_TOOLS + 1)}, "tools"),
    ("chat", {"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ("chat", {"tools": [fn(), {"type": "function"}]}, "tools[1]"),
    ("chat", {"tools": [fn(name="has space")]}, "tools[0].function.name"),
    ("chat", {"tools": [fn(name="x" * 65)]}, "tools[0].function.name"),
    ("chat", {"tools": [fn(params="object")]}, "tools[0].function.parameters"),
    ("chat", {"tools": [fn(params={"type": "array"})]}, "tools[0].function.parameters"),
    ("chat", {"tools": [fn(), fn(name="b", params={"type": "object", "properties": {
        "a": {"type": "nope"}}})]}, "tools[1].function.parameters"),
    ("chat", {"tools": [fn(description=3)]}, "tools[0].function.description"),
    ("chat", {"tools": [fn(strict="true")]}, "tools[0].function.strict"),
    ("chat", {"tools": [fn(), fn()]}, "tools"),
    ("chat", {"tools": [fn()], "tool_choice": "always"}, "tool_choice"),
    ("chat", {"tools": [fn()], "tool_choice": {"type": "function",
                                               "function": {"name": "other"}}},
     "tool_choice.function.name"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tools": [fn()], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("chat", {"tools": [fn()], "guided_regex": "a+"}, "guided_regex"),
    ("chat", {"tools": [fn()], "guided_choice": ["a"]}, "guided_choice"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_invalid_field_is_400_naming_it(endpoint, body, param):
    with pytest.raises(BadRequestError) as ei:
        parse_structured(body, endpoint)
    e = ei.value
    assert e.status == 400
    assert e.param == param
    assert e.body()["error"]["param"] == param
    assert e.message and "Traceback" not in e.message


GOOD = [
    ("chat", {}, None),
    ("chat", {"response_format": {"type": "text"}}, None),
    ("chat", {"response_format": {"type": "json_object"}}, "json_object"),
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "w", "schema": W, "strict": True}}},
     "json_schema"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
     "json_schema"),
    ("completions", {"guided_json": W}, "json_schema"),
    ("completions", {"guided_json": json.dumps(W)}, "json_schema"),
    ("completions", {"guided_json": True}, "json_schema"),
    ("completions", {"guided_json": {}}, "json_schema"),
    ("completions", {"guided_regex": "[a-z]+@[a-z]+\\.com"}, "regex"),
    ("completions", {"guided_grammar": 'start: "yes" | "no"'}, "grammar"),
    ("completions", {"guided_grammar": 'root ::= "yes" | "no"'}, "grammar"),   # GBNF
    ("completions", {"guided_choice": ["yes", "no"]}, "choice"),
    ("completions", {"response_format": {"type": "json_object"}}, "json_object"),
    ("chat", {"tools": [fn()]}, "tools"),
    ("chat", {"tools": [fn()], "tool_choice": "none"}, None),
    ("chat", {"tools": [fn()], "tool_choice": "none", "guided_regex": "a+"}, "regex"),
    ("chat", {"tools": [fn()], "tool_choice": "required"}, "tools"),
    ("chat", {"tools": [fn(params=None)], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}, "tools"),
    ("chat", {"tools": [fn()], "response_format": {"type": "json_object"}}, "tools"),
    ("chat", {"tool_choice": "none"}, None),
]


@pytest.mark.parametrize("endpoint,body,kind", GOOD)
def test_valid_bodies(endpoint, body, kind):
    s = parse_structured(body, endpoint)
    if kind is None:
        assert s.constraint is None
    else:
        assert s.constraint.kind == kind
        assert isinstance(s.constraint.grammar, str) and s.constraint.grammar


def test_tools_spec_fields():
    s = parse_structured({"tools": [fn(), fn(name="b", params=None)],
                          "tool_choice": {"type": "function", "function": {"name": "b"}},
                          "parallel_tool_calls": False}, "chat")
    t = s.tools
    assert t.choice == "function" and t.function == "b" and t.parallel is False
    assert t.names == ("get_weather", "b")
    assert [x["function"]["name"] for x in t.callable_tools] == ["b"]
    assert t.tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_grammar_compiled_once_per_text():
    from tep.structured import grammar as G
    before = G._json_grammar.cache_info().hits
    parse_structured({"guided_json": {"type": "integer", "minimum": 123456}}, "completions")
    parse_structured({"guided_json": {"type": "integer", "minimum": 123456}}, "completions")
    assert G._json_grammar.cache_info().hits == before + 1


def test_unsupported_names_the_constraint_field():
    from tep.structured import unsupported
    unsupported(parse_structured({}, "chat"))                  # nothing to honour: fine
    unsupported(parse_structured({"tools": [fn()], "tool_choice": "none"}, "chat"))
    for body, param in [({"guided_regex": "a+"}, "guided_regex"),
                        ({"tools": [fn()]}, "tools"),
                        ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(BadRequestError) as ei:
            unsupported(parse_structured(body, "chat"), "the toy backend")
        assert ei.value.param == param and ei.value.status == 400
