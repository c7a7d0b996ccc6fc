"""Quick pooling timing (issue 2 targets): masked mean vs numpy and vs the np.sum floor.

    python benchmarks/bench_pooling_quick.py [--threads 1] [--repeats 30]

Cases: hidden float32 [B, T, D] with lengths uniform in [1, T] (seed 0). Times are medians
of `--repeats` runs (seconds -> shown in ms). Ratios: numpy / tep (target >= 3) and
tep / floor (target <= 1.3), where the floor is sum over b of np.sum(h[b, :len_b], axis=0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    from tep.kernels.pooling import pool
except ImportError:  # tep.kernels/__init__ imports sampling, which may not be built yet
    for name in [k for k in sys.modules if k.startswith("tep.kernels")]:
        del sys.modules[name]
    pkg = types.ModuleType("tep.kernels")
    pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "tep" / "kernels")]
    sys.modules["tep.kernels"] = pkg
    from tep.kernels.pooling import pool


def median_times(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds per case; cases are interleaved per repeat so load drift hits all alike."""
    for fn in cases.values():
        fn()  # warm-up (page faults, caches)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for shape in [(32, 512, 1024), (256, 128, 384)]:
        B, T, D = shape
        h = rng.standard_normal(shape, dtype=np.float32)
        lens = rng.integers(1, T + 1, B)
        mask = np.arange(T)[None, :] < lens[:, None]           # bool [B, T]
        count = mask.sum(1, keepdims=True).astype(np.float32)

        def numpy_masked():
            return (h * mask[..., None]).sum(1) / count

        def floor():
            return [np.sum(h[b, :lens[b]], axis=0) for b in range(B)]

        cases = {
            "numpy": numpy_masked,
            "floor": floor,
            "tep_mask": lambda: pool(h, mask=mask, mode="mean", n_threads=args.threads),
            "tep_lengths": lambda: pool(h, lengths=lens, mode="mean", n_threads=args.threads),
        }
        t = median_times(cases, args.repeats)
        ref = numpy_masked()
        assert np.allclose(pool(h, mask=mask, n_threads=args.threads), ref, rtol=1e-4, atol=1e-5)
        rows.append({
            "shape": list(shape), "threads": args.threads,
            **{f"{k}_ms": v * 1e3 for k, v in t.items()},
            "numpy_over_tep_mask": t["numpy"] / t["tep_mask"],
            "tep_mask_over_floor": t["tep_mask"] / t["floor"],
            "tep_lengths_over_floor": t["tep_lengths"] / t["floor"],
        })

    print(f"{'shape':>16} {'thr':>3} {'numpy ms':>9} {'floor ms':>9} {'mask ms':>8} "
          f"{'len ms':>8} {'np/mask':>8} {'mask/floor':>10} {'len/floor':>9}")
    for r in rows:
        print(f"{str(r['shape']):>16} {r['threads']:>3} {r['numpy_ms']:9.3f} {r['floor_ms']:9.3f} "
              f"{r['tep_mask_ms']:8.3f} {r['tep_lengths_ms']:8.3f} {r['numpy_over_tep_mask']:8.2f} "
              f"{r['tep_mask_over_floor']:10.2f} {r['tep_lengths_over_floor']:9.2f}")
    print("targets: np/mask >= 3, mask/floor <= 1.3")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
