"""Does an expensive grammar compile stall other streams? The longest gap between two
chunks of a running stream, with and without concurrent requests that carry a large JSON
schema (each one new, so nothing is cached), on a live toy-engine server.

    python benchmarks/bench_offloop.py                     # this checkout
    python benchmarks/bench_offloop.py --src . --src ../other-checkout   # compare builds

Each ``--src`` is a source tree (built in place) served in turn, in the same run, so the
numbers compare. Prints one line per tree: median and max inter-chunk gap of the stream
alone and while the schema requests run, and the schema requests' own latency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Server  # noqa: E402


def _server(src: str) -> Server:
    """``tep serve`` (toy engine) from the source tree ``src`` (cwd and PYTHONPATH)."""
    tree = os.path.abspath(src)
    return Server([sys.executable, "-m", "tep", "serve", "--port", "{port}",
                   "--log-level", "warning"], {"PYTHONPATH": tree}, cwd=tree, name=src,
                  timeout_s=60.0)


def _schema(n: int) -> dict:
    u = uuid.uuid4().hex[:8]
    return {"type": "object",
            "properties": {f"p{i}_{u}": {"type": "string", "maxLength": 8} for i in range(n)},
            "required": [f"p{i}_{u}" for i in range(0, n, 3)]}


def _stream_gaps(url: str, tokens: int) -> list[float]:
    times = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
            "model": "tep-toy", "max_tokens": tokens, "stream": True,
            "logit_bias": {"256": -100},
            "messages": [{"role": "user", "content": "go"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])]


def _measure(url: str, tokens: int, schemas: int, props: int) -> dict:
    alone = _stream_gaps(url, tokens)
    lat: list[float] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set() and len(lat) < schemas:
                t0 = time.perf_counter()
                c.post(url + "/v1/chat/completions", json={
                    "model": "tep-toy", "max_tokens": 1, "guided_json": _schema(props),
                    "messages": [{"role": "user", "content": "go"}]})
                lat.append(time.perf_counter() - t0)

    th = threading.Thread(target=load)
    th.start()
    loaded = _stream_gaps(url, tokens)
    stop.set()
    th.join()
    return {"alone": alone, "loaded": loaded, "lat": lat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", help="source tree(s) to serve (default: .)")
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--schemas", type=int, default=8)
    ap.add_argument("--props", type=int, default=1500)
    a = ap.parse_args()
    for src in a.src or ["."]:
        with _server(src) as s:
            r = _measure(s.url, a.tokens, a.schemas, a.props)
        ms = lambda xs: f"median {statistics.median(xs) * 1e3:.1f} ms, max {max(xs) * 1e3:.0f} ms"  # noqa: E731
        print(f"{src}: stream alone {ms(r['alone'])}; with {len(r['lat'])} schema "
              f"requests ({a.props} properties) {ms(r['loaded'])}; schema request "
              f"latency median {statistics.median(r['lat']):.2f} s")


if __name__ == "__main__":
    main()
