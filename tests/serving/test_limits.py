"""Backpressure and limits (tep.serving.admission): max concurrency + bounded queue -> 429 with
Retry-After, queued requests whose client left are dropped before they run, body limit,
and the per-request generation timeout."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from support.backends import ScriptBackend
from support.http import client_for, post_json, post_stream, stream_text

from tep.serving.admission import Admission, QueueFull
from support.prometheus import parse

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
SLOW = {"model": "script", "prompt": [3], "max_tokens": 25}  # 20 ms per token


# ------------------------------------------------------------------ the gate itself

@pytest.mark.anyio
async def test_admission_fifo_full_and_cancelled_waiter():
    seen = []
    gate = Admission(1, 2, on_change=lambda r, q: seen.append((r, q)))
    assert await gate.acquire() is False
    order = []

    async def waiter(name):
        await gate.acquire()
        order.append(name)

    a = asyncio.ensure_future(waiter("a"))
    b = asyncio.ensure_future(waiter("b"))
    await asyncio.sleep(0)
    assert gate.queued == 2
    with pytest.raises(QueueFull):
        await gate.acquire()
    a.cancel()  # the client of "a" left while it waited
    await asyncio.sleep(0)
    assert gate.queued == 1 and gate.running == 1
    gate.release()  # the slot goes straight to "b"
    await b
    assert order == ["b"] and gate.running == 1 and gate.queued == 0
    gate.release()
    assert gate.running == 0 and seen[-1] == (0, 0)


# ------------------------------------------------------------------ 429 + Retry-After

@pytest.mark.anyio
async def test_queue_full_is_429_with_retry_after(tmp_path):
    path = tmp_path / "ev.jsonl"
    async with client_for(ScriptBackend(), max_concurrency=1, max_queue=1, retry_after=3,
                          events_jsonl=str(path)) as c:
        state = c.app.extensions["tep"]
        running = asyncio.ensure_future(post_stream(c, CMPL, SLOW))
        queued = asyncio.ensure_future(post_json(c, CMPL, {**SLOW, "max_tokens": 3}))
        for _ in range(300):
            if state.admission.queued == 1:
                break
            await asyncio.sleep(0.01)
        assert state.admission.queued == 1
        r = await c.post(CMPL, json=SLOW)
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
        err = (await r.get_json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        r = await c.post(CHAT, json={"model": "script", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429
        st, ev, _ = await running
        assert st == 200 and len(stream_text(ev, chat=False)[0]) == 25
        st, body = await queued
        assert st == 200 and len(body["choices"][0]["text"]) == 3
        # capacity is back
        assert (await post_json(c, CMPL, {**SLOW, "max_tokens": 1}))[0] == 200
    outcomes = [e["extra"]["outcome"] for e in map(json.loads, path.read_text().splitlines())
                if e["event"] == "eval"]
    assert sorted(outcomes) == ["ok", "ok", "ok", "rejected", "rejected"]


# ------------------------------------------------------------------ live server

def _metric(url: str, name: str, **labels) -> float:
    m = parse(httpx.get(url + "/metrics").text)
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_live_429_and_dropped_queued_request(live_server, events_file, tmp_path_factory):
    ev_path = tmp_path_factory.mktemp("limits") / "ev.jsonl"
    url = live_server("support.backends:ScriptBackend", "--max-concurrency", "1",
                      "--max-queue", "1", "--events-jsonl", str(ev_path))
    host, port = url.rsplit("//", 1)[1].split(":")
    first_chunk = threading.Event()
    result = {}

    def hold_slot():
        with httpx.stream("POST", url + CMPL, json={**SLOW, "max_tokens": 60, "stream": True},
                          timeout=30) as r:
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    n += 1
                    first_chunk.set()
            result["chunks"] = n

    t = threading.Thread(target=hold_slot)
    t.start()
    assert first_chunk.wait(20)
    # a queued request (max_tokens 7 marks it) whose client goes away while it waits
    body = json.dumps({**SLOW, "max_tokens": 7}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 10
    while _metric(url, "tep_queue_depth") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(url, "tep_queue_depth") == 1
    # the queue is full: the openai client sees RateLimitError (no retries here)
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="script", prompt=[9], max_tokens=2)
    assert ei.value.response.headers["Retry-After"] == "1"
    s.close()
    while _metric(url, "tep_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(url, "tep_queue_depth") == 0
    t.join(30)
    assert result["chunks"] == 60 + 1  # 60 text chunks + the finish chunk
    assert _metric(url, "tep_requests_total", endpoint=CMPL, status="499",
                   outcome="dropped") == 1
    assert _metric(url, "tep_requests_total", endpoint=CMPL, status="429",
                   outcome="rejected") == 1
    # the dropped request never reached the backend
    time.sleep(0.3)
    ran = [e for e in map(json.loads, events_file.read_text().splitlines())
           if e.get("mode") == "slow" and e.get("max_tokens") == 7]
    assert ran == []
    evals = [e["extra"] for e in map(json.loads, ev_path.read_text().splitlines())
             if e["event"] == "eval"]
    dropped = [e for e in evals if e["outcome"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["status"] == 499
    assert dropped[0]["completion_tokens"] == 0


# ------------------------------------------------------------------ body limit

@pytest.mark.anyio
async def test_body_limit_from_env(monkeypatch):
    monkeypatch.setenv("TEP_MAX_BODY_BYTES", "4096")
    async with client_for(ScriptBackend()) as c:
        st, body = await post_json(c, CMPL, {"model": "script", "prompt": [7] * 3000})
        assert st == 413 and body["error"]["code"] == "request_too_large"
        st, _ = await post_json(c, CMPL, {"model": "script", "prompt": [7] * 100,
                                          "max_tokens": 1})
        assert st == 200


# ------------------------------------------------------------------ generation timeout

@pytest.mark.anyio
async def test_generation_timeout_ends_with_length(tmp_path):
    path = tmp_path / "ev.jsonl"
    long = {"model": "script", "prompt": [3], "max_tokens": 100000}
    async with client_for(ScriptBackend(), generation_timeout=0.3,
                          events_jsonl=str(path)) as c:
        t0 = time.monotonic()
        st, ev, _ = await post_stream(c, CMPL, {**long, "n": 2,
                                                "stream_options": {"include_usage": True}})
        assert st == 200 and time.monotonic() - t0 < 5
        assert ev[-1] == "[DONE]"
        fins = [ch["choices"][0]["finish_reason"] for ch in ev[:-1]
                if ch["choices"] and ch["choices"][0]["finish_reason"]]
        assert fins == ["length", "length"]
        assert ev[-2]["usage"]["completion_tokens"] > 0
        st, body = await post_json(c, CMPL, long)
        assert st == 200 and body["choices"][0]["finish_reason"] == "length"
        assert 0 < len(body["choices"][0]["text"]) < 1000
        st, ev, _ = await post_stream(c, CHAT, {"model": "script", "max_tokens": 100000,
                                                "messages": [{"role": "user",
                                                              "content": "slow"}]})
        assert st == 200 and ev[-2]["choices"][0]["finish_reason"] == "length"
        st, body = await post_json(c, CMPL, {"model": "script", "prompt": [9],
                                             "max_tokens": 3})
        assert body["choices"][0]["finish_reason"] == "length"  # max_tokens, in time
        m = parse((await (await c.get("/metrics")).get_data()).decode())
        assert m[("tep_generation_timeouts_total", (("endpoint", CMPL),))] == 2
    evals = [e["extra"] for e in map(json.loads, path.read_text().splitlines())
             if e["event"] == "eval"]
    assert [e["outcome"] for e in evals] == ["timeout", "timeout", "timeout", "ok"]
    assert all(e["completion_tokens"] > 0 for e in evals)


def test_an_engine_backend_admits_as_many_requests_as_it_has_sequence_slots():
    import tep
    from tep.backends.toy import ToyEngineBackend

    # one engine thread batches them all, so the default is its slots, not the pool size
    assert tep.create_app(ToyEngineBackend(max_num_seqs=64)).extensions[
        "tep"].admission.max_running == 64
    assert tep.create_app(ToyEngineBackend(max_num_seqs=64), max_concurrency=4).extensions[
        "tep"].admission.max_running == 4
