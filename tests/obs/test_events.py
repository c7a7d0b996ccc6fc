"""JSONL run events (tep.obs.events): written by real requests, read back after a real
shutdown of the app."""
from __future__ import annotations

import json
import logging
import os
import threading

import pytest
from support.backends import ScriptBackend
from support.http import client_for, post_json, post_stream

from tep.obs.events import EventLog, read_events, resolve_path

pytestmark = pytest.mark.anyio

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"
MSGS = [{"role": "user", "content": "hello"}]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_run_start_eval_steps_run_end(tmp_path):
    path = tmp_path / "ev.jsonl"
    async with client_for(ScriptBackend(), events_jsonl=str(path), api_keys=["k"]) as c:
        h = {"Authorization": "Bearer k"}
        r = await c.post(CMPL, json={"model": "script", "prompt": [9, 8], "max_tokens": 4,
                                     "seed": 1, "logprobs": 1}, headers=h)
        assert r.status_code == 200
        r = await c.post(CMPL, json={"model": "script", "prompt": [9], "max_tokens": 3,
                                     "stream": True, "logprobs": 0}, headers=h)
        assert r.status_code == 200 and (await r.get_data()).endswith(b"data: [DONE]\n\n")
        r = await c.post(CHAT, json={"model": "script", "messages": MSGS, "max_tokens": 2},
                         headers=h)
        assert r.status_code == 200
        r = await c.post(EMB, json={"model": "script", "input": [[2, 3], [4]]}, headers=h)
        assert r.status_code == 200
        r = await c.post(CMPL, json={"model": "script", "prompt": [1]}, headers=h)  # boom
        assert r.status_code == 500
        r = await c.post(CMPL, json={"model": "nope", "prompt": [9]}, headers=h)
        assert r.status_code == 404
        await c.get("/v1/models", headers=h)  # not an inference request: no eval
    ev = _lines(path)
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("run_start") == 1 and kinds.count("run_end") == 1
    assert len({e["run_id"] for e in ev}) == 1
    start = ev[0]
    assert start["backend"] == {"kind": "cpu", "class": "ScriptBackend"}
    assert start["models"] == ["script", "other/model"]
    assert start["config"]["api_keys"] == 1 and "k" not in json.dumps(start["config"]["api_keys"])
    assert {"hostname", "python", "tep"} <= set(start["host"])

    evals = [e for e in ev if e["event"] == "eval"]
    assert all(e["phase"] == "serve" and e["name"] == "request" for e in evals)
    x = [e["extra"] for e in evals]
    assert [(e["endpoint"], e["status"], e["outcome"]) for e in x] == [
        ("/v1/completions", 200, "ok"), ("/v1/completions", 200, "ok"),
        ("/v1/chat/completions", 200, "ok"), ("/v1/embeddings", 200, "ok"),
        ("/v1/completions", 500, "error"), ("/v1/completions", 404, "error")]
    assert x[0]["prompt_tokens"] == 2 and x[0]["completion_tokens"] == 4
    assert x[0]["model"] == "script" and x[0]["sampling"]["seed"] == 1
    assert x[0]["request_id"].startswith("cmpl-") and x[0]["latency_us"] > 0
    assert x[1]["completion_tokens"] == 3 and x[1]["ttft_us"] is not None
    assert x[2]["request_id"].startswith("chatcmpl-") and x[2]["completion_tokens"] == 2
    assert x[3]["prompt_tokens"] == 3 and x[3]["completion_tokens"] == 0
    pids = {e["principal_id"] for e in x}
    assert len(pids) == 1 and pids.pop().startswith("key-")

    steps = [e for e in ev if e["event"] == "step"]
    by_req: dict = {}
    for s in steps:
        by_req.setdefault(s["request_id"], []).append(s)
    assert sorted(len(v) for v in by_req.values()) == [3, 4]  # only the logprob requests
    first = by_req[x[0]["request_id"]]
    assert [s["step"] for s in first] == [0, 1, 2, 3]
    assert all(s["logprob"] == -0.5 and s["choice"] == 0 for s in first)

    end = ev[-1]
    assert end["reason"] == "ok"
    assert end["stats"] == {"requests": 6, "errors": 2, "tokens_out": 9}


async def test_no_path_no_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEP_EVENTS_JSONL", raising=False)
    before = {t.name for t in threading.enumerate()}
    async with client_for(ScriptBackend()) as c:
        st, _ = await post_json(c, CMPL, {"model": "script", "prompt": [9], "max_tokens": 2})
        assert st == 200
        assert "tep-events" not in {t.name for t in threading.enumerate()} - before
    assert list(tmp_path.iterdir()) == []


async def test_unwritable_path_never_fails_a_request(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "sub" / "ev.jsonl"  # a directory under a regular file: cannot exist
    with caplog.at_level(logging.ERROR, logger="tep.obs.events"):
        async with client_for(ScriptBackend(), events_jsonl=str(path)) as c:
            for _ in range(3):
                st, body = await post_json(c, CMPL, {"model": "script", "prompt": [9],
                                                     "max_tokens": 2})
                assert st == 200 and body["choices"][0]["text"]
            st, ev, _ = await post_stream(c, CMPL, {"model": "script", "prompt": [9],
                                                    "max_tokens": 2})
            assert st == 200 and ev[-1] == "[DONE]"
    errors = [r for r in caplog.records if "cannot write events" in r.getMessage()]
    assert len(errors) == 1  # logged once, not per line


def test_full_disk_is_logged_and_dropped(caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = EventLog("/dev/full")
    with caplog.at_level(logging.ERROR, logger="tep.obs.events"):
        log.request({"outcome": "ok", "completion_tokens": 3})
        log.flush()
        log.run_end()
    assert log.requests == 1 and log.tokens_out == 3
    assert any("cannot write events" in r.getMessage() for r in caplog.records)


def test_placeholders_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("TEP_WORKER_ID", "3")
    p = resolve_path(str(tmp_path / "ev.{worker}.{pid}.jsonl"))
    assert p.endswith(f"ev.3.{os.getpid()}.jsonl")
    a, b = EventLog(tmp_path / "e.0.jsonl"), EventLog(tmp_path / "e.1.jsonl")
    for i in range(3):
        (a if i % 2 == 0 else b).request({"outcome": "ok", "completion_tokens": i})
    a.run_end()
    b.run_end()
    (tmp_path / "e.1.jsonl").open("a").write('{"torn')  # a crashed writer's last line
    merged = read_events(tmp_path / "e.*.jsonl")
    assert [e["event"] for e in merged].count("eval") == 3
    assert [e["ts"] for e in merged] == sorted(e["ts"] for e in merged)
    assert sum(e["stats"]["tokens_out"] for e in merged if e["event"] == "run_end") == 3

