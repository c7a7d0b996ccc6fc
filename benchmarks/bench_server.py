"""HTTP serving: `tep serve` (toy backend, instant) vs LitServe OpenAISpec vs bare hypercorn.

    python benchmarks/bench_server.py [--quick] [--servers tep litserve floor]
                                      [--duration 5] [--json benchmarks/results/server.json]

Servers (each started as its own process on 127.0.0.1, one after another):
  tep       python -m tep serve --toy-instant (defaults otherwise: 1 process, 8 backend threads,
            i.e. at most 8 requests run at once and the rest wait for a slot)
  tep-c64   the same with --max-concurrency 64, so all 64 streams are admitted at once
  litserve  benchmarks/_litserve_app.py: LitServe OpenAISpec over a model that yields fixed
            text instantly (1 API server + 1 inference worker, LitServe's CPU defaults)
  floor     benchmarks/_floor_app.py: a bare ASGI app on hypercorn (parse JSON, answer)
All three emit the same text, one character per token.

Measurements (loopback only):
  rps       non-streaming POST /v1/chat/completions (max_tokens 16), 16 connections, wrk -t1
            with a Lua body script, for --duration seconds after a 1 s warm-up. Falls back to
            this script's asyncio client when wrk is missing (stated in the output).
  stream1   one stream of 2000 tokens, repeated; tokens/s = 2000 / (last byte - request
            sent), TTFT = first non-empty content delta - request sent; medians.
  stream64  64 concurrent streams of 256 tokens (64 connections opened together);
            aggregate tokens/s, the slowest stream's tokens/s (the issue's number), TTFT
            p50/max, and how many streams had their first token before any stream
            finished ("interleaved", a target: 64/64 means no stream was starved while
            another ran to its end). tep takes turns between SSE writes so an instant
            backend's streams interleave; default tep admits 8 streams at once (the rest
            wait for a slot), so its count is bounded by admission; tep-c64 admits all
            64. The bare floor does not take turns, so it does not interleave.
The load generator and the server share this machine's cores. The asyncio client is run
against the floor too: the floor's numbers are the client's ceiling, so a server well
below them is not limited by the client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _machine import describe  # noqa: E402
from _harness import Conn, Server, post_loop  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

MODEL = "tep-toy"
RPS_TARGET_VS_LITSERVE = 20.0
RPS_TARGET_VS_FLOOR = 0.6
STREAM_TPS_TARGET = 20000.0
TTFT_TARGET_S = 0.005


def server_cmd(name: str, port: int) -> list[str]:
    py = sys.executable
    if name in ("tep", "tep-c64"):
        extra = ["--max-concurrency", "64"] if name == "tep-c64" else []
        return [py, "-m", "tep", "serve", "--toy-instant", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", *extra]
    if name == "litserve":
        return [py, str(HERE / "_litserve_app.py"), str(port)]
    if name == "floor":
        return [py, str(HERE / "_floor_app.py"), str(port)]
    raise ValueError(name)


def chat_body(max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": max_tokens, "stream": stream,
                       "temperature": 0.0}).encode()


def content_chars(body: bytes, stream: bool) -> int:
    """Characters of generated text in a chat response (= tokens here: 1 char per token)."""
    if not stream:
        return len(json.loads(body)["choices"][0]["message"]["content"])
    n = 0
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for ch in json.loads(line[6:]).get("choices", []):
                n += len((ch.get("delta") or {}).get("content") or "")
    return n


async def one_stream(port: int, n_tokens: int) -> dict:
    """One streamed chat completion on a fresh connection; timings in seconds."""
    c = await Conn(port).open()
    t = {}
    t0 = time.perf_counter()
    status, body = await c.post("/v1/chat/completions", chat_body(n_tokens, True),
                                on_first=lambda: t.setdefault("first", time.perf_counter()))
    t_end = time.perf_counter()
    c.close()
    toks = content_chars(body, True)
    if status != 200 or toks != n_tokens:
        raise RuntimeError(f"stream: status {status}, {toks} tokens of {n_tokens}")
    return {"start": t0, "first": t.get("first", t_end), "end": t_end, "tokens": toks}


async def asyncio_rps(port: int, conns: int, duration_s: float) -> dict:
    """Non-streaming requests/s with ``conns`` keep-alive connections (the fallback client)."""
    body = chat_body(16, False)
    r = await post_loop(port, "/v1/chat/completions", lambda: body, conns, duration_s)
    return {"rps": r["requests"] / r["wall_s"], "requests": r["requests"],
            "client_cpu_frac": r["client_cpu_s"] / r["wall_s"], "tool": "asyncio"}


_LUA = """wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_rps(port: int, conns: int, duration_s: float) -> dict:
    """Non-streaming requests/s from wrk -t1 -c conns (after a 1 s warm-up)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA % chat_body(16, False).decode())
        script = f.name
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        subprocess.run(["wrk", "-t1", f"-c{conns}", "-d1s", "-s", script, url],
                       capture_output=True, text=True, timeout=30)
        out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration_s:g}s", "--latency",
                              "-s", script, url], capture_output=True, text=True,
                             timeout=duration_s + 30).stdout
    finally:
        os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)

    def lat(p: str) -> float | None:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return None
        return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]

    return {"rps": rps, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errs.group(0) if errs else None,
            "p50_s": lat("50"), "p99_s": lat("99"), "tool": "wrk -t1"}


async def streams(port: int, n_streams: int, n_tokens: int) -> dict:
    """``n_streams`` concurrent streams of ``n_tokens``: aggregate and slowest-stream rates."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    res = await asyncio.gather(*(one_stream(port, n_tokens) for _ in range(n_streams)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    first_finish = min(r["end"] for r in res)
    rates = [r["tokens"] / (r["end"] - r["start"]) for r in res]
    ttfts = sorted(r["first"] - r["start"] for r in res)
    return {"agg_tokens_per_s": sum(r["tokens"] for r in res) / wall,
            "slowest_stream_tokens_per_s": min(rates),
            "fastest_stream_tokens_per_s": max(rates),
            "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1],
            "interleaved": sum(r["first"] < first_finish for r in res), "wall_s": wall,
            "client_cpu_frac": cpu / wall}


