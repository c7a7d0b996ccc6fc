"""``/v1/responses`` on the real model (SmolLM2-135M-Instruct through llama.cpp), with the
official openai client: answers equal chat completions' for the same messages (greedy),
a stream's final response equals the non-streamed one, a stored conversation continues,
and a forced function call validates. Short answers: the model runs on the CPU."""
from __future__ import annotations

import json

import jsonschema
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from support.process import stop_process  # noqa: E402
from support import smollm2  # noqa: E402


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
           "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oai(tmp_path_factory):
    store = tmp_path_factory.mktemp("real") / "responses.sqlite3"
    proc, url = smollm2.serve("--responses-store", str(store), context_size=1024, threads=1,
                              max_num_seqs=4)
    yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    stop_process(proc)


def test_real_model_responses(oai):
    model = oai.models.list().data[0].id
    kw = dict(model=model, instructions="You are a helpful assistant.",
              input="What is the capital of France?", max_output_tokens=24, temperature=0)
    r = oai.responses.create(**kw)
    ref = oai.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert r.output_text == ref.choices[0].message.content and "Paris" in r.output_text
    assert (r.usage.input_tokens, r.usage.output_tokens) == \
        (ref.usage.prompt_tokens, ref.usage.completion_tokens)

    with oai.responses.stream(**kw) as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response() if r.status == "completed" else None
    assert deltas == r.output_text
    if final is not None:
        assert final.output_text == r.output_text and final.usage == r.usage

    nxt = oai.responses.create(model=model, previous_response_id=r.id, temperature=0,
                               input="And of Italy?", max_output_tokens=16)
    ref2 = oai.chat.completions.create(model=model, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": r.output_text},
        {"role": "user", "content": "And of Italy?"}])
    assert nxt.output_text == ref2.choices[0].message.content


def test_real_model_function_call(oai):
    model = oai.models.list().data[0].id
    kw = dict(model=model, input="What is the weather in Paris?", temperature=0,
              tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER,
                      "strict": True}],
              tool_choice="required", parallel_tool_calls=False, max_output_tokens=64)
    r = oai.responses.create(**kw)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    # streamed, the model's own token pieces: the same call, byte for byte
    with oai.responses.stream(**kw) as s:
        pieces = [e.delta for e in s if e.type == "response.function_call_arguments.delta"]
        final = s.get_final_response()
    assert "".join(pieces) == call.arguments
    assert [(o.type, o.name, o.arguments) for o in final.output] == \
        [("function_call", call.name, call.arguments)]
