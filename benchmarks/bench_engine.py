"""The continuous-batching engine: its own cost per step, scaling, LitServe, embeddings.

    python benchmarks/bench_engine.py [--quick] [--json PATH] [--only overhead scaling
                                       litserve embeddings]

1. overhead: an instant model (forward returns preallocated logits, V = 32000) at
   B = 1, 8, 64, 256 running sequences: microseconds per engine step and per token, next
   to the ``tep.kernels.sample`` call alone on the same logits with the same per-row knobs
   (interleaved repeats). The engine's own share = (step - forward - sample) / step.
2. scaling: a simulated model whose forward sleeps a + b*rows (a memory-bound decode
   step): aggregate tokens/s at 1/4/16/64 concurrent streams vs the ideal C / (a + b*C).
3. litserve: ``tep serve`` (toy model on the engine, instant mode) next to LitServe's
   ``ContinuousBatchingLoop`` (benchmarks/_litserve_cb_app.py, same instant text, same
   ``max_batch_size``) under 16 and 64 concurrent streaming clients: aggregate tokens/s
   and time to first token (p50/p99).
4. embeddings: 64 clients each sending one sentence per request to the MiniLM backend
   (``tep serve``), with cross-request batching (tep.engine.BatchedEmbeddings) and
   without, in the same run: requests/s.

Writes a table per part, benchmarks/results/engine.json, engine.png and engine.md (the
RESULTS.md section).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import describe  # noqa: E402
from _harness import Conn, Server, pct, post_loop  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

from tep.backend import StreamSink  # noqa: E402
from tep.engine import Engine  # noqa: E402
from tep.kernels import sample  # noqa: E402
from tep.backend import Sampling  # noqa: E402

OVERHEAD_SHARE_TARGET = 0.20      # the engine's share of a step at B >= 8
LITSERVE_TPS_TARGET = 5.0         # tep / LitServe aggregate tokens/s


# ---- models --------------------------------------------------------------------------------

class InstantModel:
    """No compute: the same preallocated float32 [S, V] logits every step."""

    def __init__(self, vocab_size: int, max_num_seqs: int) -> None:
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.rows = np.random.default_rng(0).standard_normal(
            (max_num_seqs, vocab_size)).astype(np.float32)

    def list_models(self) -> list[str]:
        return ["instant"]

    def forward(self, batch):  # noqa: ANN001
        return self.rows[:batch.n_logit_rows]

    def release(self, seq_id: int) -> None:
        pass


class SleepModel(InstantModel):
    """forward costs a + b*rows seconds (sleeping, so the GIL is free as in a real model)."""

    def __init__(self, vocab_size: int, max_num_seqs: int, a: float, b: float) -> None:
        super().__init__(vocab_size, max_num_seqs)
        self.a, self.b = a, b

    def forward(self, batch):  # noqa: ANN001
        time.sleep(self.a + self.b * batch.n_logit_rows)
        return self.rows[:batch.n_logit_rows]


# ---- 1. overhead ---------------------------------------------------------------------------

def bench_overhead(bs: list[int], V: int, steps: int, repeats: int,
                   threads: int | None) -> list[dict]:
    rows = []
    for B in bs:
        model = InstantModel(V, B)
        eng = Engine(model, max_num_seqs=B, max_batch_tokens=max(B, 64),
                     sample_threads=threads)
        for i in range(B):
            s = Sampling(max_tokens=10**9, temperature=1.0, seed=i)
            eng.add_request([1, 2, 3], s, StreamSink(s), lambda e: None)
        while len(eng.sched.running) < B or any(x.prefilling for x in eng.sched.running):
            eng.run_until_idle(max_steps=1)        # admitted, prefilled, decoding
        logits = model.rows[:B]
        kw = eng.rows._kwargs(np.arange(B, dtype=np.int64))
        kw.pop("_penalized", None)

        def engine_steps() -> None:
            for _ in range(steps):
                eng.step()

        step_arrays = [np.full(B, 10**6 + i, np.uint64) for i in range(steps)]

        def sample_calls() -> None:
            # what the engine calls (the one-row entry at B = 1), with a new step each
            # call as in decoding (the draw's cost depends on where the uniform lands)
            for i in range(steps):
                if B == 1:
                    sample(logits[0], temperature=1.0, seed=0, step=10**6 + i)
                else:
                    kw["step"] = step_arrays[i]
                    sample(logits, **kw)

        t_eng, t_smp, fwd, inner, own_share = [], [], [], [], []
        for _ in range(repeats):
            f0, k0 = eng.stats.forward_s, eng.rows.kernel_s
            t0 = time.perf_counter()
            engine_steps()
            wall = time.perf_counter() - t0
            t_eng.append(wall / steps)
            fwd.append((eng.stats.forward_s - f0) / steps)
            inner.append((eng.rows.kernel_s - k0) / steps)
            # the engine's own time in this repeat: the step minus forward minus the
            # sample call it made (timed around the kernel call inside the engine)
            own_share.append(1.0 - (eng.stats.forward_s - f0 + eng.rows.kernel_s - k0) / wall)
            t0 = time.perf_counter()
            sample_calls()
            t_smp.append((time.perf_counter() - t0) / steps)
        step, smp, fw = float(np.median(t_eng)), float(np.median(t_smp)), float(np.median(fwd))
        share = float(np.median(own_share))
        rows.append({"B": B, "V": V, "step_us": step * 1e6, "per_token_us": step * 1e6 / B,
                     "sample_us": smp * 1e6, "sample_in_engine_us": float(np.median(inner)) * 1e6,
                     "forward_us": fw * 1e6, "engine_us": share * step * 1e6,
                     "engine_share": share})
        print(f"  B={B:4d}  step {step*1e6:9.1f} us  per token {step*1e6/B:7.2f} us  "
              f"sample alone {smp*1e6:9.1f} us  (in engine {rows[-1]['sample_in_engine_us']:9.1f})"
              f"  forward {fw*1e6:6.1f} us  engine {share*step*1e6:8.1f} us "
              f"({100*share:4.1f}%)", flush=True)
    return rows


# ---- 2. scaling ----------------------------------------------------------------------------

def bench_scaling(cs: list[int], a: float, b: float, n_tokens: int) -> list[dict]:
    rows = []
    for C in cs:
        model = SleepModel(1024, max(cs), a, b)
        eng = Engine(model, max_num_seqs=max(cs), max_batch_tokens=4096).start()
        done = threading.Semaphore(0)
        t0 = time.perf_counter()
        for i in range(C):
            s = Sampling(max_tokens=n_tokens, temperature=1.0, seed=i)
            eng.add_request([1, 2, 3, 4], s, StreamSink(s), lambda e: done.release())
        for _ in range(C):
            done.acquire()
        wall = time.perf_counter() - t0
        eng.stop()
        tps = C * n_tokens / wall
        ideal = C / (a + b * C)
        fwd = eng.stats.forward_s / wall   # < 1: time outside forward (engine, clients)
        rows.append({"streams": C, "tokens_per_s": tps, "ideal_tokens_per_s": ideal,
                     "of_ideal": tps / ideal, "steps": eng.stats.steps,
                     "forward_share": fwd,
                     "forward_ms_per_step": 1e3 * eng.stats.forward_s / eng.stats.steps})
        print(f"  streams={C:3d}  {tps:9.0f} tok/s  ideal {ideal:9.0f}  "
              f"({100*tps/ideal:5.1f}% of ideal, {eng.stats.steps} steps; forward "
              f"{rows[-1]['forward_ms_per_step']:.2f} ms/step (asked "
              f"{1e3*(a + b*C):.2f}), {100*fwd:.0f}% of the wall time)", flush=True)
    return rows


# ---- servers and clients -------------------------------------------------------------------

async def _post_stream(port: int, path: str, body: bytes, token: "re.Pattern[bytes]"
                       ) -> tuple[float, int]:
    """POST on a fresh connection and read the chunked body. Returns (seconds to the first
    chunk holding a ``token`` match, matches in the whole body = tokens)."""
    t0 = time.perf_counter()
    c = await Conn(port).open()
    ttft = []
    status, data = await c.post(path, body, on_first=lambda: ttft.append(time.perf_counter() - t0),
                                first=token)
    c.close()
    if status != 200:
        raise RuntimeError(f"status {status}")
    return (ttft[0] if ttft else float("nan")), len(token.findall(data))


async def _streams(port: int, path: str, body: bytes, token: "re.Pattern[bytes]",
                   clients: int, rounds: int) -> dict:
    """``clients`` concurrent streams, ``rounds`` requests each (back to back)."""
    ttfts: list[float] = []
    tokens = [0]

    async def client() -> None:
        for _ in range(rounds):
            t, n = await _post_stream(port, path, body, token)
            ttfts.append(t)
            tokens[0] += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens[0] / wall, "ttft_p50_ms": 1e3 * pct(ttfts, 50),
            "ttft_p99_ms": 1e3 * pct(ttfts, 99), "tokens": tokens[0],
            "wall_s": wall}


# ---- 3. litserve ---------------------------------------------------------------------------

def _engine_thread_cost(B: int, steps: int = 300) -> dict:
    """The engine's own cost per token for the toy instant model at B sequences."""
    from tep.backends.toy import ToyBackend, ToyModel

    eng = Engine(ToyModel(ToyBackend(instant=True), max_num_seqs=B), max_num_seqs=B,
                 max_batch_tokens=8 * B)
    for i in range(B):
        s = Sampling(max_tokens=10**9, temperature=0.0, seed=i)
        eng.add_request(list(b"Hello"), s, StreamSink(s, on_delta=lambda t, lp: None),
                        lambda e: None)
    eng.run_until_idle(max_steps=3)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    dt = (time.perf_counter() - t0) / steps
    return {"B": B, "us_per_step": dt * 1e6, "us_per_token": dt * 1e6 / B}


