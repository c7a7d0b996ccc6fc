"""Two checkouts of tep side by side (e.g. before/after a refactor): kernels, server rps,
one-stream tokens/s, measured in the same run with the sides interleaved.

    python benchmarks/bench_layout.py --before DIR --after DIR [--rounds 3] [--duration 5]
                                      [--json benchmarks/results/layout.json]

Each DIR is a tep checkout with its extensions built in place
(``python setup.py build_ext --inplace``); every measurement runs in a subprocess with
cwd=DIR and PYTHONPATH=DIR, so ``import tep`` and ``python -m tep serve`` load that tree.
One Python environment (this interpreter) serves both sides.

Per round, for each side in turn (the order alternates between rounds):
  kernels   tep.kernels.sample(logits, top_p=0.9) on float32 [1,128256] and [64,32000]
            logits; the minimum over repeats, in ms per call.
  rps       a fresh `tep serve --backend tep.backends.toy:ToyBackend --toy-instant` (the
            per-request toy, present on both sides); non-streamed POST /v1/completions
            (max_tokens 16) from 16 concurrent httpx.AsyncClient loops for --duration s
            after a 1 s warm-up.
  stream1   on the same server: one streamed completion of 2000 tokens at a time, repeated
            --stream-reps times (median); tokens/s over the time from the first to the last
            content chunk (tokens counted as chunks, one token per chunk).
With --extra-after SPEC, the after side is also served with ``--backend SPEC --toy-instant``
(e.g. ``toy``: the engine toy) and reported as an extra row (no before counterpart).
The table reports medians over rounds and the ratio after/before (>1 = after is faster
for rps and tokens/s; for kernel ms, <1 = after is faster). The load client shares the
machine's cores with the server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Server, stream_chat  # noqa: E402
from _report import write_result  # noqa: E402

TOY = "tep.backends.toy:ToyBackend"
KERNEL_SHAPES = ((1, 128256), (64, 32000))

_KERNEL_SNIPPET = r"""
import json, sys, time
import numpy as np
import tep, tep.kernels as K
shapes = json.loads(sys.argv[1]); reps = int(sys.argv[2])
rng = np.random.default_rng(0)
out = {"tep_file": tep.__file__}
for b, v in shapes:
    x = rng.standard_normal((b, v), dtype=np.float32) * 3
    K.sample(x, top_p=0.9, seed=1)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); K.sample(x, top_p=0.9, seed=1)
        best = min(best, time.perf_counter() - t)
    out[f"{b}x{v}"] = best * 1e3
print(json.dumps(out))
"""


def env_for(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def kernels(tree: Path, reps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _KERNEL_SNIPPET,
                        json.dumps(KERNEL_SHAPES), str(reps)],
                       cwd=tree, env=env_for(tree), capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out.pop("tep_file").startswith(str(tree)):
        raise RuntimeError(f"{tree}: imported tep from elsewhere")
    return out


async def _rps(port: int, duration: float, conns: int) -> float:
    import asyncio
    import httpx
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "tep-toy", "prompt": "Hello!", "max_tokens": 16, "temperature": 0.0}
    done = 0
    measuring = False

    async def loop(client: httpx.AsyncClient, stop: float) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            if measuring:
                done += 1

    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(loop(client, time.perf_counter() + 1.0) for _ in range(conns)))
        measuring = True
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(client, t0 + duration) for _ in range(conns)))
        return done / (time.perf_counter() - t0)


async def _stream1(port: int, n_tokens: int) -> float:
    import httpx
    body = {"model": "tep-toy", "prompt": "Hello!", "max_tokens": n_tokens,
            "temperature": 0.0}
    async with httpx.AsyncClient(timeout=60) as client:
        r = await stream_chat(client, f"http://127.0.0.1:{port}", body, "/v1/completions")
    chunks = len(r.times)
    if chunks < n_tokens * 0.9:
        raise RuntimeError(f"stream gave {chunks} content chunks, wanted ~{n_tokens}")
    return (chunks - 1) / (r.times[-1] - r.times[0])


def serve_measure(tree: Path, backend: str, duration: float, conns: int,
                  stream_reps: int) -> dict:
    import asyncio
    cmd = [sys.executable, "-m", "tep", "serve", "--backend", backend, "--toy-instant",
           "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    with Server(cmd, env_for(tree), cwd=tree, timeout_s=60.0) as s:
        rps = asyncio.run(_rps(s.port, duration, conns))
        tps = statistics.median(asyncio.run(_stream1(s.port, 2000)) for _ in range(stream_reps))
    return {"rps": rps, "stream1_tok_s": tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--stream-reps", type=int, default=9,
                    help="2000-token streams per server; their median is the round's value")
    ap.add_argument("--kernel-reps", type=int, default=30)
    ap.add_argument("--extra-after", default="toy",
                    help="after-side backend served as an extra row ('' for none)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    rows: dict[str, list[dict]] = {"before": [], "after": [], "after_extra": []}
    for rnd in range(a.rounds):
        order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
        for side in order:
            m = kernels(trees[side], a.kernel_reps)
            m.update(serve_measure(trees[side], TOY, a.duration, a.conns, a.stream_reps))
            rows[side].append(m)
            print(f"round {rnd + 1} {side:6s} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()),
                  flush=True)
        if a.extra_after:
            m = serve_measure(trees["after"], a.extra_after, a.duration, a.conns, a.stream_reps)
            rows["after_extra"].append(m)
            print(f"round {rnd + 1} after --backend {a.extra_after} "
                  + " ".join(f"{k}={v:.4g}" for k, v in m.items()), flush=True)

    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for side, rs in rows.items() if rs}
    print(f"\nmedians over {a.rounds} interleaved rounds; ratio = after/before")
    print(f"{'metric':28s} {'before':>12s} {'after':>12s} {'ratio':>7s}")
    table = []
    for k in med["before"]:
        b, f = med["before"][k], med["after"][k]
        unit = "ms (min)" if "x" in k and k[0].isdigit() else ""
        name = f"sample top_p {k} {unit}" if unit else k
        print(f"{name:28s} {b:12.4g} {f:12.4g} {f / b:7.3f}")
        table.append({"metric": name, "before": b, "after": f, "ratio": f / b})
    for k, f in med.get("after_extra", {}).items():
        print(f"{k + ' (after, ' + a.extra_after + ')':28s} {'':>12s} {f:12.4g} "
              f"{f / med['before'][k]:7.3f}")
        table.append({"metric": f"{k} after --backend {a.extra_after}", "after": f,
                      "ratio_vs_before_toy": f / med["before"][k]})
    out = {"bench": "layout", "rounds": a.rounds, "duration_s": a.duration, "conns": a.conns,
           "stream_reps": a.stream_reps, "kernel_reps": a.kernel_reps,
           "server_backend": TOY, "extra_after_backend": a.extra_after,
           "trees": {s: {"path": str(p), "commit": _commit(p)} for s, p in trees.items()},
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "table": table, "medians": med, "rounds_raw": rows}
    write_result(a.json, out)


def _commit(tree: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
