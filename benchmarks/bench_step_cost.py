"""The engine's own cost per decode step with an instant model (no compute in forward):
B = 1, 8, 64 sequences, plain knobs and with penalties, V = 49152 (SmolLM2's vocabulary).

    python benchmarks/bench_step_cost.py [--steps 300] [--repeats 5]

Prints µs per step (median of repeats) and the share of the step spent outside the
sampling kernel and forward. Run it on two trees (PYTHONPATH) in one session to compare
before / after.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tep.backend import Sampling, StreamSink  # noqa: E402
from tep.engine import Engine  # noqa: E402


class Instant:
    def __init__(self, V: int, S: int) -> None:
        self.vocab_size = V
        self.max_num_seqs = S
        self.rows = np.random.default_rng(0).standard_normal((S, V)).astype(np.float32)

    def list_models(self) -> list[str]:
        return ["instant"]

    def forward(self, batch):  # noqa: ANN001, ANN201
        return self.rows[:batch.n_logit_rows]

    def release(self, seq_id: int) -> None:
        pass


def measure(B: int, V: int, steps: int, repeats: int, penalties: bool) -> dict:
    model = Instant(V, B)
    eng = Engine(model, max_num_seqs=B, max_batch_tokens=max(B, 64), sample_threads=1)
    for i in range(B):
        s = Sampling(max_tokens=100_000, temperature=0.8, top_p=0.95, seed=i,
                     frequency_penalty=0.3 if penalties else 0.0)
        eng.add_request([1, 2, 3], s, StreamSink(s), lambda e: None)
    while len(eng.sched.running) < B or any(x.prefilling for x in eng.sched.running):
        eng.run_until_idle(max_steps=1)
    walls, own = [], []
    for _ in range(repeats):
        f0, k0 = eng.stats.forward_s, eng.rows.kernel_s
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        w = time.perf_counter() - t0
        walls.append(w / steps)
        own.append((w - (eng.stats.forward_s - f0) - (eng.rows.kernel_s - k0)) / steps)
    return {"B": B, "penalties": penalties, "step_us": float(np.median(walls)) * 1e6,
            "own_us": float(np.median(own)) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = []
    for pen in (False, True):
        for B in (1, 8, 64):
            r = measure(B, a.V, a.steps if B < 64 else a.steps // 4, a.repeats, pen)
            out.append(r)
            print(f"B={B:3d} penalties={pen!s:5}  step {r['step_us']:9.1f} us   engine's own "
                  f"(outside kernel and forward) {r['own_us']:8.1f} us", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
