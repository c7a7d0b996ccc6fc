"""What verifying drafts costs on this machine, and the most speculation can gain here.

    python benchmarks/bench_verify_cost.py [--max-tokens 17] [--repeats 15] [--position 150]
        [--threads 2] [--json benchmarks/results/verify_cost.json]

The real GGUF through tep's llama.cpp model (exact mode, as served): one sequence with a
``--position``-token prompt, then steps of n = 1 .. ``--max-tokens`` tokens of it in one
``forward``, logits on every row (as a verification needs), rewound after each. The n are
interleaved and their order reversed every repeat; a cost is the median over repeats.

From the cost curve c(n) it prints the ceiling of speculative decoding's decode speed-up
here: with K drafts, each accepted with probability p independently of the others, a
step emits (1 - p^(K+1)) / (1 - p) tokens on average for c(K + 1) / c(1) of a plain
step's time; the ceiling is the best K's ratio. p = 1 is the bound for any drafter:
every draft accepted. (Real acceptance comes in runs - a copied passage accepts every
draft, a changed word none - so a measured speed-up can sit above the ceiling of its
average p, never above p = 1's.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _harness import table  # noqa: E402
from _machine import describe  # noqa: E402
from _report import write_result  # noqa: E402

ACCEPTANCE = (1.0, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7)


def expected_tokens(p: float, k: int) -> float:
    """Tokens one step emits on average with k drafts accepted with probability p each
    (the accepted run, plus the target's own token after it)."""
    return float(k + 1) if p >= 1.0 else (1.0 - p ** (k + 1)) / (1.0 - p)


def ceiling(cost: dict[int, float], p: float) -> tuple[float, int]:
    """(the best decode speed-up over plain steps, its K) for acceptance p, from the
    cost curve ``cost`` {tokens in the step: seconds}."""
    return max((expected_tokens(p, n - 1) * cost[1] / c, n - 1) for n, c in cost.items())


def measure(a: argparse.Namespace) -> dict[int, float]:
    from tep.backends.llamacpp import default_model_path
    from tep.backends.llamacpp_model import LlamaCppModel
    from tep.engine.model import StepBatch

    model = LlamaCppModel(default_model_path(), max_num_seqs=2, n_threads=a.threads,
                          context_size=max(1024, a.position + a.max_tokens + 1))
    try:
        rng = np.random.default_rng(0)
        P = a.position
        model.forward(StepBatch(rng.integers(100, 20000, P).astype(np.int32),
                                np.arange(P, dtype=np.int32), np.zeros(P, np.int32),
                                np.r_[np.zeros(P - 1, bool), True]))
        ns = list(range(1, a.max_tokens + 1))
        times: dict[int, list[float]] = {n: [] for n in ns}
        for r in range(a.repeats):
            for n in (ns if r % 2 else ns[::-1]):
                b = StepBatch(rng.integers(100, 20000, n).astype(np.int32),
                              np.arange(P, P + n, dtype=np.int32), np.zeros(n, np.int32),
                              np.ones(n, bool))
                t0 = time.perf_counter()
                model.forward(b)
                times[n].append(time.perf_counter() - t0)
                model.rewind(0, P)
        return {n: float(np.median(t)) for n, t in times.items()}
    finally:
        model.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=17, help="largest step: K + 1")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--position", type=int, default=150, help="prompt length before the steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.max_tokens < 2 or a.repeats < 1 or a.position < 1:
        ap.error("need --max-tokens >= 2, --repeats >= 1, --position >= 1")
    cost = measure(a)
    base = cost[1]
    print(table(("tokens", "ms", "x one token", "ms per token"),
                [(n, c * 1e3, c / base, c * 1e3 / n) for n, c in cost.items()]))
    rows, ceilings = [], []
    for p in ACCEPTANCE:
        gain, k = ceiling(cost, p)
        rows.append((p, k, gain))
        ceilings.append({"acceptance": p, "best_k": k, "speedup": gain})
    print()
    print(table(("acceptance p", "best K", "decode speed-up ceiling"), rows))
    write_result(a.json, {"machine": describe(), "threads": a.threads, "position": a.position,
                          "repeats": a.repeats,
                          "step_seconds": {str(n): c for n, c in cost.items()},
                          "ceilings": ceilings})


if __name__ == "__main__":
    main()
