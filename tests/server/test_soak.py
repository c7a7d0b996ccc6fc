"""A bounded soak (default 30 s of load, at most 2 minutes; loopback only): mixed
streaming / non-streaming / chat / embeddings traffic with random client disconnects
against a live ``tep serve``. Afterwards: no leaked threads, no growing memory, nothing
left in flight, and every request the client saw complete is in the metrics and the
events (and every disconnect is counted as cancelled or dropped, never as ok).

``TEP_SOAK_SECONDS`` changes the load time (capped at 100)."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter

import httpx
import pytest
from support.process import child_env, free_port, start_process, stop_process, process_log

from support.prometheus import parse

psutil = pytest.importorskip("psutil") if not os.environ.get("CI") else __import__("psutil")

pytestmark = pytest.mark.soak

SECONDS = min(float(os.environ.get("TEP_SOAK_SECONDS", "30")), 100.0)
ROUNDS = 3
CLIENTS = 6
CMPL, CHAT, EMB = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"


async def _sse_done(r: httpx.Response) -> bool:
    done = False
    async for line in r.aiter_lines():
        if line == "data: [DONE]":
            done = True
    return done


async def _one(rng: random.Random, url: str, pool: httpx.AsyncClient, tally: Counter) -> None:
    x = rng.random()
    prompt = [9, rng.randrange(10, 200)]
    if x < 0.30:
        r = await pool.post(url + CMPL, json={"model": "script", "prompt": prompt,
                                              "max_tokens": rng.randrange(1, 20)})
        assert r.status_code == 200, r.text
        tally[("ok", CMPL)] += 1
    elif x < 0.55:
        body = {"model": "script", "prompt": prompt, "max_tokens": rng.randrange(1, 30),
                "stream": True, "logprobs": rng.choice([None, 1])}
        async with pool.stream("POST", url + CMPL, json=body) as r:
            assert r.status_code == 200 and await _sse_done(r)
        tally[("ok", CMPL)] += 1
    elif x < 0.65:
        msgs = [{"role": "user", "content": "hi %d" % rng.randrange(1000)}]
        if rng.random() < 0.5:
            r = await pool.post(url + CHAT, json={"model": "script", "messages": msgs,
                                                  "max_tokens": 8})
            assert r.status_code == 200
        else:
            async with pool.stream("POST", url + CHAT, json={"model": "script", "stream": True,
                                                             "messages": msgs,
                                                             "max_tokens": 8}) as r:
                assert r.status_code == 200 and await _sse_done(r)
        tally[("ok", CHAT)] += 1
    elif x < 0.72:
        r = await pool.post(url + EMB, json={"model": "script", "input": [prompt, [4, 5, 6]]})
        assert r.status_code == 200
        tally[("ok", EMB)] += 1
    elif x < 0.88:  # a long slow stream, dropped after a few chunks
        async with httpx.AsyncClient(timeout=30) as own:
            async with own.stream("POST", url + CMPL, json={
                    "model": "script", "prompt": [3], "max_tokens": 500,
                    "stream": True}) as r:
                assert r.status_code == 200
                want, n = rng.randrange(1, 6), 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        if n >= want:
                            break
        tally[("gone", CMPL)] += 1
    else:  # a slow non-streamed request, abandoned before its answer
        async with httpx.AsyncClient(timeout=30) as own:
            task = asyncio.ensure_future(own.post(url + CMPL, json={
                "model": "script", "prompt": [3], "max_tokens": 500}))
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        tally[("gone", CMPL)] += 1


async def _load(url: str, seconds: float, seed: int, tally: Counter) -> None:
    end = time.monotonic() + seconds
    # idle pooled connections expire before the server's 5 s keep-alive timeout closes them
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as pool:
        async def client(i: int) -> None:
            rng = random.Random(seed * 100 + i)
            while time.monotonic() < end:
                await _one(rng, url, pool, tally)

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def _m(url: str) -> dict:
    return parse(httpx.get(url + "/metrics", timeout=10).text)


def test_soak(tmp_path):
    port = free_port()
    ev = tmp_path / "events.jsonl"
    proc, url = start_process(
        [sys.executable, "-m", "tep", "serve", "--backend", "support.backends:ScriptBackend",
         "--port", str(port), "--max-concurrency", "4", "--max-queue", "1000",
         "--graceful-timeout", "10", "--events-jsonl", str(ev), "--log-level", "warning"],
        port, child_env())
    try:
        server = psutil.Process(proc.pid)
        tally: Counter = Counter()
        asyncio.run(_load(url, 3.0, 0, tally))  # warm up: pools and caches fill once
        time.sleep(1.0)
        threads0 = server.num_threads()
        rss = []
        for k in range(ROUNDS):
            asyncio.run(_load(url, SECONDS / ROUNDS, k + 1, tally))
            time.sleep(0.5)
            rss.append(server.memory_info().rss)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # cancelled backends notice and return
            m = _m(url)
            if m[("tep_requests_in_flight", ())] == 0 and m[("tep_queue_depth", ())] == 0:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        threads1 = server.num_threads()
        m = _m(url)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log = process_log(proc)
    finally:
        stop_process(proc)
    assert code == 0, log[-3000:]
    ok = {ep: n for (kind, ep), n in tally.items() if kind == "ok"}
    gone = sum(n for (kind, _), n in tally.items() if kind == "gone")
    assert sum(ok.values()) > 100 and gone > 10, tally

    # nothing left behind
    assert m[("tep_requests_in_flight", ())] == 0 and m[("tep_queue_depth", ())] == 0
    assert threads1 <= threads0 + 1, (threads0, threads1)
    growth = rss[-1] - rss[0]
    assert growth < 25 * 2**20, [r // 2**20 for r in rss]

    # every completed request is in the metrics ...
    def total(endpoint: str, outcome: str) -> float:
        return sum(v for (name, labels), v in m.items()
                   if name == "tep_requests_total" and dict(labels)["endpoint"] == endpoint
                   and dict(labels)["outcome"] == outcome)

    lines = [json.loads(x) for x in ev.read_text().splitlines()]
    # Known race (see the report of issue 4): rarely, an abandoned *non-streamed* request's
    # disconnect is not seen by the server, so it runs to max_tokens (500, which no
    # completed request of this load asks for) and is sent into the closed socket ("ok").
    unseen = sum(1 for e in lines if e["event"] == "eval" and e["extra"]["outcome"] == "ok"
                 and e["extra"]["completion_tokens"] == 500)
    assert unseen <= max(2, gone // 100), unseen
    for ep in (CMPL, CHAT, EMB):
        assert total(ep, "ok") == ok.get(ep, 0) + (unseen if ep == CMPL else 0), (ep, tally)
        assert total(ep, "error") == 0 and total(ep, "rejected") == 0
    # an abandoned request may never have reached the server (cancelled while connecting)
    server_gone = total(CMPL, "cancelled") + total(CMPL, "dropped")
    assert gone * 0.5 <= server_gone + unseen <= gone

    # ... and in the events, which end with run_end
    assert lines[0]["event"] == "run_start" and lines[-1]["event"] == "run_end"
    evals = Counter((e["extra"]["outcome"], e["extra"]["endpoint"]) for e in lines
                    if e["event"] == "eval")
    for ep in (CMPL, CHAT, EMB):
        assert evals[("ok", ep)] == ok.get(ep, 0) + (unseen if ep == CMPL else 0)
    assert evals[("cancelled", CMPL)] + evals[("dropped", CMPL)] == server_gone
    assert lines[-1]["stats"]["requests"] == sum(evals.values())
    assert lines[-1]["stats"]["errors"] == 0
