"""The parts every HTTP benchmark in benchmarks/ shares: server processes, a streaming
chat load client, percentiles, rounds, tables and the JSON/plot ending.

    from _harness import Server, free_port, pct, stream_chat, run_clients, table

- :class:`Server`: a command in its own process group; ``start()`` waits until a probe
  request answers (a chat completion by default), ``stop()`` ends the group.
- :func:`stream_chat`: one streaming chat request; the time of every content chunk and the
  usage block.
- :func:`run_clients`: N clients each sending requests one after another; aggregate
  tokens/s from the first send to the last byte, TTFT and inter-token percentiles.
- :func:`rounds`: call ``measure(round, case)`` for every case, interleaved round by round
  (every case sees the same machine conditions), and keep each case's median.
- :func:`table`: a fixed-width text table.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Server", "free_port", "pct", "stream_chat", "run_clients", "rounds", "table"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Server:
    """A server subprocess in its own process group.

    Args:
        name: label in reports.
        cmd, env: the command line and environment (``port`` is where it listens).
        probe: the JSON body POSTed to ``probe_path`` until it answers 200 (None: GET
            ``probe_path``).
    """

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None, *,
                 probe: dict | None = None, probe_path: str = "/v1/chat/completions") -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.env = dict(os.environ if env is None else env)
        self.probe, self.probe_path = probe, probe_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> "Server":
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        body = None if self.probe is None else json.dumps(self.probe).encode()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            try:
                req = urllib.request.Request(self.url + self.probe_path, data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up in {timeout_s}s: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def stream_chat(client: Any, url: str, body: dict) -> dict:
    """POST one streaming chat completion; returns t0, the time of each content chunk,
    completion tokens (usage when sent, else chunks), the end time and the text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    text = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or ():
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    n = usage["completion_tokens"] if usage else len(times)
    return {"t0": t0, "times": times, "tokens": n, "end": time.perf_counter(),
            "text": "".join(text)}


async def run_clients(url: str, clients: int, bodies: Callable[[int, int], dict],
                      per_client: int) -> dict:
    """``clients`` concurrent clients, client k sending ``bodies(k, i)`` for i <
    per_client one after another. Aggregate tokens/s = tokens / (last byte - first send)."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def worker(k: int) -> list[dict]:
            return [await stream_chat(client, url, bodies(k, i)) for i in range(per_client)]
        t = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(k) for k in range(clients)))
                   for r in rs]
        wall = max(r["end"] for r in results) - t
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {"tokens": tokens, "requests": len(results), "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "itl_p50": pct(itl, 50),
            "itl_p99": pct(itl, 99), "texts": [r["text"] for r in results]}


def rounds(cases: Iterable[Any], n_rounds: int,
           measure: Callable[[int, Any], dict], key: str = "tokens_per_s") -> dict:
    """Measure every case once per round, round after round; returns {case: {"runs":
    [...], "median": median of key}}."""
    cases = list(cases)
    out: dict = {c: {"runs": []} for c in cases}
    for r in range(n_rounds):
        for c in cases:
            out[c]["runs"].append(measure(r, c))
    for c in cases:
        vals = [run[key] for run in out[c]["runs"] if run.get(key) is not None]
        out[c]["median"] = statistics.median(vals) if vals else None
    return out


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as fixed-width text (floats with 2 decimals)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    cells = [list(map(str, header))] + [[fmt(v) for v in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))
             for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def run_async(coro: Awaitable) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]