def bench_litserve(cs: list[int], n_tokens: int, rounds: int, repeats: int,
                   out_extra: dict) -> list[dict]:
    py = sys.executable
    batch = max(cs)
    tep_cmd = [py, "-m", "tep", "serve", "--toy-instant", "--port", "{port}",
               "--log-level", "warning", "--max-concurrency", str(4 * batch),
               "--max-num-seqs", str(batch), "--max-batch-tokens", str(8 * batch)]
    ls_cmd = [py, str(HERE / "_litserve_cb_app.py"), "{port}", str(batch)]
    tep_body = json.dumps({"model": "tep-toy", "prompt": "Hello", "max_tokens": n_tokens,
                           "temperature": 0.0, "stream": True}).encode()
    ls_body = json.dumps({"max_tokens": n_tokens}).encode()
    rows = []
    out_extra["engine_thread_toy"] = _engine_thread_cost(batch)
    with Server(tep_cmd) as tep, Server(ls_cmd) as lit:
        for C in cs:
            res: dict[str, list] = {"tep": [], "litserve": []}
            for _ in range(repeats):   # interleaved
                res["tep"].append(asyncio.run(_streams(
                    tep.port, "/v1/completions", tep_body, re.compile(rb'"text":"[^"]'), C, rounds)))
                res["litserve"].append(asyncio.run(_streams(
                    lit.port, "/predict", ls_body, re.compile(rb'"token": ?"[^"]'), C, rounds)))
            for name, runs in res.items():
                med = {k: float(np.median([r[k] for r in runs]))
                       for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
                med["tokens_per_request"] = runs[0]["tokens"] / (C * rounds)
                rows.append({"server": name, "streams": C, **med})
                print(f"  {name:9s} streams={C:3d}  {med['tokens_per_s']:9.0f} tok/s  "
                      f"TTFT p50 {med['ttft_p50_ms']:7.1f} ms  p99 {med['ttft_p99_ms']:7.1f} ms"
                      f"  ({med['tokens_per_request']:.0f} tokens/request)", flush=True)
    return rows


# ---- 4. embeddings -------------------------------------------------------------------------

_WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above "
          "quiet rivers and distant mountains under an autumn sky").split()


