"""tep.kernels speed against the issue-2 targets: sampling vs the np.max floor, pooling vs numpy.

    python benchmarks/bench_kernels.py [--quick] [--vocab 32000 128256 262144] [--batch 1 8 64]
                                       [--dists normal2 peaked] [--budget 6]
                                       [--json benchmarks/results/kernels.json]

Sampling. Logits float32 [B, V] (seed 0), two distributions:
  normal2  standard normal * 2 (a flat-ish LM row: ~1e5 tokens within a few nats of the top)
  peaked   normal2 with 16 random tokens raised by +10 (a confident LM row: the top 16 hold
           almost all the mass); measured at V=128256 only.
Cases (every one timed with ``n_threads=1``; for B >= 8 also ``n_threads=2``):
  greedy     temperature=0
  chain      temperature=0.8, top_k=40, top_p=0.95, min_p=0.05   (llama.cpp's defaults)
  top_p      top_p=0.95 alone (T=1)
  full       T=1, no filter: a draw from the full-vocabulary softmax
  penalties  chain + repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5 over
             a 512-token output history per row (Zipf-distributed ids, so tokens repeat)
  floor      np.max(logits, axis=1): one read of the logits, the least any sampler can do
B = 1 is timed twice: as a [V] row (the targets use this) and as [1, V].
All take ``seed=0, step=0`` (the draw's cost does not depend on the values) and the default
``logprobs=None``. Cases of one (dist, V, B) group are interleaved within each repeat; the
number reported is the median per call.

Pooling. Masked mean over padded hidden float32 [B, T, D] in {[32, 512, 1024],
[256, 128, 384]} with lengths uniform in [1, T] (seed 0):
  numpy      (h * mask[..., None]).sum(1) / count      (mask float32 [B, T])
  floor      [np.sum(h[b, :len_b], axis=0) for b in range(B)]: reads only the valid tokens
  tep_mask   pool(h, mask=bool mask)     tep_lengths  pool(h, lengths=lens)
at n_threads=1 (the targets) and 2.

Targets (issue 2), V=128256, one thread, ratio to the floor: greedy <= 1.5, chain <= 4,
top_p <= 20, full <= 20; B=64: 1 thread / 2 threads >= 1.7; pooling: numpy / tep >= 3 and
tep / floor <= 1.3.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _cases import SAMPLING_CASES  # noqa: E402
from _machine import describe  # noqa: E402
from _report import print_targets, write_result  # noqa: E402
from _timing import interleaved  # noqa: E402

from tep.kernels import pool, sample  # noqa: E402

SAMPLING_TARGETS = {"greedy": 1.5, "chain": 4.0, "top_p": 20.0, "full": 20.0}
TARGET_V = 128256
SPEEDUP_TARGET = 1.7
POOL_SHAPES = [(32, 512, 1024), (256, 128, 384)]
HISTORY = 512


def make_logits(dist: str, B: int, V: int, seed: int = 0) -> np.ndarray:
    """float32 [B, V] logits of the named distribution (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, V), dtype=np.float32) * np.float32(2.0)
    if dist == "peaked":
        for b in range(B):
            x[b, rng.choice(V, 16, replace=False)] += np.float32(10.0)
    elif dist != "normal2":
        raise ValueError(f"unknown dist {dist!r}")
    return x


def make_history(B: int, V: int, n: int = HISTORY, seed: int = 1) -> list[np.ndarray]:
    """B output histories of n token ids (Zipf-distributed, so many repeat)."""
    rng = np.random.default_rng(seed)
    return [((rng.zipf(1.3, n) * 7919) % V).astype(np.int64) for _ in range(B)]


