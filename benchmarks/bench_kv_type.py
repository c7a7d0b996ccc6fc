"""What exact mode costs by KV cache type: the real GGUF (SmolLM2-135M Q4_1), in-process.

    python benchmarks/bench_kv_type.py [--rounds 3] [--steps 12] [--threads 2]
        [--json benchmarks/results/kv_type.json]

Four ways to run the llama.cpp backend: ``q8_0`` (an 8-bit KV cache, for which
llama.cpp has only its per-row attention kernel, so exact mode feeds every step as it
comes), ``f16 exact`` (the default: an f16 cache, llama.cpp's reference CPU kernels so
that only the per-row kernel runs, each step fed as it comes), ``f16 rules`` (an f16
cache fed by exact mode's rules instead: pieces, and a lone token past position 254 given
the token before it again, to keep the tiled and KV-split kernels from running) and
``f16 plain`` (``exact=False``: what llama-server does; logits depend on batching).
Measured through ``forward``: decode ms per step with 1 and 4 sequences at positions
~150, ~300 and ~500, and one 256-token prompt in one call.

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
from tep.engine.model import StepBatch  # noqa: E402

WAYS = {"q8_0": {"kv_type": "q8_0"}, "f16 exact": {"kv_type": "f16"},
        "f16 rules": {"kv_type": "f16", "reference_kernels": False},
        "f16 plain": {"kv_type": "f16", "exact": False}}
POINTS = [(n, p) for p in (150, 300, 500) for n in (1, 4)]   # (sequences, position)
HELD = 600
TEXT = ("The quick brown fox jumps over the lazy dog. Then it ran into the forest and "
        "found a small house. ") * 40


def _feed(m: LlamaCppModel, seq: int, toks: list[int], p0: int, chunk: int) -> None:
    for a in range(0, len(toks), chunk):
        b = min(len(toks), a + chunk)
        want = np.zeros(b - a, bool)
        want[-1] = True
        m.forward(StepBatch(np.asarray(toks[a:b], np.int32),
                            np.arange(p0 + a, p0 + b, dtype=np.int32),
                            np.full(b - a, seq, np.int32), want))


def _hold(m: LlamaCppModel, seq: int, toks: list[int], n: int) -> None:
    """Make ``seq``'s slot hold exactly the first ``n`` tokens."""
    if m._slots.slot_of(seq) is None:
        m.reuse_prefix(seq, [])
    held = len(m._slots.tokens(m._slots.slot_of(seq)))
    if held < n:
        _feed(m, seq, toks[held:n], held, 32)
    m.rewind(seq, n)


def decode_ms(m: LlamaCppModel, toks: list[int], n_seqs: int, pos: int, steps: int) -> float:
    for s in range(n_seqs):
        _hold(m, s, toks, pos)
    times = []
    for p in range(pos, pos + steps):
        batch = StepBatch(np.full(n_seqs, toks[p], np.int32), np.full(n_seqs, p, np.int32),
                          np.arange(n_seqs, dtype=np.int32), np.ones(n_seqs, bool))
        t = time.perf_counter()
        m.forward(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def prefill_ms(m: LlamaCppModel, toks: list[int]) -> float:
    _hold(m, 3, toks, 0)
    t = time.perf_counter()
    _feed(m, 3, toks[:256], 0, 256)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    a = gguf_args(__doc__.split("\n\n")[0], rounds=3, steps=12)
    path = a.model
    models = {w: LlamaCppModel(path, context_size=1024, max_num_seqs=4, n_threads=a.threads,
                               max_batch_tokens=512, **kw) for w, kw in WAYS.items()}
    try:
        toks = models["q8_0"].tokenize(TEXT, add_special=True)[:HELD + a.steps]
        if len(toks) < HELD + a.steps:
            sys.exit("the benchmark text is too short for the positions measured")
        cases = [f"{w} | {n} seq @{p}" for w in WAYS for n, p in POINTS] + \
                [f"{w} | prefill 256" for w in WAYS]

        def run(_r: int, case: str) -> dict:
            w, what = case.split(" | ")
            m = models[w]
            if what.startswith("prefill"):
                return {"ms": prefill_ms(m, toks)}
            n, p = what.split(" seq @")
            return {"ms": decode_ms(m, toks, int(n), int(p), a.steps)}

        res = rounds(cases, a.rounds, run, key="ms", rotate=True)
    finally:
        for m in models.values():
            m.close()
    what = [f"{n} seq @{p}" for n, p in POINTS] + ["prefill 256"]
    rows = []
    for x in what:
        ms = {w: res[f"{w} | {x}"]["median"] for w in WAYS}
        rows.append((x, *[ms[w] for w in WAYS],
                     *[ms[w] / ms["f16 plain"] for w in WAYS if w != "f16 plain"]))
    print_table(["step", *[f"{w} ms" for w in WAYS],
                 *[f"{w} ÷ f16 plain" for w in WAYS if w != "f16 plain"]],
                rows, f"forward ms, median of {a.rounds} interleaved rounds, {a.threads} threads")
    if a.json:
        a.json.write_text(json.dumps({"threads": a.threads, "rounds": a.rounds,
                                      "steps": a.steps, "ms": res}, indent=1))


if __name__ == "__main__":
    main()