def bench_server(name: str, args: argparse.Namespace, use_wrk: bool) -> dict:
    """All measurements against one server."""
    out: dict = {"server": name}
    with Server(server_cmd(name, "{port}"), name=name, timeout_s=60.0) as s:
        # one correct answer first: the numbers below measure a server that works
        st, body = asyncio.run(_one_post(s.port))
        if st != 200 or content_chars(body, False) != 16:
            raise RuntimeError(f"{name}: bad non-streaming answer {st} {body[:200]!r}")
        out["rps"] = (wrk_rps(s.port, 16, args.duration) if use_wrk
                      else asyncio.run(asyncio_rps(s.port, 16, args.duration)))
        if name == "floor" and use_wrk:  # the asyncio client's own ceiling, for the record
            out["rps_asyncio_client"] = asyncio.run(asyncio_rps(s.port, 16, args.duration))
        runs = [asyncio.run(streams(s.port, 1, 2000)) for _ in range(args.stream_repeats)]
        out["stream1"] = {
            "tokens_per_s": statistics.median(r["agg_tokens_per_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_p50_s"] for r in runs),
            "client_cpu_frac": statistics.median(r["client_cpu_frac"] for r in runs),
            "repeats": len(runs)}
        runs = [asyncio.run(streams(s.port, 64, 256)) for _ in range(args.stream64_repeats)]
        mid = sorted(runs, key=lambda r: r["slowest_stream_tokens_per_s"])[len(runs) // 2]
        out["stream64"] = {**mid, "repeats": len(runs)}
    return out


async def _one_post(port: int) -> tuple[int, bytes]:
    c = await Conn(port).open()
    try:
        return await c.post("/v1/chat/completions", chat_body(16, False))
    finally:
        c.close()


def targets(results: dict) -> list[dict]:
    out = []

    def add(name: str, value: float, op: str, target: float) -> None:
        ok = value <= target if op == "<=" else value >= target
        out.append({"name": name, "value": value, "op": op, "target": target, "pass": ok})

    tep = results.get("tep")
    if not tep or "error" in tep:
        return out
    for peer, tgt in (("litserve", RPS_TARGET_VS_LITSERVE), ("floor", RPS_TARGET_VS_FLOOR)):
        p = results.get(peer)
        if p and "error" not in p:
            add(f"rps tep / {peer} (16 conns)", tep["rps"]["rps"] / p["rps"]["rps"], ">=", tgt)
    add("one stream tokens/s (2000 tokens)", tep["stream1"]["tokens_per_s"], ">=",
        STREAM_TPS_TARGET)
    add("one stream TTFT ms", tep["stream1"]["ttft_s"] * 1e3, "<=", TTFT_TARGET_S * 1e3)
    c64 = results.get("tep-c64")
    if c64 and "stream64" in c64:
        add("64 streams interleaved (tep-c64)", c64["stream64"]["interleaved"], ">=", 64)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s wrk runs, fewer stream repeats")
    ap.add_argument("--servers", nargs="+", default=["tep", "tep-c64", "litserve", "floor"])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--stream-repeats", type=int, default=5)
    ap.add_argument("--stream64-repeats", type=int, default=3)
    ap.add_argument("--no-wrk", action="store_true", help="use the asyncio client for rps")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "server.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.stream_repeats, args.stream64_repeats = 2.0, 2, 1
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    t0 = time.time()
    machine = describe()
    results: dict = {}
    versions: dict = {}
    for name in args.servers:
        if name == "litserve":
            try:
                import litserve
                versions["litserve"] = litserve.__version__
            except ImportError as e:
                results[name] = {"server": name, "skipped": f"not installed ({e})"}
                continue
        try:
            results[name] = bench_server(name, args, use_wrk)
        except Exception as e:  # noqa: BLE001 - one server's failure is reported, not fatal
            results[name] = {"server": name, "error": f"{type(e).__name__}: {e}"}
        print(f"  server {name} done", file=sys.stderr, flush=True)
    import hypercorn
    versions["hypercorn"] = getattr(hypercorn, "__version__", None) or _dist_version("hypercorn")
    versions["quart"] = _dist_version("quart")
    checks = targets(results)

    print(f"\nServer, loopback, load generator for rps: {'wrk -t1' if use_wrk else 'asyncio'}")
    print(f"{'server':>9} {'req/s@16':>9} {'p50 ms':>7} {'1 stream tok/s':>15} {'TTFT ms':>8} "
          f"{'64x256 agg tok/s':>17} {'slowest tok/s':>14} {'interleaved':>11}")
    for name, r in results.items():
        if "rps" not in r:
            print(f"{name:>9}  {r.get('skipped') or r.get('error')}")
            continue
        p50 = r["rps"].get("p50_s")
        print(f"{name:>9} {r['rps']['rps']:9.0f} {p50 * 1e3 if p50 else float('nan'):7.2f} "
              f"{r['stream1']['tokens_per_s']:15.0f} {r['stream1']['ttft_s'] * 1e3:8.2f} "
              f"{r['stream64']['agg_tokens_per_s']:17.0f} "
              f"{r['stream64']['slowest_stream_tokens_per_s']:14.0f} "
              f"{r['stream64']['interleaved']:>8}/64")
    fl = results.get("floor", {})
    if "rps_asyncio_client" in fl:
        print(f"asyncio client on the floor: {fl['rps_asyncio_client']['rps']:.0f} req/s "
              f"(client CPU {fl['rps_asyncio_client']['client_cpu_frac']:.0%} of one core)")
    for name, r in results.items():
        if "stream1" in r:
            print(f"stream client CPU ({name}): one stream {r['stream1']['client_cpu_frac']:.0%}, "
                  f"64 streams {r['stream64']['client_cpu_frac']:.0%} of one core")
    print_targets(checks)
    return write_result(args.json, {
        "bench": "server", "quick": args.quick, "machine": machine, "versions": versions,
        "rps_tool": "wrk -t1" if use_wrk else "asyncio", "wall_s": time.time() - t0,
        "results": results, "targets": checks})


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
