"""Prometheus metrics at /metrics (tep.obs.metrics): names, labels and values after real
requests through the Quart test client. Several workers: tests/test_workers.py."""
from __future__ import annotations

import asyncio
import re

import pytest
from support.backends import ScriptBackend
from support.http import client_for, post_json, post_stream

from support.prometheus import parse
from tep.obs.metrics import sample_values
from tep.wire.routes import endpoint_label

pytestmark = pytest.mark.anyio

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hello"}]


async def _metrics(c) -> dict:
    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return parse((await r.get_data()).decode())


def _v(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_histograms_and_labels():
    async with client_for(ScriptBackend()) as c:
        for _ in range(3):
            st, _ = await post_json(c, CMPL, {"model": "script", "prompt": [9, 9],
                                              "max_tokens": 4})
            assert st == 200
        st, ev, _ = await post_stream(c, CMPL, {"model": "script", "prompt": [9],
                                                "max_tokens": 5})
        assert st == 200
        st, ev, _ = await post_stream(c, CHAT, {"model": "script", "messages": MSGS,
                                                "max_tokens": 3})
        assert st == 200
        assert (await post_json(c, CMPL, {"model": "nope", "prompt": [1]}))[0] == 404
        assert (await post_json(c, CMPL, {"model": "script", "prompt": [1]}))[0] == 500
        assert (await c.get("/v1/models/script")).status_code == 200
        assert (await c.get("/v1/models/../../etc")).status_code == 404
        assert (await c.get("/no/such/route")).status_code == 404
        m = await _metrics(c)
    req = "tep_requests_total"
    assert _v(m, req, endpoint=CMPL, status="200", outcome="ok") == 4
    assert _v(m, req, endpoint=CHAT, status="200", outcome="ok") == 1
    assert _v(m, req, endpoint=CMPL, status="404", outcome="error") == 1
    assert _v(m, req, endpoint=CMPL, status="500", outcome="error") == 1
    assert _v(m, req, endpoint="/v1/models/{model_id}", status="200", outcome="ok") == 1
    assert _v(m, req, endpoint="other", status="404", outcome="error") >= 1
    assert _v(m, "tep_request_duration_seconds_count", endpoint=CMPL) == 6
    assert _v(m, "tep_prompt_tokens_total", endpoint=CMPL) == 3 * 2 + 1 + 1
    assert _v(m, "tep_completion_tokens_total", endpoint=CMPL) == 3 * 4 + 5
    assert _v(m, "tep_completion_tokens_total", endpoint=CHAT) == 3
    # streams only: one first token each, then one gap per further token
    assert _v(m, "tep_time_to_first_token_seconds_count", endpoint=CMPL) == 1
    assert _v(m, "tep_time_to_first_token_seconds_count", endpoint=CHAT) == 1
    assert _v(m, "tep_inter_token_latency_seconds_count", endpoint=CMPL) == 4
    assert _v(m, "tep_inter_token_latency_seconds_count", endpoint=CHAT) == 2
    assert _v(m, "tep_requests_in_flight") == 0 and _v(m, "tep_queue_depth") == 0
    assert not any("/etc" in str(k) or "/no/such" in str(k) for k in m)


async def test_sample_values_reads_what_prometheus_client_parses():
    """tep.obs.metrics.sample_values (the scripts' and Ray tests' reader) against
    prometheus-client's own parser, on a real /metrics text."""
    async with client_for(ScriptBackend()) as c:
        for path, body in ((CMPL, {"model": "script", "prompt": [9], "max_tokens": 2}),
                           (CHAT, {"model": "script", "messages": MSGS, "max_tokens": 2}),
                           (CMPL, {"model": "nope", "prompt": [1]})):
            await post_json(c, path, body)
        assert (await c.get("/v1/models/script")).status_code == 200   # "{" in a label
        text = (await (await c.get("/metrics")).get_data()).decode()
    # and escapes, a timestamp, a name that prefixes another, as the format allows
    text += ('x_total{path="a\\"}\\\\b",n="{1}"} 4 1700000000000\n'
             'x_total{path="c,d"} 5\nx_total_more 6\n')
    want = parse(text)
    names = {name for name, _ in want}
    assert {"tep_requests_total", "tep_queue_depth",
            "tep_request_duration_seconds_bucket", "x_total"} <= names
    unescape = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
    for name in names:
        got = sample_values(text, name)
        ref = {labels: v for (n, labels), v in want.items() if n == name}
        assert len(got) == len(ref), name
        for labels, v in got.items():
            pairs = tuple(sorted((k, re.sub(r"\\.", lambda e: unescape[e.group()], val))
                                 for k, val in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"',
                                                          labels)))
            assert ref[pairs] == v or (v != v and ref[pairs] != ref[pairs]), (name, labels)
    assert sample_values(text, "x_total") == {'{path="a\\"}\\\\b",n="{1}"}': 4.0,
                                              '{path="c,d"}': 5.0}


