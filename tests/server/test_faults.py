"""A live ``tep serve`` under faults and first-run mistakes: graceful-timeout expiry, a
killed worker, malformed HTTP, bad options, a backend module in the current directory."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.process import child_env, free_port, start_process, stop_process

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "support.backends:ScriptBackend"
FOREVER = {"model": "script", "prompt": [3], "max_tokens": 100000}  # one token per 20 ms


def _serve(*extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "tep", "serve", "--backend", SCRIPT, "--port", str(port),
            "--log-level", "warning", *extra]
    return start_process(args, port, env or child_env())


def test_graceful_timeout_ends_streams_cleanly_and_refuses_the_queue_with_503():
    proc, url = _serve("--graceful-timeout", "3", "--max-concurrency", "1",
                       "--max-queue", "8")
    stream_out: list = []
    queued_out: list = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**FOREVER, "stream": True},
                          timeout=30) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
            stream_out.append(events)

    def queued() -> None:
        r = httpx.post(url + "/v1/completions", json=FOREVER, timeout=30)
        queued_out.append((r.status_code, r.json()))

    try:
        t1 = threading.Thread(target=stream)
        t1.start()
        assert started.wait(20)
        waiters = [threading.Thread(target=queued) for _ in range(2)]
        for t in waiters:
            t.start()
        time.sleep(0.5)  # both are waiting for the one slot
        proc.send_signal(signal.SIGTERM)
        for t in [t1, *waiters]:
            t.join(30)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
    events = stream_out[0]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert len(queued_out) == 2
    for status, body in queued_out:
        assert status == 503 and body["error"]["code"] == "shutting_down"


@pytest.mark.skipif(sys.platform != "linux", reason="workers share a socket on Linux")
def test_a_killed_worker_stops_new_connections_at_once():
    proc, url = _serve("--workers", "2", "--graceful-timeout", "5")
    try:
        import psutil

        kids = [k for k in psutil.Process(proc.pid).children()
                if "resource_tracker" not in " ".join(k.cmdline())]  # the workers
        assert len(kids) == 2
        os.kill(kids[0].pid, signal.SIGKILL)
        time.sleep(1.0)  # the supervisor notices within 0.5 s
        t0 = time.monotonic()
        try:
            httpx.get(url + "/health", timeout=10)
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < 3.0  # refused or answered, never left hanging
        assert proc.wait(30) == 1
    finally:
        stop_process(proc)


def test_malformed_http_gets_the_error_envelope():
    proc, url = _serve()
    port = int(url.rsplit(":", 1)[1])
    try:
        for raw in (b"GARBAGE\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(raw)
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            assert status in (400, 431), head
            err = json.loads(body)["error"]
            assert err["message"] and err["type"] == "invalid_request_error"
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    finally:
        stop_process(proc)


def _tep(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tep"   # the console script, as a user runs it
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tep"]
    return subprocess.run([*cmd, *args], cwd=cwd or ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,words", [
    (["serve", "--max-body-bytes", "5"], "max_body_bytes"),
    (["serve", "--max-body-bytes", "lots"], "invalid"),
    (["serve", "--backend", "no_such_module:X"], "no_such_module"),
    (["serve", "--backend", "nonsense"], "module:Attr"),
    (["serve", "--workers", "0"], "--workers"),
])
def test_bad_options_are_one_line_and_exit_2(args, words):
    r = _tep(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and words in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _tep("serve", "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"127.0.0.1:{port}" in r.stderr


def test_version_and_help_show_defaults():
    import tep

    r = _tep("--version")
    assert r.returncode == 0 and tep.__version__ in r.stdout
    r = _tep("serve", "--help")
    text = " ".join(r.stdout.split())
    assert "(default: 256)" in text and "(default: 8000)" in text


def _readme_model() -> str:
    """The README's mymodel.py, as written, plus a line that records each construction."""
    import re

    block = re.search(r"```python\n(# mymodel\.py.*?)```", (ROOT / "README.md").read_text(),
                      re.S).group(1)
    return block + textwrap.dedent("""
        import os as _os
        _init = MyModel.__init__
        def _counted(self):
            with open(_os.environ["BUILD_LOG"], "a") as f:
                f.write(f"{_os.getpid()}\\n")
            _init(self)
        MyModel.__init__ = _counted
    """)


def test_backend_module_in_the_current_directory_loads_once_per_worker(tmp_path):
    (tmp_path / "mymodel.py").write_text(_readme_model())
    log = tmp_path / "builds.txt"
    port = free_port()
    exe = Path(sys.executable).parent / "tep"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tep"]
    env = child_env(BUILD_LOG=str(log))
    env["PYTHONPATH"] = str(ROOT)  # not the model's folder: the current directory must do
    proc = subprocess.Popen([*cmd, "serve", "--backend", "mymodel:MyModel", "--port",
                             str(port), "--workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from support.process import wait_health, watch_output

        watch_output(proc)
        wait_health(f"http://127.0.0.1:{port}", proc)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["bigram"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                       json={"model": "bigram", "prompt": "hi", "max_tokens": 4, "seed": 1})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 4
        time.sleep(1.0)  # the second worker has started too
        pids = log.read_text().split()
        assert len(pids) == 2 and len(set(pids)) == 2 and str(proc.pid) not in pids
    finally:
        stop_process(proc)
