"""Tool calls: the grammar makes valid calls, the parser turns them into OpenAI
``tool_calls``, and streamed deltas assembled by the openai client's own stream helper equal
the non-streamed parse."""
from __future__ import annotations

import itertools
import json
import random

import jsonschema
import numpy as np
import pytest

from struct_drive import generate, toy_bias
from tep.structured import (ContentDelta, ToolCallDelta, ToolCallStream, chunk_deltas,
                            finish_reason, make_constraint, parse_structured,
                            parse_tool_calls, prepare_messages)
from tep.structured.tokenizer import byte_tokenizer

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a+b",
                                           "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


# ---- parsing -------------------------------------------------------------------------------

def test_plain_text_is_content():
    r = parse_tool_calls("Hello, <b>world</b>")
    assert r.content == "Hello, <b>world</b>" and r.tool_calls == []
    assert r.message() == {"role": "assistant", "content": "Hello, <b>world</b>"}


def test_one_call():
    r = parse_tool_calls('<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>')
    assert r.content is None
    (c,) = r.tool_calls
    assert c.name == "add" and json.loads(c.arguments) == {"a": 1, "b": 2}
    assert c.id.startswith("call_") and len(c.id) > 10
    m = r.message()
    assert m["tool_calls"][0]["type"] == "function"
    assert m["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a":1,"b":2}'}


def test_parallel_calls_and_spaced_json():
    text = ('<tool_call>\n{ "name" : "get_weather", "arguments" : {"city": "Paris \\"x\\" }"} }'
            '\n</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a":-1,"b":[]}}'
            '\n</tool_call>')
    r = parse_tool_calls(text)
    assert [c.name for c in r.tool_calls] == ["get_weather", "add"]
    assert json.loads(r.tool_calls[0].arguments) == {"city": 'Paris "x" }'}
    assert json.loads(r.tool_calls[1].arguments) == {"a": -1, "b": []}
    assert len({c.id for c in r.tool_calls}) == 2


def test_arguments_before_name_fall_back_to_whole_parse():
    r = parse_tool_calls('<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}'
                         '</tool_call>')
    assert r.tool_calls[0].name == "add"
    assert json.loads(r.tool_calls[0].arguments) == {"a": 1, "b": 2}


def test_broken_call_is_kept_as_text():
    r = parse_tool_calls("<tool_call>not json</tool_call>")
    assert r.tool_calls == [] and r.content == "<tool_call>not json"


def test_tag_prefix_is_held_back_then_released():
    p = ToolCallStream()
    assert p.feed("<tool") == []
    assert p.feed("s are fun") == [ContentDelta("<tools are fun")]
    p2 = ToolCallStream()
    assert p2.feed("<tool_c") == []
    assert p2.finish() == [ContentDelta("<tool_c")]


def test_first_delta_has_id_type_and_name():
    p = ToolCallStream(counter_ids())
    d = p.feed('<tool_call>\n{"name":"add","arguments":{"a"')
    assert d[0] == ToolCallDelta(0, "", "call_0", "add")
    assert d[0].to_openai() == {"index": 0, "id": "call_0", "type": "function",
                                "function": {"name": "add", "arguments": ""}}
    assert d[1].to_openai() == {"index": 0, "function": {"arguments": '{"a"'}}
    d2 = p.feed(':1,"b":2}}\n</tool_call>')
    assert "".join(x.arguments for x in d2) == ':1,"b":2}'


def test_finish_reason():
    calls = parse_tool_calls('<tool_call>\n{"name":"add","arguments":{}}\n</tool_call>')
    assert finish_reason("stop", calls) == "tool_calls"
    assert finish_reason("length", calls) == "length"
    assert finish_reason("stop", parse_tool_calls("hi")) == "stop"


# ---- streamed == non-streamed, assembled by the openai client --------------------------------

def _chunks(text_pieces, new_id):
    p = ToolCallStream(new_id)
    deltas = []
    for piece in text_pieces:
        deltas += p.feed(piece)
    deltas += p.finish()
    chunks = [{"role": "assistant", "content": None}] + chunk_deltas(deltas)
    return p, chunks


def _openai_assemble(deltas, reason):
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for i, d in enumerate(deltas + [{}]):
        state.handle_chunk(ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": d, "logprobs": None,
                                       "finish_reason": reason if i == len(deltas) else None}]}))
    return state.get_final_completion().choices[0]


