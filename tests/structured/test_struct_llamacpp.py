"""The llguidance tokenizer built from a llama.cpp vocabulary (SmolLM2-135M-Instruct):
token bytes match llama.cpp's own detokenizer, every end-of-generation id ends a finished
grammar, tool calls generated on the real vocabulary parse and validate."""
from __future__ import annotations

import json

import jsonschema
import numpy as np

from struct_drive import generate
from struct_real import smol  # noqa: F401  (fixture)
from tep.structured import (allocate_bitmask, allowed_token_ids, fill_bitmasks,
                            make_constraint, parse_structured, parse_tool_calls)
from tep.structured.tokenizer import llamacpp_tokenizer

EOG = (2, 0)


def test_tokenizer_matches_llama_detokenize(smol):
    tok = llamacpp_tokenizer(smol, eos_ids=EOG)
    assert tok.vocab_size == smol.n_vocab() == 49152
    assert sorted(tok.eos_tokens) == sorted(EOG)
    assert llamacpp_tokenizer(smol, eos_ids=EOG) is tok          # cached
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.choice(np.arange(20, tok.vocab_size), 300, replace=False)]
    for i in ids:
        assert tok.decode_bytes([i]) == smol.detokenize([i]), i
    text = "Hello, world! {\"a\": [1, 2]}"
    assert smol.detokenize(tok.tokenize_str(text)).decode() == text


def test_finished_grammar_allows_exactly_the_eog_ids(smol):
    tok = llamacpp_tokenizer(smol, eos_ids=EOG)
    c = make_constraint(parse_structured({"guided_choice": ["yes"]}, "completions").constraint,
                        tok)
    for t in smol.tokenize(b"yes", add_bos=False, special=False):
        assert c.accept(t)
    bm = allocate_bitmask(1, tok.vocab_size)
    fill_bitmasks([c], [0], bm)
    assert sorted(allowed_token_ids(bm[0], tok.vocab_size).tolist()) == sorted(EOG)
    assert c.is_finished


def test_tool_calls_on_the_real_vocabulary(smol):
    params = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 12},
                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}}]
    tok = llamacpp_tokenizer(smol, eos_ids=EOG)
    for choice in ("required", {"type": "function", "function": {"name": "forecast"}}):
        s = parse_structured({"tools": tools, "tool_choice": choice}, "chat")
        for seed in range(2):
            c = make_constraint(s.constraint, tok)
            ids = generate(c, seed=seed, max_steps=2000, temperature=0.7)
            r = parse_tool_calls(smol.detokenize(ids[:-1]).decode("utf-8"))
            assert r.tool_calls and r.content is None
            for call in r.tool_calls:
                assert call.name == "forecast"
                jsonschema.validate(json.loads(call.arguments), params)


def test_low_level_owner_with_vocab_pointer(smol):
    """A backend that loads the model with the low-level API passes its vocab pointer."""
    import llama_cpp

    class Owner:               # stands in for tep.backends.llamacpp's model object
        pass

    o = Owner()
    vocab = llama_cpp.llama_model_get_vocab(smol._model.model)
    tok = llamacpp_tokenizer(o, vocab=vocab, eos_ids=EOG, n_vocab=49152 + 64)
    assert tok.vocab_size == 49152 + 64                       # padded logits width
    c = make_constraint(parse_structured({"guided_regex": "[0-9]{3}"}, "completions")
                        .constraint, tok)
    bm = allocate_bitmask(1, tok.vocab_size)
    fill_bitmasks([c], [0], bm)
    allowed = allowed_token_ids(bm[0], tok.vocab_size)
    assert len(allowed) > 0 and allowed.max() < 49152         # padding ids never allowed
    for t in allowed[:50].tolist():
        assert smol.detokenize([t]).decode().isdigit()
