"""Starting and stopping real server processes for tests: free ports, the environment a
child needs (this folder and the repository on its import path), health polling."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["TESTS", "ROOT", "free_port", "wait_health", "child_env", "start_process",
           "stop_process", "obey_file_modes"]

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