async def test_in_flight_and_queue_depth_while_busy():
    async with client_for(ScriptBackend(), max_concurrency=1, max_queue=4) as c:
        state = c.app.extensions["tep"]
        slow = {"model": "script", "prompt": [3], "max_tokens": 15}  # 20 ms per token
        tasks = [asyncio.ensure_future(post_stream(c, CMPL, slow)) for _ in range(3)]
        for _ in range(200):
            if state.admission.queued == 2:
                break
            await asyncio.sleep(0.01)
        m = await _metrics(c)
        assert _v(m, "tep_requests_in_flight") == 3
        assert _v(m, "tep_queue_depth") == 2
        assert all(r[0] == 200 for r in await asyncio.gather(*tasks))
        m = await _metrics(c)
        assert _v(m, "tep_requests_in_flight") == 0 and _v(m, "tep_queue_depth") == 0


async def test_metrics_off_is_501():
    async with client_for(ScriptBackend(), metrics=False) as c:
        r = await c.get("/metrics")
        assert r.status_code == 501
        assert (await r.get_json())["error"]["code"] == "metrics_disabled"
        assert (await post_json(c, CMPL, {"model": "script", "prompt": [9]}))[0] == 200


def test_endpoint_label():
    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/models/a/b") == "/v1/models/{model_id}"
    assert endpoint_label("/random") == "other"


async def test_engine_counters_and_prefix_hit_rate_are_exported():
    from support.engine_models import HashModel
    from support.http import client_for, post_json

    from tep.backends.llamacpp_model import PrefixCacheStats
    from tep.engine import EngineBackend

    class Cached(HashModel):
        def reuse_prefix(self, seq_id, prompt):  # as if the first 2 tokens were cached
            self.last[seq_id] = prompt[0], prompt[1]
            self.length[seq_id] = 2
            self.copies += 1                     # as if its stream was copied to place it
            return 2

        copies = 0

        def prefix_cache_stats(self):            # as LlamaCppModel's
            return PrefixCacheStats(0, 0, copies=self.copies, moves=7)

    async with client_for(EngineBackend(Cached(4), max_num_seqs=4)) as c:
        st, _ = await post_json(c, "/v1/completions", {"model": Cached(4).list_models()[0],
                                                        "prompt": [1, 2, 3, 4, 5],
                                                        "max_tokens": 2})
        assert st == 200
        samples = parse((await (await c.get("/metrics")).get_data()).decode())
    assert samples[("tep_prefix_cache_hit_tokens_total", ())] == 2
    assert samples[("tep_prefix_cache_miss_tokens_total", ())] == 3
    assert samples[("tep_prefix_cache_hit_rate", ())] == 0.4
    assert samples[("tep_engine_steps_total", ())] >= 2
    assert samples[("tep_kv_stream_copies_total", ())] == 1
    assert samples[("tep_kv_stream_moves_total", ())] == 7
    # a model without slots exports no KV copy counters
    async with client_for(EngineBackend(HashModel(4), max_num_seqs=4)) as c:
        samples = parse((await (await c.get("/metrics")).get_data()).decode())
    assert ("tep_kv_stream_copies_total", ()) not in samples


def test_a_streams_gaps_recorded_at_once_equal_one_observe_each():
    """The inter-token histogram takes a stream's gaps when it ends (off the per-token
    path): buckets, count and sum must equal prometheus_client's own observe per gap,
    bucket edges included."""
    import random

    from prometheus_client import generate_latest

    from tep.obs.metrics import _ITL, Metrics

    rng = random.Random(3)
    gaps = [rng.choice(_ITL) for _ in range(50)] + [rng.uniform(0, 3.0) for _ in range(200)]
    gaps += [0.0, 1e-9, 99.0]
    one, many = Metrics(), Metrics()
    for g in gaps:
        one._child(one.itl, CHAT).observe(g)
    many.observe_itl_many(CHAT, gaps[:100])
    many.observe_itl_many(CHAT, gaps[100:])
    many.observe_itl_many(CHAT, [])
    a = parse(generate_latest(one.registry).decode())
    b = parse(generate_latest(many.registry).decode())
    keys = [k for k in a if k[0].startswith("tep_inter_token_latency_seconds")
            and not k[0].endswith("_created")]
    assert len(keys) == len(_ITL) + 3     # buckets with +Inf, count, sum
    for k in keys:
        assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-12), k
