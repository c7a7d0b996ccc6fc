"""``tep serve --workers 2``: metrics aggregated over the workers (prometheus-client
multiprocess mode), one events file per worker, graceful SIGTERM through the supervisor."""
from __future__ import annotations

import signal
import sys

import httpx
from support.process import child_env, free_port, start_process, stop_process, process_log
from test_shutdown import start_streams

from tep.obs.events import read_events
from support.prometheus import parse

N = 24


def test_two_workers_metrics_events_and_sigterm(tmp_path):
    port = free_port()
    ev = tmp_path / "events.jsonl"
    env = child_env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc, url = start_process(
        [sys.executable, "-m", "tep", "serve", "--backend", "support.backends:ScriptBackend",
         "--port", str(port), "--workers", "2", "--graceful-timeout", "20",
         "--events-jsonl", str(ev), "--log-level", "warning"], port, env)
    try:
        for i in range(N):  # a new connection each: the kernel spreads them over workers
            r = httpx.post(url + "/v1/completions", json={"model": "script", "prompt": [9, 10 + i],
                                                          "max_tokens": 3})
            assert r.status_code == 200
        for _ in range(4):  # whichever worker answers, it reports the whole server
            m = parse(httpx.get(url + "/metrics").text)
            key = ("tep_requests_total", (("endpoint", "/v1/completions"), ("outcome", "ok"),
                                          ("status", "200")))
            assert m[key] == N
            assert m[("tep_completion_tokens_total", (("endpoint", "/v1/completions"),))] \
                == 3 * N
            assert m[("tep_requests_in_flight", ())] == 0
        out, threads = start_streams(url, 2)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        code = proc.wait(timeout=60)
        log = process_log(proc)
    finally:
        stop_process(proc)
    assert code == 0, log[-3000:]
    assert sorted(out) == [(200, 41, True)] * 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.0.jsonl", "events.1.jsonl"]
    for name in files:
        lines = read_events(tmp_path / name)
        assert lines[0]["event"] == "run_start" and lines[-1]["event"] == "run_end"
        assert lines[-1]["reason"] == "ok"
    merged = read_events(tmp_path / "events.*.jsonl")
    evals = [e for e in merged if e["event"] == "eval"]
    assert len(evals) == N + 2 and all(e["extra"]["outcome"] == "ok" for e in evals)
    ends = [e for e in merged if e["event"] == "run_end"]
    assert sum(e["stats"]["requests"] for e in ends) == N + 2
    assert sum(e["stats"]["tokens_out"] for e in ends) == 3 * N + 80
