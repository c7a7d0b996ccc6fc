"""Shared fixtures for the server tests.

- ``anyio_backend``: async tests run on asyncio (anyio's pytest plugin, via httpx).
- ``live_server(spec)``: starts ``python -m tep serve --backend spec`` on a free port (one
  process per spec per session), waits for ``/health`` and returns its base URL.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Servers started by the tests keep no stored responses unless a test gives them a store
# file (--responses-store): nothing is written under the user's data directory.
os.environ.setdefault("TEP_RESPONSES_STORE", ":memory:")
# the Ray checks are shared by two test modules: let their asserts explain failures
pytest.register_assert_rewrite("support.ray_checks")

from support.process import child_env, free_port, start_process, stop_process

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
