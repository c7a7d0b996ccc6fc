"""Why the llama.cpp backend keeps running sequences in adjacent KV slots: the real GGUF
(SmolLM2-135M Q4_1), one KV stream per slot, in-process.

    python benchmarks/bench_kv_slots.py [--quick] [--rounds 5] [--steps 40] [--threads 2]
        [--json benchmarks/results/kv_slots.json]

1. Decode step time, 4 sequences of 100 cached tokens each, by where they sit: slots
   0,1,2,3 (adjacent), 0,1,5,6 (two runs), 0,2,4,6 (spread), and one sequence alone.
   llama.cpp's micro-batch split takes only consecutive slot ids when each slot has its
   own stream, so each run of adjacent slots is its own pass over the weights.
2. What a whole-stream copy (``llama_memory_seq_cp`` across streams, how a cached prefix
   or a running sequence moves to another slot) costs next to recomputing prompt tokens,
   per context size: the copy moves every cell of the stream, used or not.

Cases are interleaved round by round (the box is 2 shared cores); medians, ms.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import gguf_args, print_table, rounds  # noqa: E402
from tep.backends.llamacpp_model import LlamaCppModel  # noqa: E402

LAYOUTS = {"alone": (0,), "adjacent": (0, 1, 2, 3), "two runs": (0, 1, 5, 6),
           "spread": (0, 2, 4, 6)}
PROMPT = 100


def _prefill(m: LlamaCppModel, slot: int, n: int) -> None:
    """Write ``n`` tokens into ``slot``'s stream (32-token pieces, as exact mode feeds)."""
    m._lib.llama_memory_seq_rm(m._mem, slot, 0, -1)
    tok = np.arange(100, 100 + n, dtype=np.int32)
    pos = np.arange(n, dtype=np.int32)
    for a in range(0, n, 32):
        b = min(n, a + 32)
        want = np.zeros(b - a, bool)
        want[-1] = True
        m._decode(tok[a:b], pos[a:b], np.full(b - a, slot, np.int32), want, 0, b - a)


def step_ms(m: LlamaCppModel, slots: tuple, steps: int) -> float:
    """Median ms of one decode step with one token for each of ``slots``."""
    for s in slots:
        _prefill(m, s, PROMPT)
    sl = np.array(slots, np.int32)
    k = len(slots)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        m._decode(np.full(k, 200, np.int32), np.full(k, PROMPT + i, np.int32), sl,
                  np.ones(k, bool), 0, k)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def copy_costs(path: Path, ctx: int, threads: int, reps: int) -> dict:
    """ms of a whole-stream copy (applied inside the next decode: measured as that decode
    minus a plain one) and ms per prompt token of a 100-token prefill."""
    m = LlamaCppModel(path, context_size=ctx, max_num_seqs=4, n_threads=threads)
    try:
        lib = m._lib
        t = time.perf_counter()
        _prefill(m, 0, PROMPT)
        prefill = (time.perf_counter() - t) / PROMPT * 1e3
        one = np.array([200], np.int32)
        plain, copied = [], []
        for _ in range(reps):
            for dst, out in ((0, plain), (1, copied)):
                if dst:
                    lib.llama_memory_seq_cp(m._mem, 0, dst, -1, -1)
                t = time.perf_counter()
                m._decode(one, np.array([PROMPT], np.int32), np.array([dst], np.int32),
                          np.ones(1, bool), 0, 1)
                out.append(time.perf_counter() - t)
                lib.llama_memory_seq_rm(m._mem, dst, PROMPT, -1)
        copy = max(0.0, statistics.median(copied) - statistics.median(plain)) * 1e3
        return {"context": m.context_size, "copy_ms": copy, "prefill_ms_per_token": prefill,
                "break_even_tokens": copy / prefill}
    finally:
        m.close()


def main() -> None:
    a = gguf_args(__doc__.split("\n\n")[0], rounds=5, steps=40, quick=(2, 15))
    path = a.model
    m = LlamaCppModel(path, context_size=512, max_num_seqs=8, n_threads=a.threads)
    try:
        res = rounds(list(LAYOUTS), a.rounds,
                     lambda r, c: {"ms": step_ms(m, LAYOUTS[c], a.steps)}, key="ms",
                     rotate=True)
    finally:
        m.close()
    base = res["adjacent"]["median"]
    rows = [(c, ",".join(map(str, LAYOUTS[c])), res[c]["median"], res[c]["median"] / base)
            for c in LAYOUTS]
    print_table(["layout", "slots", "ms/step", "÷ adjacent"], rows,
                "decode step, 4 sequences (alone: 1), median over rounds")
    copies = [copy_costs(path, ctx, a.threads, max(3, a.rounds)) for ctx in (512, 2048, 8192)]
    print()
    print_table(["context", "stream copy ms", "prefill ms/token", "break-even tokens"],
                [(c["context"], c["copy_ms"], c["prefill_ms_per_token"],
                  c["break_even_tokens"]) for c in copies],
                "whole-stream copy vs recomputing prompt tokens")
    if a.json:
        a.json.write_text(json.dumps({"step_ms": {c: res[c] for c in LAYOUTS},
                                      "copies": copies}, indent=1))


if __name__ == "__main__":
    main()
