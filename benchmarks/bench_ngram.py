"""The n-gram drafter's cost per sequence per decode step: the plain-Python lookup it
replaced next to the compiled index, called per sequence and batched.

    python benchmarks/bench_ngram.py [--batch 1 8 64] [--streams copy random] [--steps 200]
                                     [--k 4] [--repeats 9] [--json benchmarks/results/ngram.json]

Per (B, stream): B sequences, each admitted with a 300-token prompt (random ids of
SmolLM2's vocabulary, 49152), then ``--steps`` decode steps. A step is what the engine asks
of the drafter: append each sequence's new token (``extend``, one token) and look up up to
k drafts for every sequence. Streams:
  copy    the output copies the prompt from a random offset, one token in 40 changed:
          the last 3 tokens nearly always recur and a long match exists (drafts every step);
  random  fresh random ids: almost nothing recurs (the lookup finds no draft).
Sides:
  python     the dict-indexed Python lookup (tests/support/ngram_reference.PyNgramDrafter,
             the implementation before the compiled index), one propose per sequence;
  compiled   NgramDrafter (tep/_kernels/ngram.pyx), one propose per sequence (how the
             engine calls it today);
  batched    NgramDrafter.propose_many: one call per step for all B sequences.
Every repeat admits fresh sequences (untimed) and times the steps; the sides run in turn
within each repeat (interleaved, so load drift hits all alike); reported: the median over
repeats of µs per sequence per step, and python / side.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _harness import print_table  # noqa: E402
from _machine import describe  # noqa: E402
from _report import write_result  # noqa: E402
from support.ngram_reference import PyNgramDrafter  # noqa: E402
from tep.engine.speculative import NgramDrafter  # noqa: E402

VOCAB = 49152
PROMPT = 300
SIDES = ("python", "compiled", "batched")


def streams(kind: str, B: int, steps: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts [B][PROMPT], outputs [B][steps]) for one stream kind."""
    rng = np.random.default_rng(seed)
    prompts, outs = [], []
    for _ in range(B):
        p = rng.integers(0, VOCAB, PROMPT)
        if kind == "copy":
            start = int(rng.integers(0, PROMPT // 2))
            o = np.resize(p[start:], steps)
            edit = rng.random(steps) < 1 / 40
            o[edit] = rng.integers(0, VOCAB, int(edit.sum()))
        else:
            o = rng.integers(0, VOCAB, steps)
        prompts.append(p.tolist())
        outs.append(o.tolist())
    return prompts, outs


def run_side(side: str, prompts: list, outs: list, k: int) -> tuple[float, int]:
    """(seconds for all steps, drafts proposed) for one side on fresh sequences."""
    B, steps = len(prompts), len(outs[0])
    d = PyNgramDrafter(B) if side == "python" else NgramDrafter(B)
    for s in range(B):
        d.admit(s, prompts[s])
    want = {s: k for s in range(B)}
    drafted = 0
    t0 = time.perf_counter()
    if side == "batched":
        for j in range(steps):
            for s in range(B):
                d.extend(s, (outs[s][j],))
            drafted += sum(len(t) for t in d.propose_many(want).values())
    else:
        for j in range(steps):
            for s in range(B):
                d.extend(s, (outs[s][j],))
            for s in range(B):
                drafted += len(d.propose(s, k))
    dt = time.perf_counter() - t0
    for s in range(B):
        d.release(s)
    return dt, drafted


def measure(B: int, kind: str, steps: int, k: int, repeats: int) -> dict:
    prompts, outs = streams(kind, B, steps, seed=B)
    per: dict[str, list[float]] = {s: [] for s in SIDES}
    drafted = {}
    for _ in range(repeats):
        for side in SIDES:
            dt, n = run_side(side, prompts, outs, k)
            per[side].append(dt / (steps * B) * 1e6)
            drafted[side] = n
    assert len(set(drafted.values())) == 1, f"the sides disagree: {drafted}"
    us = {s: statistics.median(v) for s, v in per.items()}
    return {"B": B, "stream": kind, "steps": steps, "k": k, "repeats": repeats,
            "us_per_seq_step": us, "us_min": {s: min(v) for s, v in per.items()},
            "drafts_per_seq_step": drafted["python"] / (steps * B),
            "speedup": {s: us["python"] / us[s] for s in SIDES if s != "python"}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--streams", nargs="+", default=["copy", "random"],
                    choices=["copy", "random"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "ngram.json")
    a = ap.parse_args(argv)
    machine = describe()
    rows = []
    for kind in a.streams:
        for B in a.batch:
            r = measure(B, kind, a.steps, a.k, a.repeats)
            rows.append(r)
            us = r["us_per_seq_step"]
            print(f"{kind:6s} B={B:3d}  " + "  ".join(f"{s} {us[s]:7.2f} us" for s in SIDES),
                  flush=True)
    print()
    print_table(["stream", "B", "drafts/seq/step", "python µs", "compiled µs", "batched µs",
                 "python/compiled", "python/batched"],
                [[r["stream"], r["B"], r["drafts_per_seq_step"],
                  r["us_per_seq_step"]["python"], r["us_per_seq_step"]["compiled"],
                  r["us_per_seq_step"]["batched"], r["speedup"]["compiled"],
                  r["speedup"]["batched"]] for r in rows],
                title=f"n-gram drafter, µs per sequence per step (extend 1 token + propose "
                      f"k={a.k}; {a.steps} steps after a {PROMPT}-token prompt; median of "
                      f"{a.repeats} interleaved repeats)")
    return write_result(a.json, {"benchmark": "ngram", "machine": machine,
                                 "args": {k: str(v) for k, v in vars(a).items()},
                                 "rows": rows})


if __name__ == "__main__":
    main()