def bench_sampling_group(dist: str, V: int, B: int, threads: list[int],
                         budget_s: float, min_repeats: int, flat: bool = False) -> list[dict]:
    """All sampling cases of one (dist, V, B) group, interleaved; one row per case/threads.

    ``flat`` (B == 1 only): pass the row as a [V] array (and its history as one sequence)
    instead of [1, V]."""
    x = make_logits(dist, B, V)
    hist = make_history(B, V)
    layout = "[B,V]"
    if flat:
        assert B == 1
        x, hist, layout = x[0], hist[0], "[V]"
    cases = {"floor": lambda: np.max(x, axis=-1)}
    for t in threads:
        for name, kw in SAMPLING_CASES.items():
            extra = {"output_token_ids": hist} if name == "penalties" else {}
            cases[f"{name}@{t}"] = (lambda kw=kw, extra=extra, t=t:
                                    sample(x, seed=0, step=0, n_threads=t, **kw, **extra))
    # sanity: greedy is argmax, so the table measures a kernel that computes the right thing
    got = sample(x, temperature=0.0, n_threads=1)
    assert np.array_equal(got, np.argmax(x, axis=-1)), "greedy != argmax"
    res = interleaved(cases, min_repeats=min_repeats, budget_s=budget_s)
    floor = res["floor"]["median_s"]
    rows = [{"kind": "sampling", "dist": dist, "V": V, "B": B, "layout": layout, "threads": 1,
             "case": "floor", **res["floor"], "ratio_to_floor": 1.0}]
    for key, r in res.items():
        if key == "floor":
            continue
        name, t = key.split("@")
        rows.append({"kind": "sampling", "dist": dist, "V": V, "B": B, "layout": layout,
                     "threads": int(t), "case": name, **r, "ratio_to_floor": r["median_s"] / floor})
    return rows


