"""EngineBackend behind the real app (Quart test client): stream == non-stream, errors in
the envelope, no thread per stream, context limits, chat template, prefix counters and
cross-request embedding batching."""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import EOG, HashModel  # noqa: E402
from server_helpers import client_for, post_json, post_stream  # noqa: E402

from tep.backends.toy import CHAT_TEMPLATE, ToyBackend, ToyModel, chat_template  # noqa: E402
from tep.engine import BatchedEmbeddings, EngineBackend  # noqa: E402

pytestmark = pytest.mark.anyio

KNOBS = [{"temperature": 0.0}, {"temperature": 1.1, "top_k": 9, "seed": 4},
         {"temperature": 0.8, "top_p": 0.7, "min_p": 0.05, "seed": 5,
          "frequency_penalty": 1.0, "presence_penalty": -0.5, "repetition_penalty": 1.2},
         {"temperature": 1.0, "seed": 6, "logit_bias": {"65": 3}, "logprobs": 3}]


def _text(events, k=0):
    return "".join(e["choices"][0]["text"] for e in events[:-1]
                   if e["choices"] and e["choices"][0]["index"] == k)


async def test_streamed_equals_non_streamed_and_n_choices():
    be = EngineBackend(HashModel(16), max_num_seqs=16)
    async with client_for(be) as c:
        for kw in KNOBS:
            body = {"model": "hash", "prompt": "abc", "max_tokens": 20, "n": 3, **kw}
            st, js = await post_json(c, "/v1/completions", body)
            assert st == 200, js
            st, ev, _ = await post_stream(c, "/v1/completions", body)
            assert st == 200
            assert [_text(ev, k) for k in range(3)] == [ch["text"] for ch in js["choices"]]
            if "seed" in kw:   # choice j is the request with seed + j
                body1 = {**body, "n": 1, "seed": kw["seed"] + 2}
                st, one = await post_json(c, "/v1/completions", body1)
                assert one["choices"][0]["text"] == js["choices"][2]["text"]
    be.close()


async def test_forward_failure_is_a_500_and_an_error_event_then_serving_goes_on():
    be = EngineBackend(HashModel(8, poison=255), max_num_seqs=8)
    async with client_for(be) as c:
        st, js = await post_json(c, "/v1/completions", {"model": "hash", "prompt": [255],
                                                        "max_tokens": 3})
        assert st == 500 and js["error"]["type"] == "server_error"
        st, ev, _ = await post_stream(c, "/v1/completions",
                                      {"model": "hash", "prompt": [1], "max_tokens": 50,
                                       "logit_bias": {str(EOG): -100, "255": 100}})
        # the first token is fine (sampled 255, which is then fed and poisons the step)
        assert st == 200 and "error" in ev[-2] and ev[-1] == "[DONE]"
        st, js = await post_json(c, "/v1/completions", {"model": "hash", "prompt": [1],
                                                        "max_tokens": 4, "seed": 1,
                                                        "logit_bias": {str(EOG): -100}})
        assert st == 200 and js["usage"]["completion_tokens"] == 4
    assert be.stats.failed == 2
    be.close()


async def test_64_concurrent_streams_use_no_thread_each():
    be = EngineBackend(HashModel(64), max_num_seqs=64, max_batch_tokens=256)
    peak = [threading.active_count()]
    async with client_for(be, max_concurrency=64) as c:
        async def one(i):
            st, ev, _ = await post_stream(c, "/v1/completions", {
                "model": "hash", "prompt": f"p{i}", "max_tokens": 30, "seed": i,
                "logit_bias": {str(EOG): -100}})
            peak[0] = max(peak[0], threading.active_count())
            return st, _text(ev)

        async def watch():
            for _ in range(200):
                peak[0] = max(peak[0], threading.active_count())
                await asyncio.sleep(0.005)

        w = asyncio.ensure_future(watch())
        got = await asyncio.gather(*(one(i) for i in range(64)))
        w.cancel()
        assert all(st == 200 for st, _ in got)
        st, js = await post_json(c, "/v1/completions", {
            "model": "hash", "prompt": "p7", "max_tokens": 30, "seed": 7,
            "logit_bias": {str(EOG): -100}})
        assert got[7][1] == js["choices"][0]["text"]
    assert peak[0] < 20, peak   # the engine thread serves all 64 streams
    assert be.stats.tokens_sampled >= 64 * 30
    be.close()


async def test_context_size_is_a_400_that_states_the_limits():
    be = EngineBackend(HashModel(4, context_size=32), max_num_seqs=4)
    async with client_for(be) as c:
        st, js = await post_json(c, "/v1/completions", {"model": "hash", "prompt": "x" * 20,
                                                        "max_tokens": 13})
        assert st == 400
        msg = js["error"]["message"]
        assert "32" in msg and "20" in msg and "13" in msg
        assert js["error"]["code"] == "context_length_exceeded"
        st, js = await post_json(c, "/v1/completions", {"model": "hash", "prompt": "x" * 20,
                                                        "max_tokens": 12})
        assert st == 200
    be.close()


