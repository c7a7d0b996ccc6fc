"""Shared fixtures for the server tests.

- ``anyio_backend``: async tests run on asyncio (anyio's pytest plugin, via httpx).
- ``live_server(spec)``: starts ``python -m tep serve --backend spec`` on a free port (one
  process per spec per session), waits for ``/health`` and returns its base URL.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """Poll ``url``/health until it answers 200; fail early if ``proc`` (if any) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not become healthy in {timeout}s")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def start_process(args: list[str], port: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def events_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("events") / "events.jsonl"


@pytest.fixture(scope="session")
def live_server(events_file):
    """``live_server("module:Class", *extra_args) -> base URL`` (cached per arguments)."""
    servers: dict[tuple, tuple[subprocess.Popen, str]] = {}

    def get(spec: str, *extra: str) -> str:
        key = (spec, *extra)
        if key not in servers:
            port = free_port()
            args = [sys.executable, "-m", "tep", "serve", "--backend", spec, "--port",
                    str(port), "--max-concurrency", "4", "--graceful-timeout", "2", *extra]
            servers[key] = start_process(args, port, child_env(TEP_TEST_EVENTS=str(events_file)))
        return servers[key][1]

    yield get
    for proc, _ in servers.values():
        stop_process(proc)
