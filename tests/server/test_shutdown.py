"""Graceful shutdown on a live ``tep serve`` process: SIGTERM with streams in flight ->
they complete, the process exits 0 and the events file ends with run_end."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time

import httpx
from support.process import child_env, free_port, start_process, stop_process, process_log

from tep.obs.events import read_events

SLOW = {"model": "script", "prompt": [3], "max_tokens": 40, "stream": True}  # ~0.8 s


def _stream(url: str, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=SLOW, timeout=30) as r:
        n, done = 0, False
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
                started.set()
            elif line == "data: [DONE]":
                done = True
        out.append((r.status_code, n, done))


def start_streams(url: str, n: int) -> tuple[list, list[threading.Thread]]:
    """n slow streaming requests in threads, returned once every one has its first token;
    each appends (status, data events, saw [DONE]) to the list when it ends."""
    out: list = []
    started = [threading.Event() for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(url, out, s)) for s in started]
    for t in threads:
        t.start()
    assert all(s.wait(20) for s in started)
    return out, threads


def _serve_and_sigterm(tmp_path, *extra: str) -> tuple[int, list, list[dict], str]:
    port = free_port()
    ev = tmp_path / "events.jsonl"
    args = [sys.executable, "-m", "tep", "serve", "--backend", "support.backends:ScriptBackend",
            "--port", str(port), "--graceful-timeout", "20", "--events-jsonl", str(ev),
            "--log-level", "warning", *extra]
    proc, url = start_process(args, port, child_env())
    try:
        out, threads = start_streams(url, 3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = False
        try:  # no new connections once shutdown began
            httpx.get(url + "/health", timeout=2)
        except httpx.HTTPError:
            refused = True
        for t in threads:
            t.join(30)
        code = proc.wait(timeout=40)
        log = process_log(proc)
    finally:
        stop_process(proc)
    assert refused, "the server still accepted connections after SIGTERM"
    return code, out, read_events(tmp_path / "events*.jsonl"), log


def test_sigterm_lets_streams_finish_then_exits_0(tmp_path):
    code, out, events, log = _serve_and_sigterm(tmp_path)
    assert code == 0, log[-3000:]
    assert sorted(out) == [(200, 41, True)] * 3  # 40 tokens + finish chunk, then [DONE]
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "run_start" and lines[-1]["event"] == "run_end"
    assert lines[-1]["reason"] == "ok"
    assert lines[-1]["stats"] == {"requests": 3, "errors": 0, "tokens_out": 120}
    evals = [e["extra"] for e in lines if e["event"] == "eval"]
    assert [e["outcome"] for e in evals] == ["ok"] * 3