async def test_chat_uses_the_models_template_and_matches_the_per_request_toy():
    assert chat_template([{"role": "user", "content": "hi"}, {"role": "tool",
                                                              "content": None}]) == \
        __import__("tep.engine.chat_template", fromlist=["x"]).render_chat(
            CHAT_TEMPLATE, [{"role": "user", "content": "hi"}, {"role": "tool",
                                                                "content": None}])
    toy = ToyBackend()
    be = EngineBackend(ToyModel(toy, max_num_seqs=8), max_num_seqs=8)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "he"},
                                         {"type": "text", "text": "llo"}]}]
    async with client_for(be) as c, client_for(toy) as r:
        body = {"model": "tep-toy", "messages": msgs, "max_tokens": 12, "seed": 3}
        st, a = await post_json(c, "/v1/chat/completions", body)
        st2, b = await post_json(r, "/v1/chat/completions", body)
        assert st == st2 == 200
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert a["usage"] == b["usage"]
        st, js = await post_json(c, "/v1/chat/completions", {
            "model": "tep-toy", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert st == 400
    be.close()


class PrefixModel(HashModel):
    """HashModel + prefix reuse of released sequences' prompts (a dict of prompts)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cached: list[list[int]] = []
        self.fed: dict[int, list[int]] = {}

    def forward(self, batch):
        for t, s in zip(batch.token_ids.tolist(), batch.seq_ids.tolist()):
            self.fed.setdefault(s, []).append(t)
        return super().forward(batch)

    def reuse_prefix(self, seq_id, prompt):
        best = 0
        for p in self.cached:
            n = 0
            while n < min(len(p), len(prompt)) and p[n] == prompt[n]:
                n += 1
            best = max(best, n)
        best = min(best, len(prompt) - 1)
        for t in prompt[:best]:   # "copy the cache": replay the prefix
            self.last[seq_id] = (self.last[seq_id, 1], t)
        self.length[seq_id] = best
        return best

    def release(self, seq_id):
        self.cached.append(self.fed.pop(seq_id, []))
        super().release(seq_id)


async def test_prefix_reuse_counts_hits_and_misses():
    m = PrefixModel(4)
    be = EngineBackend(m, max_num_seqs=4)
    async with client_for(be) as c:
        body = {"model": "hash", "prompt": "system prompt: hello", "max_tokens": 5,
                "seed": 2, "logit_bias": {str(EOG): -100}}
        st, a = await post_json(c, "/v1/completions", body)
        st, b = await post_json(c, "/v1/completions", {**body, "prompt":
                                                       "system prompt: bye"})
    assert be.stats.prefix_miss_tokens == 20 + 3
    assert be.stats.prefix_hit_tokens == 15
    ref = EngineBackend(HashModel(4), max_num_seqs=4)
    async with client_for(ref) as c:
        st, b2 = await post_json(c, "/v1/completions", {**body, "prompt":
                                                        "system prompt: bye"})
    assert b["choices"][0]["text"] == b2["choices"][0]["text"]
    be.close()
    ref.close()


async def test_embeddings_are_batched_across_requests():
    toy = ToyBackend()
    calls = []

    class Counting(ToyBackend):
        def generate_embeddings_batch(self, model, ids):
            calls.append(len(ids))
            return super().generate_embeddings_batch(model, ids)

    be = BatchedEmbeddings(Counting(), max_wait_ms=50)
    async with client_for(be, max_concurrency=32) as c:
        texts = [f"sentence number {i}" for i in range(32)]
        res = await asyncio.gather(*(post_json(c, "/v1/embeddings",
                                               {"model": "tep-toy", "input": t})
                                     for t in texts))
    assert all(st == 200 for st, _ in res)
    assert sum(calls) == 32 and len(calls) < 32      # requests shared calls
    for t, (_, js) in zip(texts, res):
        want = toy.generate_embeddings("tep-toy", toy.tokenize("", t))
        np.testing.assert_allclose(js["data"][0]["embedding"], want, rtol=1e-6, atol=1e-7)
    be.close()
    eb = EngineBackend(ToyModel(toy, max_num_seqs=4), max_num_seqs=4)
    async with client_for(eb) as c:
        st, js = await post_json(c, "/v1/embeddings", {"model": "tep-toy",
                                                       "input": ["a", "bc"]})
        assert st == 200 and len(js["data"]) == 2
        st, js = await post_json(c, "/v1/embeddings", {"model": "tep-toy", "input": [[999]]})
        assert st == 400
    eb.close()


def test_load_backend_wraps_a_model(monkeypatch):
    from tep.config import load_backend

    monkeypatch.setenv("TEP_MAX_NUM_SEQS", "12")
    be = load_backend("models:HashModel")
    assert isinstance(be, EngineBackend) and be.engine.sched.max_num_seqs == 12
    assert isinstance(load_backend(None), EngineBackend)   # the default toy
