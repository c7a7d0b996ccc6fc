"""Structured outputs through the real engine (the toy model on EngineBackend, behind the
app): every schema's output validates, and constrained sequences batched with
unconstrained ones give each the same tokens as alone."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from struct_schemas import SCHEMAS
from support.http import client_for, post_json

from tep.backends.toy import ToyEngineBackend

pytestmark = pytest.mark.anyio
CMPL = "/v1/completions"


async def test_every_schema_through_the_engine_validates():
    async with client_for(ToyEngineBackend(), max_concurrency=64) as c:
        names = sorted(SCHEMAS)

        async def one(i: int, name: str):
            return name, await post_json(c, CMPL, {
                "model": "tep-toy", "prompt": "JSON: ", "max_tokens": 600, "seed": i,
                "guided_json": SCHEMAS[name]})

        results = await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
    assert len(results) >= 40
    for name, (status, out) in results:
        assert status == 200, (name, out)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", (name, choice)
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS[name])


BODIES = [{"guided_json": {"type": "object", "properties": {
              "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}},
          {}, {"guided_regex": "[a-z]{3,9}"}, {}, {"guided_choice": ["left", "right"]}, {}]


async def test_mixed_batch_gives_each_sequence_its_tokens_alone():
    def body(i: int) -> dict:
        return {"model": "tep-toy", "prompt": "Answer: ", "max_tokens": 40, "seed": 50 + i,
                **BODIES[i]}

    async with client_for(ToyEngineBackend()) as c:
        alone = [await post_json(c, CMPL, body(i)) for i in range(len(BODIES))]
    async with client_for(ToyEngineBackend(), max_concurrency=16) as c:
        together = await asyncio.gather(*(post_json(c, CMPL, body(i))
                                          for i in range(len(BODIES))))
    for (s1, a), (s2, b) in zip(alone, together):
        assert s1 == s2 == 200
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert alone[4][1]["choices"][0]["text"] in ("left", "right")
