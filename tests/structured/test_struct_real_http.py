"""The structured failures of the real model, over HTTP with the official openai client
against ``tep serve --backend llamacpp`` (SmolLM2-135M-Instruct):

- a named ``tool_choice`` with ``parallel_tool_calls`` left at its default gives exactly
  one call of that function and ``finish_reason: "tool_calls"`` (streamed and not);
- ``guided_regex`` ``a{1000000}`` / ``((a{100}){100}){100}`` on chat is a 400 naming the
  field (it was a 500), and the server keeps serving.
"""
from __future__ import annotations

import json

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from support.process import stop_process  # noqa: E402
from support import smollm2  # noqa: E402


WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time",
                                           "description": "Local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What's the weather in Paris and in Rome?"}]


@pytest.fixture(scope="module")
def oai():
    proc, url = smollm2.serve(context_size=1024, threads=1, max_num_seqs=4, max_concurrency=8)
    yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    stop_process(proc)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_choice_gives_one_call(oai, seed):
    model = oai.models.list().data[0].id
    kw = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=120, seed=seed,
              temperature=0.8,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = oai.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"}
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    ids = {tc.id for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.id}
    assert len(ids) == 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("regex", ["a{1000000}", "((a{100}){100}){100}"])
def test_huge_regex_is_400_and_the_server_serves_on(oai, regex):
    model = oai.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=model, messages=ASK, max_tokens=8,
                                    extra_body={"guided_regex": regex})
    err = ei.value.body
    # refused by the probe, or (on a slow machine) by the compile budget first
    assert err["param"] == "guided_regex"
    assert err["code"] in ("constraint_failed", "grammar_too_complex")
    r = oai.chat.completions.create(model=model, messages=ASK, max_tokens=8,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
