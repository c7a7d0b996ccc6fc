"""Grammar failures are the client's 4xx, never a 500, and the engine keeps serving.

- A grammar the matcher cannot follow (a counted repetition whose lexer outgrows
  llguidance's limits) is a 400 naming the field before anything is generated.
- A matcher that gives up mid-generation (here: a right-recursive grammar past a lowered
  ``max_items_in_row``, a real llguidance failure) ends that sequence with an error: a 400
  envelope when not streamed, a stream error event when streamed.
- A mask fill that raises fails only its sequences; ``StepMasks.finish`` never hands out a
  half-written row.
- Named ``tool_choice`` gives one call and ``finish_reason: "tool_calls"``.
- Structured fields are not logged as unknown; really unknown ones still are.

All on the toy engine through the app (Quart's test client, in process).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re

import numpy as np
import pytest

from support.http import client_for, post_json, post_stream
from tep.backends.toy import ToyEngineBackend, toy_tokenizer
from tep.structured import StepMasks, make_constraint, parse_structured
from tep.structured import limits as L
from tep.structured.matcher import ConstraintFailed

MODEL = "tep-toy"
CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "hi"}]
HUGE = ["a{1000000}", "((a{100}){100}){100}"]


def _run(coro_fn, **config):
    async def main():
        b = ToyEngineBackend()
        try:
            async with client_for(b, **config) as c:
                return await coro_fn(c, b)
        finally:
            b.close()
    return asyncio.run(main())


@pytest.mark.parametrize("regex,first_streamed", [(HUGE[0], False), (HUGE[1], True)])
def test_huge_regex_is_400_before_generation(regex, first_streamed):
    async def go(c, b):
        out = []
        for path, body, stream in [(CHAT, {"messages": ASK}, first_streamed),
                                   ("/v1/completions", {"prompt": "x"}, not first_streamed)]:
            req = {"model": MODEL, "guided_regex": regex, "max_tokens": 8, **body}
            if stream:
                st, events, _ = await post_stream(c, path, req)
                out.append((st, events[0]))
            else:
                out.append(await post_json(c, path, req))
        sampled = b.stats.tokens_sampled
        ok = await post_json(c, CHAT, {"model": MODEL, "messages": ASK,
                                       "guided_regex": "[a-c]{3}", "max_tokens": 8})
        return out, sampled, ok

    # no compile budget here: on a loaded machine the walk may take longer than the
    # default budget, which would make it a (also correct) grammar_too_complex 400
    out, sampled, (st, body) = _run(go, grammar_compile_timeout=0)
    for status, err in out:
        assert status == 400, err
        assert err["error"]["param"] == "guided_regex"
        assert err["error"]["code"] == "constraint_failed"
        assert "cannot follow" in err["error"]["message"]
    assert sampled == 0                       # refused before generation
    assert st == 200 and body["choices"][0]["message"]["content"] in \
        {a + b + c for a in "abc" for b in "abc" for c in "abc"}   # still serving


RIGHT_RECURSIVE = 'start: s\ns: "a" s | "a"'


def test_matcher_failure_mid_generation_ends_the_sequence(monkeypatch):
    """llguidance gives up after ~45 tokens (rows past 50 Earley items): not streamed a
    400 naming the field; streamed, the text so far then an error event; then a normal
    request works."""
    monkeypatch.setattr(L, "PARSER_LIMITS", {"max_items_in_row": 50})
    body = {"model": MODEL, "messages": ASK, "guided_grammar": RIGHT_RECURSIVE,
            "max_tokens": 200, "logit_bias": {"256": -100}}   # never end early

    async def go(c, b):
        whole = await post_json(c, CHAT, body)
        st, events, _ = await post_stream(c, CHAT, body)
        after = await post_json(c, CHAT, {"model": MODEL, "messages": ASK,
                                          "guided_choice": ["yes", "no"]})
        return whole, (st, events), after, b.stats.failed

    (st, err), (sst, events), (ast, after), failed = _run(go)
    assert st == 400 and err["error"]["param"] == "guided_grammar"
    assert err["error"]["code"] == "constraint_failed"
    assert "max is 50" in err["error"]["message"]
    assert sst == 200
    text = "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if isinstance(e, dict) and e.get("choices"))
    assert len(text) > 20 and set(text) == {"a"}       # it did generate, then failed
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "constraint_failed"
    assert events[-1] == "[DONE]"
    assert failed == 2
    assert ast == 200 and after["choices"][0]["message"]["content"] in ("yes", "no")


class _Raises:
    """A constraint whose mask fill raises (a grammar engine failure)."""

    param = "guided_json"
    _eos_row = None
    failed = None

    def fill_bitmask(self, row):
        raise RuntimeError("mask engine broke")


def test_failed_fill_leaves_no_half_written_rows():
    tok = toy_tokenizer(257)
    good = make_constraint(parse_structured({"guided_regex": "[0-9]{3}"},
                                            "completions").constraint, tok)
    bad = make_constraint(parse_structured({"guided_json": {"type": "object"}},
                                           "completions").constraint, tok)
    broken = _Raises()
    broken._eos_row = bad._eos_row
    masks = StepMasks(257)
    masks.start(3, [(0, good), (2, broken)])
    res = masks.finish()
    assert isinstance(res.error, RuntimeError)
    assert isinstance(broken.failed, ConstraintFailed)
    assert broken.failed.param == "guided_json"
    eos_only = np.zeros(9, np.int32)
    eos_only[256 >> 5] = np.int32(np.uint32(1 << (256 & 31)).view(np.int32))
    assert np.array_equal(res.bitmask[2], eos_only)
    assert np.array_equal(res.bitmask[1], np.full(9, -1, np.int32))  # unconstrained
    masks.start(1, [(0, good)])                     # the helper still works afterwards
    res2 = masks.finish()
    assert res2.error is None and res2.bitmask.shape == (1, 9)
    masks.close()


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "noop"}}]


@pytest.mark.parametrize("parallel", [None, True])
def test_named_tool_choice_gives_exactly_one_call(parallel):
    async def go(c, b):
        outs = []
        for seed in range(6):
            body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "seed": seed,
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "max_tokens": 300}
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
            outs.append(await post_json(c, CHAT, body))
            st, events, _ = await post_stream(c, CHAT, body)
            outs.append((st, events))
        return outs

    outs = _run(go)
    for st, body in outs[0::2]:
        assert st == 200
        ch = body["choices"][0]
        calls = ch["message"]["tool_calls"]
        assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
        json.loads(calls[0]["function"]["arguments"])
        assert ch["finish_reason"] == "tool_calls"
    for st, events in outs[1::2]:
        chunks = [e for e in events if isinstance(e, dict)]
        starts = [tc for e in chunks for tc in e["choices"][0]["delta"].get("tool_calls") or []
                  if tc.get("id")]
        assert len(starts) == 1
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_named_tool_choice_grammar_allows_one_call():
    spec = parse_structured({"tools": TOOLS, "parallel_tool_calls": True, "tool_choice":
                             {"type": "function", "function": {"name": "noop"}}}, "chat")
    assert spec.tools.parallel is False
    auto = parse_structured({"tools": TOOLS}, "chat")
    assert auto.tools.parallel is True


@pytest.mark.parametrize("path,extra", [
    (CHAT, {"messages": ASK, "guided_regex": "[ab]{2}"}),
    (CHAT, {"messages": ASK, "guided_grammar": 'start: "x" | "y"'}),
    (CHAT, {"messages": ASK, "guided_choice": ["p", "q"]}),
    (CHAT, {"messages": ASK, "guided_json": {"type": "object"}}),
    (CHAT, {"messages": ASK, "response_format": {"type": "json_object"}}),
    (CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": "auto",
            "parallel_tool_calls": False}),
    ("/v1/completions", {"prompt": "x", "guided_regex": "[ab]{2}"}),
    ("/v1/completions", {"prompt": "x", "guided_choice": ["p", "q"]}),
])
def test_structured_fields_are_not_logged_as_unknown(caplog, path, extra):
    async def go(c, b):
        a = await post_json(c, path, {"model": MODEL, "max_tokens": 4, **extra})
        z = await post_json(c, path, {"model": MODEL, "max_tokens": 4, "zzz_bogus": 1,
                                      **extra})
        return a, z

    with caplog.at_level(logging.INFO, logger="tep"):
        (st, _), (st2, _) = _run(go)
    assert st == 200 and st2 == 200
    unknown = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0].endswith("zzz_bogus"), unknown


def test_n_choices_get_independent_matchers():
    """One compile, copied per choice: every choice follows the grammar on its own."""
    async def go(c, b):
        return await post_json(c, CHAT, {"model": MODEL, "messages": ASK, "n": 4,
                                         "seed": 5, "max_tokens": 16,
                                         "guided_regex": "(yes|no)-[0-9]{2}"})

    st, body = _run(go)
    assert st == 200 and len(body["choices"]) == 4
    for ch in body["choices"]:
        assert re.fullmatch(r"(yes|no)-[0-9]{2}", ch["message"]["content"]), ch
        assert ch["finish_reason"] == "stop"
    assert len({ch["message"]["content"] for ch in body["choices"]}) > 1