async def _embed_load(port: int, clients: int, duration_s: float) -> dict:
    rng = random.Random(0)

    def body() -> bytes:
        text = " ".join(rng.choice(_WORDS) for _ in range(12))
        return json.dumps({"model": "all-MiniLM-L6-v2", "input": text}).encode()

    r = await post_loop(port, "/v1/embeddings", body, clients, duration_s)
    return {"requests_per_s": r["requests"] / r["wall_s"], "requests": r["requests"]}


def bench_embeddings(clients: int, duration_s: float, repeats: int, wait_ms: float) -> list[dict]:
    py = sys.executable
    base = [py, "-m", "tep", "serve", "--port", "{port}", "--log-level", "warning",
            "--max-concurrency", str(clients)]
    plain = base + ["--backend", "tep.backends.bert:BertBackend"]
    batched = base + ["--backend", "_engine_peers:batched_minilm"]
    # one BLAS/OpenMP thread per process for both: on the shared 2-core machine a
    # spinning second thread made a single sentence take ~1 s instead of ~50 ms
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
           "TEP_EMBED_WAIT_MS": str(wait_ms), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    res: dict[str, list] = {"per request": [], "batched across requests": []}
    with Server(plain, env) as a, Server(batched, env) as b:
        for _ in range(repeats):
            res["per request"].append(asyncio.run(_embed_load(a.port, clients, duration_s)))
            res["batched across requests"].append(
                asyncio.run(_embed_load(b.port, clients, duration_s)))
    rows = []
    for name, runs in res.items():
        rps = float(np.median([r["requests_per_s"] for r in runs]))
        rows.append({"mode": name, "clients": clients, "requests_per_s": rps})
        print(f"  {name:26s} {clients} clients  {rps:8.1f} req/s", flush=True)
    return rows


