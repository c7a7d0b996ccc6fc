"""The toy backend over HTTP (Quart test client) and directly: every Sampling knob works."""
from __future__ import annotations

import numpy as np
import pytest
from support.http import check_stream_rules, client_for, post_json, post_stream, stream_text

pytest.importorskip("tep.kernels")
from tep.backends.toy import EOS, ToyBackend, chat_template  # noqa: E402

pytestmark = pytest.mark.anyio
CMPL, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
BASE = {"model": "tep-toy", "prompt": "The cat", "max_tokens": 24}


async def _text(c, **kw):
    st, b = await post_json(c, CMPL, {**BASE, **kw})
    assert st == 200, b
    return b["choices"][0]["text"]


async def test_seeded_determinism_and_stream_equality():
    async with client_for(ToyBackend()) as c:
        a = await _text(c, seed=7)
        assert a == await _text(c, seed=7)
        assert a != await _text(c, seed=8)
        for extra in ({}, {"logprobs": 3}, {"stop": [" "]}, {"n": 2, "top_p": 0.8},
                      {"presence_penalty": 1.0, "frequency_penalty": 0.5, "top_k": 20},
                      {"temperature": 0}):
            body = {**BASE, "seed": 7, **extra}
            _, full = await post_json(c, CMPL, body)
            st, ev, _ = await post_stream(c, CMPL, body)
            check_stream_rules(ev, body.get("n", 1), chat=False, include_usage=False)
            assert stream_text(ev, chat=False) == {ch["index"]: ch["text"]
                                                   for ch in full["choices"]}, extra


async def test_greedy_equivalents():
    async with client_for(ToyBackend()) as c:
        greedy = await _text(c, temperature=0)
        assert greedy == await _text(c, temperature=0, seed=123)
        assert greedy == await _text(c, top_k=1, seed=5)
        assert greedy == await _text(c, min_p=1.0, seed=6)
        assert greedy == await _text(c, top_p=1e-9, seed=7)
        assert greedy != await _text(c, temperature=0, frequency_penalty=2.0)
        assert greedy != await _text(c, temperature=0, repetition_penalty=5.0)


async def test_logit_bias_and_allowed_tokens():
    async with client_for(ToyBackend()) as c:
        assert await _text(c, seed=1, logit_bias={str(ord("x")): 100}) == "x" * 24
        t = await _text(c, seed=1, allowed_token_ids=[ord("a"), ord("b")])
        assert set(t) <= {"a", "b"} and len(t) == 24
        st, b = await post_json(c, CMPL, {**BASE, "logit_bias": {"99999": 5}})
        assert st == 400 and b["error"]["param"] == "logit_bias"
        st, b = await post_json(c, CMPL, {**BASE, "prompt": [300]})
        assert st == 400 and b["error"]["param"] == "prompt"


async def test_eos_stops_with_stop_reason():
    async with client_for(ToyBackend()) as c:
        _, b = await post_json(c, CMPL, {**BASE, "logit_bias": {str(EOS): 100}, "seed": 1})
    ch = b["choices"][0]
    assert ch["text"] == "" and ch["finish_reason"] == "stop"
    assert b["usage"]["completion_tokens"] == 1


async def test_logprobs_are_model_logprobs():
    async with client_for(ToyBackend()) as c:
        _, b = await post_json(c, CMPL, {**BASE, "seed": 3, "logprobs": 5, "temperature": 0.7})
    lp = b["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 24 and len(lp["top_logprobs"]) == 24
    for tl, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert tl <= 0 and len(top) == 5
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True)
        assert tl <= vals[0] + 1e-6
    # greedy picks the top-1 token
    async with client_for(ToyBackend()) as c:
        _, g = await post_json(c, CMPL, {**BASE, "temperature": 0, "logprobs": 1})
    glp = g["choices"][0]["logprobs"]
    for tok, tl, top in zip(glp["tokens"], glp["token_logprobs"], glp["top_logprobs"]):
        assert abs(tl - max(top.values())) < 1e-6


async def test_chat_and_embeddings():
    async with client_for(ToyBackend()) as c:
        msgs = [{"role": "user", "content": "hi"}]
        _, a = await post_json(c, CHAT, {"model": "tep-toy", "messages": msgs, "seed": 2,
                                         "max_tokens": 10})
        assert a["usage"]["prompt_tokens"] == len(chat_template(msgs).encode())
        st, ev, _ = await post_stream(c, CHAT, {"model": "tep-toy", "messages": msgs, "seed": 2,
                                                "max_tokens": 10})
        check_stream_rules(ev, 1, chat=True, include_usage=False)
        assert stream_text(ev, chat=True)[0] == a["choices"][0]["message"]["content"]
        st, b = await post_json(c, CHAT, {"model": "tep-toy", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert st == 400
        _, e = await post_json(c, EMB, {"model": "tep-toy", "input": ["hello", "hello", "bye"]})
        v = [np.array(d["embedding"]) for d in e["data"]]
        assert v[0].shape == (64,) and abs(np.linalg.norm(v[0]) - 1) < 1e-5
        np.testing.assert_array_equal(v[0], v[1])
        assert not np.allclose(v[0], v[2])
        _, d = await post_json(c, EMB, {"model": "tep-toy", "input": "hello", "dimensions": 16})
        np.testing.assert_allclose(d["data"][0]["embedding"],
                                   v[0][:16] / np.linalg.norm(v[0][:16]), rtol=1e-5, atol=1e-7)
        st, _ = await post_json(c, EMB, {"model": "tep-toy", "input": "x", "dimensions": 65})
        assert st == 400


def test_tokenize_detokenize_and_big_vocab():
    b = ToyBackend()
    s = "héllo wörld ✓"
    assert b.detokenize("tep-toy", b.tokenize("tep-toy", s)) == s
    assert b.detokenize("tep-toy", [104, EOS, 105]) == "hi"
    big = ToyBackend(vocab_size=1000)
    assert big.detokenize("tep-toy", [300]) == big.detokenize("tep-toy", [300])
    assert big.detokenize("tep-toy", [300]).startswith(" ")
    from tep.backend import Sampling

    c = big.generate_from_tokens("tep-toy", [1, 2], Sampling(max_tokens=8, seed=1,
                                                             logit_bias={500: 100}))
    assert c.token_ids == [500] * 8 and c.text == big.detokenize("tep-toy", [500]) * 8


async def test_instant_mode():
    async with client_for(ToyBackend(instant=True)) as c:
        t = await _text(c, seed=1, max_tokens=30)
        assert len(t) == 30 and t == await _text(c, seed=1, max_tokens=30)
        _, e = await post_json(c, EMB, {"model": "tep-toy", "input": [1, 2]})
        assert len(e["data"][0]["embedding"]) == 64