SAMPLES = [
    "Just text, with a < sign and {json}.",
    '<tool_call>\n{"name":"get_weather","arguments":{"city":"Zürich","unit":"c"}}\n</tool_call>',
    '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>\n<tool_call>\n'
    '{"name":"get_weather","arguments":{"city":"a\\"}{[\\\\"}}\n</tool_call>',
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_assembles_to_the_whole_parse(text):
    whole = parse_tool_calls(text, counter_ids())
    rng = random.Random(0)
    splits = [[text], list(text)]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        splits.append([text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])])
    for pieces in splits:
        p, chunks = _chunks(pieces, counter_ids())
        reason = finish_reason("stop", p)
        choice = _openai_assemble(chunks, reason)
        msg = choice.message
        assert choice.finish_reason == ("tool_calls" if whole.tool_calls else "stop")
        assert msg.content == whole.content
        got = [(c.id, c.function.name, c.function.arguments) for c in (msg.tool_calls or [])]
        assert got == [(c.id, c.name, c.arguments) for c in whole.tool_calls]
        # an independent reading of the same text: arguments are the JSON the model wrote
        for c in whole.tool_calls:
            assert isinstance(json.loads(c.arguments), dict)


# ---- grammar-driven generation ---------------------------------------------------------------

TOK = byte_tokenizer(257)
BIAS = toy_bias(257)


EOS_BIAS = BIAS.copy()
EOS_BIAS[256] = 5.0      # free text ends only on EOS: make it likely enough


def _gen(body, seed):
    s = parse_structured({"messages": [], **body}, "chat")
    c = make_constraint(s.constraint, TOK)
    ids = generate(c, seed=seed, bias=EOS_BIAS)
    return bytes(ids[:-1]).decode("utf-8")


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_calls_validate(choice, parallel):
    n_calls = []
    for seed in range(8):
        text = _gen({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel},
                    seed)
        r = parse_tool_calls(text)
        assert r.content is None and r.tool_calls, text
        n_calls.append(len(r.tool_calls))
        for c in r.tool_calls:
            if isinstance(choice, dict):
                assert c.name == "add"
            jsonschema.validate(json.loads(c.arguments), PARAMS[c.name])
    if not parallel:
        assert set(n_calls) == {1}


def test_auto_gives_text_or_valid_calls():
    kinds = set()
    for seed in range(30):
        text = _gen({"tools": TOOLS, "tool_choice": "auto"}, seed)
        r = parse_tool_calls(text)
        if r.tool_calls:
            kinds.add("calls")
            assert r.content is None
            for c in r.tool_calls:
                jsonschema.validate(json.loads(c.arguments), PARAMS[c.name])
        else:
            kinds.add("text")
            assert r.content == text and not text.startswith("<tool_call>")
    assert "text" in kinds


def test_auto_with_bias_toward_the_tag_makes_calls():
    """With the tag's bytes favoured at the first steps, auto takes the call branch, and
    the calls validate."""
    steps = np.zeros((len("<tool_call>"), 257), np.float32)
    for i, ch in enumerate("<tool_call>"):
        steps[i, ord(ch)] = 30.0
    s = parse_structured({"tools": TOOLS}, "chat")
    for seed in range(5):
        c = make_constraint(s.constraint, TOK)
        text = bytes(generate(c, seed=seed, bias=EOS_BIAS, step_bias=steps)[:-1]).decode()
        r = parse_tool_calls(text)
        assert r.tool_calls, text
        for call in r.tool_calls:
            jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


def test_auto_with_json_response_format():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    body = {"tools": TOOLS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    for seed in range(10):
        r = parse_tool_calls(_gen(body, seed))
        if r.tool_calls:
            for c in r.tool_calls:
                jsonschema.validate(json.loads(c.arguments), PARAMS[c.name])
        else:
            jsonschema.validate(json.loads(r.content), schema)


# ---- chat template preparation ---------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}<|im_start|>assistant\n")
TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}"
                  "{% endif %}" + CHATML)


def test_template_without_tools_gets_a_system_instruction():
    from tep.engine.chat_template import render_chat
    spec = parse_structured({"tools": TOOLS, "tool_choice": "required"}, "chat").tools
    msgs, tools = prepare_messages(HISTORY, spec, CHATML)
    assert tools is None
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    assert "<tool_call>" in msgs[0]["content"]
    text = render_chat(CHATML, msgs, tools=tools)
    assert '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21C\n</tool_response>" in text
    assert HISTORY[1]["content"] is None          # the request's messages are not modified


def test_template_with_tools_gets_them():
    from tep.engine.chat_template import render_chat
    spec = parse_structured({"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "add"}}}, "chat").tools
    msgs, tools = prepare_messages(HISTORY[:1], spec, TOOLS_TEMPLATE)
    assert msgs == HISTORY[:1]
    assert [t["function"]["name"] for t in tools] == ["add"]
    assert render_chat(TOOLS_TEMPLATE, msgs, tools=tools).startswith("TOOLS:add;")


def test_tool_choice_none_shows_no_tools():
    spec = parse_structured({"tools": TOOLS, "tool_choice": "none"}, "chat").tools
    msgs, tools = prepare_messages(HISTORY[:1], spec, TOOLS_TEMPLATE)
    assert tools is None
    msgs, tools = prepare_messages(HISTORY[:1], spec, CHATML)
    assert msgs == HISTORY[:1] and tools is None