# ---- report --------------------------------------------------------------------------------

def targets(out: dict) -> list[dict]:
    checks = []

    def add(name: str, value: float, op: str, target: float) -> None:
        ok = value <= target if op == "<=" else value >= target
        checks.append({"name": name, "value": value, "op": op, "target": target, "pass": ok})

    for r in out.get("overhead", []):
        if r["B"] >= 8:
            add(f"engine share of a step, B={r['B']}, V={r['V']}", r["engine_share"], "<=",
                OVERHEAD_SHARE_TARGET)
    lit = out.get("litserve", [])
    for C in sorted({r["streams"] for r in lit}):
        t = next(r for r in lit if r["server"] == "tep" and r["streams"] == C)
        p = next(r for r in lit if r["server"] == "litserve" and r["streams"] == C)
        add(f"tokens/s tep / LitServe CB, {C} streams", t["tokens_per_s"] / p["tokens_per_s"],
            ">=", LITSERVE_TPS_TARGET)
        add(f"TTFT p99 LitServe / tep, {C} streams", p["ttft_p99_ms"] / t["ttft_p99_ms"],
            ">=", 1.0)
    emb = out.get("embeddings", [])
    if len(emb) == 2:
        add("embeddings req/s batched / per request, 64 clients",
            emb[1]["requests_per_s"] / emb[0]["requests_per_s"], ">=", 1.0)
    return checks


