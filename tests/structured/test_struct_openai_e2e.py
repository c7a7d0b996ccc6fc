"""End to end with the official openai client against a live ``tep serve`` of the toy
model: ``chat.completions.parse`` with a pydantic model, tool-call round trips (required
and a named function), streamed tool calls equal to non-streamed ones, guided_* on
completions, 400s that name the field.

The toy model runs on the engine, which applies the grammar masks inside its one
``sample`` call per step.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

TOY = "tep.backends.toy:ToyEngineBackend"
SCRIPT = "support.backends:ScriptBackend"
MODEL = "tep-toy"


WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object",
       "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                      "b": {"type": "integer", "minimum": -99, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_parse_with_pydantic_model(live_server):
    c = client(live_server(TOY))
    for seed in range(3):
        r = c.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                     max_tokens=400, seed=seed)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(msg.parsed, Person)
        Person.model_validate_json(msg.content)


def _check_calls(msg, names):
    assert msg.tool_calls
    for call in msg.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"})])
def test_tool_round_trip(live_server, choice, names):
    c = client(live_server(TOY))
    # one call: the toy model's random text rarely picks EOS, so with parallel calls
    # allowed it keeps calling until max_tokens
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                  parallel_tool_calls=False, max_tokens=300, seed=4)
    assert r.choices[0].finish_reason == "tool_calls"
    msg = r.choices[0].message
    _check_calls(msg, names)
    history = ASK + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": "21C, sunny"}
        for call in msg.tool_calls]
    final = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                      tool_choice="none", max_tokens=40, seed=4)
    assert isinstance(final.choices[0].message.content, str)
    assert not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_equal_non_streamed(live_server, choice):
    c = client(live_server(TOY))
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300,
              seed=9, parallel_tool_calls=False)
    whole = c.chat.completions.create(**kw).choices[0]
    first_deltas = {}
    with c.chat.completions.stream(**kw) as s:
        for ev in s:
            if ev.type == "chunk" and ev.chunk.choices:
                for tc in ev.chunk.choices[0].delta.tool_calls or []:
                    if tc.index not in first_deltas:
                        first_deltas[tc.index] = tc
                        assert tc.id and tc.type == "function" and tc.function.name
                    else:
                        assert tc.id is None and tc.function.name is None
        streamed = s.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    got = [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls]
    want = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert got == want


def test_parallel_tool_calls_false_gives_one_call(live_server):
    c = client(live_server(TOY))
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                      tool_choice="required", parallel_tool_calls=False,
                                      max_tokens=300, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


def test_guided_extras_on_completions(live_server):
    c = client(live_server(TOY))
    r = c.completions.create(model=MODEL, prompt="Mail: ", max_tokens=60, seed=1,
                             extra_body={"guided_regex": "[a-z]{1,8}@[a-z]{1,8}\\.com"})
    assert re.fullmatch("[a-z]{1,8}@[a-z]{1,8}\\.com", r.choices[0].text)
    r = c.completions.create(model=MODEL, prompt="Pick: ", max_tokens=20, seed=1,
                             extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = c.completions.create(model=MODEL, prompt="{", max_tokens=300, seed=1,
                             extra_body={"guided_json": WEATHER})
    jsonschema.validate(json.loads(r.choices[0].text), WEATHER)


def test_invalid_schema_is_400_naming_the_field(live_server):
    c = client(live_server(TOY))
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model=MODEL, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert ei.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "a[b"})
    assert ei.value.param == "guided_regex"


def test_backend_without_masks_refuses_constraints(live_server):
    c = client(live_server(SCRIPT))
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="script", messages=ASK,
                                  response_format={"type": "json_object"})
    assert ei.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="script", messages=ASK, tools=TOOLS)
    assert ei.value.param == "tools"
