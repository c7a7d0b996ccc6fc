"""A client that stops reading does not keep its sequence generating into memory.

Live ``tep serve`` processes of the toy engine; the stalled client is a raw socket with a
small receive buffer that reads the first bytes of a long stream and then nothing.

- With ``--stream-stall-timeout 1``: within a few seconds the engine stops sampling
  (``tep_engine_tokens_sampled_total`` stops rising), the server's RSS stays flat, and when
  the client reads again the stream ends with a ``stream_stalled`` error event.
- (The full-buffer bound, which depends on how much the kernel's socket buffers hold
  before the server sees a slow reader, is tested on the bridge itself in
  ``test_stream_bridge_bounds.py``.)
- A control server with neither bound (the old behaviour), in the same run, keeps
  generating for the stalled client: its sampled-token count keeps rising.
- A client that reads normally is never cut (a 1000-token stream under a 64-event bound).
"""
from __future__ import annotations

import json
import re
import socket
import sys
import time

import httpx
import psutil
import pytest

from support.process import child_env, free_port, start_process, stop_process

TOY = "tep.backends.toy:ToyEngineBackend"
BIG = {"model": "tep-toy", "prompt": "go", "max_tokens": 1_000_000, "stream": True,
       "logit_bias": {"256": -100}}     # no end-of-sequence: it would run to max_tokens


def _serve(*extra: str):
    port = free_port()
    args = [sys.executable, "-m", "tep", "serve", "--backend", TOY, "--port", str(port),
            "--max-concurrency", "4", "--graceful-timeout", "1", "--log-level", "warning",
            "--toy-instant", *extra]   # no model compute: generation outruns any client
    proc, url = start_process(args, port, child_env())
    return proc, url, port


@pytest.fixture
def servers(request):
    started = []

    def start(*extra: str):
        s = _serve(*extra)
        started.append(s[0])
        return s

    yield start
    for p in started:
        stop_process(p)


def _sampled(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r"^tep_engine_tokens_sampled_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1))


def _stalled_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request, read its first bytes, then leave the socket unread."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    got = b""
    while b"data: " not in got:
        got += s.recv(1024)
    return s


def _read_rest(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while not out.endswith(b"0\r\n\r\n"):
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def _watch(servers: list, seconds: float) -> list[list[tuple[float, float, float]]]:
    """Per server (proc, url, port): (t, tokens sampled, RSS MiB), sampled in turn every
    0.25 s over the same ``seconds``."""
    procs = [psutil.Process(p.pid) for p, _, _ in servers]
    out: list[list] = [[] for _ in servers]
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for i, (_, url, _) in enumerate(servers):
            out[i].append((time.monotonic() - t0, _sampled(url),
                           procs[i].memory_info().rss / 2**20))
        time.sleep(0.25)
    return out


def _until_flat(url: str, pid: int, quiet: float, limit: float) -> list:
    """Sample (t, tokens sampled, RSS MiB) until the sampled count has not moved for
    ``quiet`` seconds (or ``limit`` passes)."""
    proc = psutil.Process(pid)
    out: list = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        out.append((time.monotonic() - t0, _sampled(url), proc.memory_info().rss / 2**20))
        still = [x for x in out if x[0] >= out[-1][0] - quiet]
        if out[-1][0] >= quiet and still[0][1] == out[-1][1] and still[0][0] <= \
                out[-1][0] - quiet + 0.5:
            break
        time.sleep(0.25)
    return out


def test_stalled_client_is_cancelled_and_memory_stays_flat(servers):
    """The kernel's socket buffers (a few MiB) take what the client does not read before
    the server can tell; from then on the stall timeout applies. Sixteen choices with
    logprobs fill them quickly."""
    body = {**BIG, "n": 16, "logprobs": 5}
    proc, url, port = servers("--stream-stall-timeout", "1",
                              "--stream-buffer-events", "1000000")
    s = _stalled_stream(port, body)
    seen = _until_flat(url, proc.pid, quiet=2.0, limit=90.0)
    t_end, sampled, rss = seen[-1]
    assert t_end < 90.0, seen                              # it stopped generating
    rss_start = seen[0][2]
    flat = [x for x in seen if x[0] >= t_end - 2.0]
    assert flat[-1][2] - flat[0][2] < 4, seen              # RSS MiB: flat once stopped
    assert rss - rss_start < 64, seen                      # and bounded overall
    # the control: a server without the bounds keeps generating for the same client
    cproc, curl, cport = servers("--stream-stall-timeout", "0",
                                 "--stream-buffer-events", "1000000")
    cs = _stalled_stream(cport, body)
    c = _watch([(cproc, curl, cport)], t_end + 2.0)[0]
    assert c[-1][1] > c[len(c) // 2][1], c                 # still sampling
    cs.close()
    tail = _read_rest(s).decode(errors="replace")
    assert '"code":"stream_stalled"' in tail.replace(" ", ""), tail[-500:]
    assert "data: [DONE]" in tail
    r = httpx.post(url + "/v1/completions", json={
        "model": "tep-toy", "prompt": "x", "max_tokens": 5}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    print(f"stalled client: generation stopped at {t_end:.1f} s after {sampled:.0f} "
          f"tokens; RSS {rss_start:.1f} -> {rss:.1f} MiB; the control sampled "
          f"{c[0][1]:.0f} -> {c[-1][1]:.0f} tokens over the same time")


def test_a_reading_client_is_never_cut(servers):
    _, url, _ = servers("--stream-stall-timeout", "1", "--stream-buffer-events", "64")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json={
                **BIG, "max_tokens": 1000}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 950   # every token came