def plot(out: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ov = out.get("overhead", [])
    if ov:
        x = np.arange(len(ov))
        ax[0].bar(x - 0.2, [r["sample_us"] / r["B"] for r in ov], 0.4, label="sample alone")
        ax[0].bar(x + 0.2, [r["step_us"] / r["B"] for r in ov], 0.4, label="engine step")
        ax[0].set_xticks(x, [f"B={r['B']}" for r in ov])
        ax[0].set_ylabel("µs per token")
        ax[0].set_title(f"Instant model, V={ov[0]['V']}")
        ax[0].legend()
    sc = out.get("scaling", [])
    if sc:
        c = [r["streams"] for r in sc]
        ax[1].plot(c, [r["tokens_per_s"] for r in sc], "o-", label="engine")
        ax[1].plot(c, [r["ideal_tokens_per_s"] for r in sc], "k--", label="ideal C/(a+b·C)")
        ax[1].plot(c, [1e3 * r["streams"] / r["forward_ms_per_step"] for r in sc], "k:",
                   label="C / measured forward (the sleeps overshoot)")
        ax[1].set_xscale("log", base=2)
        ax[1].set_xlabel("concurrent streams")
        ax[1].set_ylabel("tokens/s")
        ax[1].set_title("forward = a + b·rows")
        ax[1].legend()
    lit = out.get("litserve", [])
    if lit:
        cs = sorted({r["streams"] for r in lit})
        x = np.arange(len(cs))
        for k, name in enumerate(("tep", "litserve")):
            v = [next(r["tokens_per_s"] for r in lit if r["server"] == name and
                      r["streams"] == C) for C in cs]
            ax[2].bar(x + (k - 0.5) * 0.4, v, 0.4,
                      label="tep engine" if name == "tep" else "LitServe CB loop")
        ax[2].set_xticks(x, [f"{C} streams" for C in cs])
        ax[2].set_ylabel("aggregate tokens/s")
        ax[2].set_title("HTTP, instant model")
        ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(out: dict, checks: list[dict]) -> str:
    m = out["machine"]
    L = ["## Engine (continuous batching)", "",
         f"`python benchmarks/bench_engine.py{' --quick' if out.get('quick') else ''}`; "
         f"1-minute load average {m['loadavg_1_5_15'][0]:.1f} -> {m['loadavg_end'][0]:.1f} "
         f"on {m.get('logical_cpus')} logical CPUs (shared cores: noisy; compare within a "
         "table).", ""]
    L += ["| check | measured | target | |", "|---|---|---|---|"]
    for c in checks:
        L.append(f"| {c['name']} | {c['value']:.2f} | {c['op']} {c['target']} | "
                 f"{'PASS' if c['pass'] else '**MISS**'} |")
    if out.get("overhead"):
        L += ["", "Per step with an instant model (forward returns preallocated logits), "
              "next to `tep.kernels.sample` alone on the same logits and knobs:", "",
              "| B | step µs | per token µs | sample alone µs | sample in the engine µs | "
              "engine's own µs | share of the step |",
              "|---|---|---|---|---|---|---|"]
        for r in out["overhead"]:
            L.append(f"| {r['B']} | {r['step_us']:.1f} | {r['per_token_us']:.2f} | "
                     f"{r['sample_us']:.1f} | {r['sample_in_engine_us']:.1f} | "
                     f"{r['engine_us']:.1f} | {100 * r['engine_share']:.1f}% |")
    if out.get("scaling"):
        a, b = out["scaling_model"]["a_ms"], out["scaling_model"]["b_ms"]
        L += ["", f"Scaling with forward = {a} ms + {b} ms·rows (sleeps; V=1024):", "",
              "| streams | tokens/s | ideal C/(a+b·C) | of ideal | forward ms/step measured "
              "| forward's share of the wall time |", "|---|---|---|---|---|---|"]
        for r in out["scaling"]:
            L.append(f"| {r['streams']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ideal_tokens_per_s']:.0f} | {100 * r['of_ideal']:.0f}% | "
                     f"{r['forward_ms_per_step']:.2f} | {100 * r['forward_share']:.0f}% |")
    if out.get("litserve"):
        L += ["", "Over HTTP, instant model, streaming clients (fresh connection per "
              "request), tep `--toy-instant` on the engine vs LitServe's "
              "`ContinuousBatchingLoop` with the same `max_batch_size`:", "",
              "| server | streams | tokens/s | TTFT p50 ms | TTFT p99 ms |",
              "|---|---|---|---|---|"]
        for r in out["litserve"]:
            L.append(f"| {r['server']} | {r['streams']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} |")
    if out.get("engine_thread_toy"):
        e = out["engine_thread_toy"]
        L += ["", f"The tep server's engine thread alone (same toy instant model, B="
              f"{e['B']}, in-process, sinks without a client) costs {e['us_per_token']:.1f} "
              f"µs per token, i.e. it could feed about {1e6 / e['us_per_token']:,.0f} "
              "tokens/s: over HTTP the per-token cost is the server's (SSE events, writes), "
              "not the engine's."]
    if out.get("embeddings"):
        L += ["", "MiniLM embeddings, one 12-word sentence per request, keep-alive clients:",
              "", "| mode | clients | requests/s |", "|---|---|---|"]
        for r in out["embeddings"]:
            L.append(f"| {r['mode']} | {r['clients']} | {r['requests_per_s']:.1f} |")
    L += ["", "![engine](results/engine.png)", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "engine.json")
    ap.add_argument("--only", nargs="+", default=["overhead", "scaling", "litserve",
                                                  "embeddings"])
    ap.add_argument("--sample-threads", type=int, default=1,
                    help="threads of the sample call (default 1: the cores are shared)")
    args = ap.parse_args(argv)
    q = args.quick
    out: dict = {"bench": "engine", "quick": q, "machine": describe()}
    if "overhead" in args.only:
        print("1. engine overhead per step (instant model)")
        out["sample_threads"] = args.sample_threads
        out["overhead"] = bench_overhead([1, 8, 64, 256], 32000, 20 if q else 50,
                                         3 if q else 5, args.sample_threads)
    if "scaling" in args.only:
        a, b = 0.004, 0.0001
        out["scaling_model"] = {"a_ms": a * 1e3, "b_ms": b * 1e3}
        print(f"2. scaling, forward = {a*1e3} ms + {b*1e3} ms * rows")
        out["scaling"] = bench_scaling([1, 4, 16, 64], a, b, 32 if q else 64)
    if "litserve" in args.only:
        print("3. tep engine vs LitServe ContinuousBatchingLoop (HTTP, instant model)")
        try:
            import litserve  # noqa: F401
            out["litserve"] = bench_litserve([16, 64], 64, 2 if q else 4, 1 if q else 3, out)
        except ImportError:
            print("  skipped: litserve is not installed")
    if "embeddings" in args.only:
        print("4. embeddings, 64 clients, MiniLM")
        try:
            from tep.backends.bert import default_model_dir
            if default_model_dir() is None:
                raise ImportError("no MiniLM weights")
            out["embeddings"] = bench_embeddings(64, 3.0 if q else 6.0, 1 if q else 3, 2.0)
        except ImportError as e:
            print(f"  skipped: {e}")
    checks = targets(out)
    out["targets"] = checks
    print_targets(checks)
    write_result(args.json, out)
    png = args.json.parent / "engine.png"
    out["png"] = plot(out, png)
    (args.json.parent / "engine.md").write_text(markdown(out, checks))
    return out


if __name__ == "__main__":
    main()