def bench_pooling(shape: tuple[int, int, int], threads: list[int], budget_s: float,
                  min_repeats: int) -> list[dict]:
    """Masked mean over one padded shape: numpy, the floor, tep (mask and lengths)."""
    B, T, D = shape
    rng = np.random.default_rng(0)
    h = rng.standard_normal(shape, dtype=np.float32)
    lens = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lens[:, None]                # bool [B, T]
    maskf = mask.astype(np.float32)[..., None]                  # float32 [B, T, 1]
    count = mask.sum(1, keepdims=True).astype(np.float32)       # float32 [B, 1]
    cases = {
        "numpy": lambda: (h * maskf).sum(1) / count,
        "floor": lambda: [np.sum(h[b, :lens[b]], axis=0) for b in range(B)],
    }
    for t in threads:
        cases[f"tep_mask@{t}"] = lambda t=t: pool(h, mask=mask, mode="mean", n_threads=t)
        cases[f"tep_lengths@{t}"] = lambda t=t: pool(h, lengths=lens, mode="mean", n_threads=t)
    ref = (h * maskf).sum(1) / count
    assert np.allclose(pool(h, mask=mask, n_threads=1), ref, rtol=1e-4, atol=1e-5)
    assert np.allclose(pool(h, lengths=lens, n_threads=1), ref, rtol=1e-4, atol=1e-5)
    res = interleaved(cases, min_repeats=min_repeats, budget_s=budget_s)
    rows = []
    for key, r in res.items():
        name, _, t = key.partition("@")
        rows.append({"kind": "pooling", "shape": list(shape), "case": name,
                     "threads": int(t) if t else 1, **r,
                     "numpy_over": res["numpy"]["median_s"] / r["median_s"],
                     "over_floor": r["median_s"] / res["floor"]["median_s"]})
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue-2 target checks, each {name, value, op, target, pass}."""
    out = []

    def add(name: str, value: float, op: str, target: float) -> None:
        ok = value <= target if op == "<=" else value >= target
        out.append({"name": name, "value": value, "op": op, "target": target, "pass": ok})

    samp = [r for r in rows if r["kind"] == "sampling" and r["dist"] == "normal2"
            and r["V"] == TARGET_V and (r["B"] > 1 or r["layout"] == "[V]")]
    for B in sorted({r["B"] for r in samp}):
        for case, tgt in SAMPLING_TARGETS.items():
            r = next((r for r in samp if r["B"] == B and r["case"] == case
                      and r["threads"] == 1), None)
            if r:
                add(f"{case} / floor, V={TARGET_V}, B={B}, 1 thread", r["ratio_to_floor"],
                    "<=", tgt)
    for case in SAMPLING_CASES:
        t1 = next((r for r in samp if r["B"] == 64 and r["case"] == case
                   and r["threads"] == 1), None)
        t2 = next((r for r in samp if r["B"] == 64 and r["case"] == case
                   and r["threads"] == 2), None)
        if t1 and t2:
            add(f"{case}: 1 thread / 2 threads, V={TARGET_V}, B=64",
                t1["median_s"] / t2["median_s"], ">=", SPEEDUP_TARGET)
    for r in rows:
        if r["kind"] == "pooling" and r["case"].startswith("tep") and r["threads"] == 1:
            shp = "x".join(map(str, r["shape"]))
            add(f"pool {r['case']} [{shp}]: numpy / tep", r["numpy_over"], ">=", 3.0)
            add(f"pool {r['case']} [{shp}]: tep / floor", r["over_floor"], "<=", 1.3)
    return out


def print_report(rows: list[dict], checks: list[dict]) -> None:
    """The human-readable tables."""
    names = list(SAMPLING_CASES)
    print("\nSampling: median us per call (x = ratio to the np.max floor of the same group)")
    print(f"{'dist':>8} {'V':>7} {'B':>3} {'layout':>6} {'thr':>3} {'floor':>9} " +
          " ".join(f"{n:>18}" for n in names))
    key = lambda r: (r["dist"], r["V"], r["B"], r["layout"])  # noqa: E731
    groups = sorted({(*key(r), r["threads"]) for r in rows
                     if r["kind"] == "sampling" and r["case"] != "floor"})
    for dist, V, B, lay, t in groups:
        floor = next(r for r in rows if r["kind"] == "sampling"
                     and key(r) == (dist, V, B, lay) and r["case"] == "floor")
        cells = []
        for n in names:
            r = next(r for r in rows if r["kind"] == "sampling" and key(r) == (dist, V, B, lay)
                     and r["threads"] == t and r["case"] == n)
            cells.append(f"{r['median_s'] * 1e6:9.1f} {r['ratio_to_floor']:6.1f}x ")
        print(f"{dist:>8} {V:>7} {B:>3} {lay:>6} {t:>3} {floor['median_s'] * 1e6:9.1f} " +
              " ".join(f"{c:>18}" for c in cells))
    print("\nPooling (masked mean): median ms per call")
    print(f"{'shape':>16} {'case':>12} {'thr':>3} {'ms':>9} {'numpy/x':>8} {'x/floor':>8}")
    for r in rows:
        if r["kind"] == "pooling":
            print(f"{str(r['shape']):>16} {r['case']:>12} {r['threads']:>3} "
                  f"{r['median_s'] * 1e3:9.3f} {r['numpy_over']:8.2f} {r['over_floor']:8.2f}")
    print()
    print_targets(checks)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="V=128256 only, B in {1, 64}, fewer repeats (about 30 s)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 262144])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--dists", nargs="+", default=["normal2", "peaked"])
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds per group after the minimum repeats")
    ap.add_argument("--no-pooling", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "kernels.json")
    args = ap.parse_args(argv)
    min_repeats = 7
    if args.quick:
        args.vocab, args.batch, args.budget, min_repeats = [TARGET_V], [1, 64], 1.0, 3

    t_start = time.time()
    machine = describe()
    rows: list[dict] = []
    for dist in args.dists:
        vocabs = args.vocab if dist == "normal2" else [v for v in args.vocab if v == TARGET_V]
        for V in vocabs:
            for B in args.batch:
                threads = [1, 2] if B >= 8 else [1]
                if B == 1:  # one row as [V] (what a single-sequence backend passes) ...
                    rows += bench_sampling_group(dist, V, B, threads, args.budget, min_repeats,
                                                 flat=True)
                # ... and every B as [B, V]
                rows += bench_sampling_group(dist, V, B, threads, args.budget, min_repeats)
                print(f"  sampling {dist} V={V} B={B} done", file=sys.stderr, flush=True)
    if not args.no_pooling:
        for shape in POOL_SHAPES:
            rows += bench_pooling(shape, [1, 2], args.budget, min_repeats)
    checks = targets(rows)
    print_report(rows, checks)
    return write_result(args.json, {
        "bench": "kernels", "quick": args.quick, "machine": machine,
        "wall_s": time.time() - t_start, "rows": rows, "targets": checks,
        "logits": "normal2 = standard normal * 2; peaked = normal2 + 10 on 16 random "
                  "tokens per row", "seed": 0})


if __name__ == "__main__":
    main()
