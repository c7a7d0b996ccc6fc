"""Starting and stopping real server processes for tests: free ports, the environment a
child needs (this folder and the repository on its import path), health polling."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import httpx

__all__ = ["TESTS", "ROOT", "free_port", "wait_health", "child_env", "start_process",
           "stop_process", "watch_output", "process_log", "obey_file_modes"]

# The most of a child's output kept for failure messages (its tail).
LOG_TAIL_BYTES = 1 << 20

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    """Poll ``url``/health until it answers 200; fail early if ``proc`` (if any) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = process_log(proc)
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


def _drain(proc: subprocess.Popen, tail: deque) -> None:
    # Read the child's output as it comes: an unread pipe fills (64 KiB) and then the
    # child blocks in its next log write, freezing the server mid-test.
    size = 0
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        tail.append(chunk)
        size += len(chunk)
        while size > LOG_TAIL_BYTES and len(tail) > 1:
            size -= len(tail.popleft())


def watch_output(proc: subprocess.Popen) -> subprocess.Popen:
    """Read ``proc``'s piped stdout on a thread from now on (see :func:`process_log`);
    returns ``proc``."""
    proc.log_tail = deque()  # type: ignore[attr-defined]
    proc.log_reader = threading.Thread(  # type: ignore[attr-defined]
        target=_drain, args=(proc, proc.log_tail), daemon=True)
    proc.log_reader.start()
    return proc


def process_log(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The tail (``LOG_TAIL_BYTES``) of what a :func:`start_process` child wrote to
    stdout/stderr; waits up to ``timeout`` s for the rest once the child has exited."""
    reader = getattr(proc, "log_reader", None)
    if reader is None:
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.poll() is not None:
        reader.join(timeout)
    return b"".join(list(proc.log_tail)).decode(errors="replace")


def start_process(args: list[str], port: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start a server child (stdout and stderr read on a thread, see :func:`process_log`)
    and wait until ``/health`` answers; returns ``(process, base URL)``."""
    proc = watch_output(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT))
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


def obey_file_modes() -> None:
    """For ``preexec_fn``: a root child drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from
    its capability bounding set, so after ``exec`` a file's mode bits apply to it (root
    writes a 0444 file otherwise). Does nothing for other users."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):                     # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:   # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
