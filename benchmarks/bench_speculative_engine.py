"""Speculative decoding in-process (no HTTP): tep's engine on the real GGUF, off vs ngram
(vs draft), the prompt kinds and sampling of bench_speculative.py, one process, 2 threads.

    python benchmarks/bench_speculative_engine.py [--modes off ngram] [--clients 1 4]
        [--temperatures 0 0.8] [--kinds copy edit free] [--max-tokens 128] [--rounds 3]
        [--json PATH]

Per case: N sequences submitted together (seeds = index), e2e tokens/s = generated
tokens / wall time, over --rounds interleaved rounds (the mode order rotates each round;
the ratio to the first mode is the median of the per-round ratios; each case's prompts
are computed once before its rounds, so every mode finds them in the prefix cache);
every mode's tokens are compared with off's (exact acceptance: they must be equal);
acceptance from the engine's counters; the share of the wall time inside llama_decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _harness import table  # noqa: E402
from bench_speculative import prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["off", "ngram"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.8])
    ap.add_argument("--kinds", nargs="+", default=["copy", "edit", "free"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds per case (the order rotates); ratios are medians")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from tep.backend import Sampling, StreamSink
    from tep.backends.llamacpp import default_model_path, load_model
    from tep.engine import Engine
    from tep.engine.chat_template import render_chat
    from tep.engine.speculative import SpecConfig

    # one engine per mode for the whole run, as a server would keep it: what an engine
    # learns (the step cost by tokens fed, acceptance by draft kind) carries from case to
    # case. The engines share one model (they run in turn; the model tracks what each
    # slot's cache holds): a second llama.cpp context would have its own spinning
    # threads on the same two cores, slowing whichever mode runs beside it.
    model = load_model(default_model_path(), context_size=1024, max_num_seqs=8,
                       n_threads=a.threads)
    engines = {m: Engine(model, max_num_seqs=8, max_batch_tokens=512,
                         speculative=None if m == "off" else
                         SpecConfig(mode=m, k=a.k, draft_model=None), sample_threads=1)
               for m in a.modes}

    def toks(kind: str, i: int) -> list[int]:
        text = render_chat(model.chat_template, [{"role": "user", "content": prompt(kind, i)}],
                           bos_token=model.bos_token, eos_token=model.eos_token)
        return model.tokenize(text, add_special=False)

    def submit(eng, kind: str, T: float, c: int, max_tokens: int) -> list:
        """Requests 0..c-1 of ``kind`` into ``eng`` (seed = index), run to the end; their
        sinks."""
        sinks = []
        for i in range(c):
            s = Sampling(max_tokens=max_tokens, temperature=T, seed=i)
            sinks.append(StreamSink(s))
            eng.add_request(toks(kind, i), s, sinks[-1], lambda e: None)
        eng.run_until_idle()
        return sinks

    def run_case(kind: str, T: float, c: int, mode: str) -> dict:
        eng = engines[mode]
        sp = eng.spec_stats
        d0, a0, r0 = (sum(sp.drafted.values()), sum(sp.accepted.values()),
                      sum(sp.runs.values()))
        steps0 = eng.stats.steps
        st0 = model.step_times()
        t0 = time.perf_counter()
        sinks = submit(eng, kind, T, c, a.max_tokens)
        wall = time.perf_counter() - t0
        st1 = model.step_times()
        ids = [k.result().token_ids for k in sinks]
        return {"ids": ids, "tps": sum(len(x) for x in ids) / wall,
                "drafted": sum(sp.drafted.values()) - d0,
                "accepted": sum(sp.accepted.values()) - a0,
                "runs": sum(sp.runs.values()) - r0, "steps": eng.stats.steps - steps0,
                "decode_share": (st1.decode_ns - st0.decode_ns) / 1e9 / wall}

    for m in a.modes:                     # warm-up (caches, threads, page faults)
        run_case("free", 0.0, 1, m)
    rows, out = [], []
    for kind in a.kinds:
        for T in a.temperatures:
            for c in a.clients:
                got: dict = {m: [] for m in a.modes}
                # the modes share the model: put the prompts in its prefix cache first, or
                # the first mode of round 1 computes them and the others reuse them
                submit(engines[a.modes[0]], kind, T, c, 1)
                for r in range(a.rounds):   # interleaved, the order rotating per round
                    order = a.modes[r % len(a.modes):] + a.modes[:r % len(a.modes)]
                    for mode in order:
                        got[mode].append(run_case(kind, T, c, mode))
                base = got[a.modes[0]]
                for mode in a.modes:
                    xs = got[mode]
                    tps = statistics.median(x["tps"] for x in xs)
                    per_round = [x["tps"] / b["tps"] for x, b in zip(xs, base)]
                    d = sum(x["drafted"] for x in xs)
                    acc = sum(x["accepted"] for x in xs)
                    runs = sum(x["runs"] for x in xs)
                    same = all(x["ids"] == base[0]["ids"] for x in xs)
                    ratio = statistics.median(per_round)
                    rows.append((kind, T, c, mode, tps, ratio,
                                 " ".join(f"{v:.2f}" for v in per_round),
                                 d and acc / d, runs and acc / runs, xs[0]["steps"],
                                 xs[0]["decode_share"], same))
                    out.append({"kind": kind, "temperature": T, "clients": c, "mode": mode,
                                "tokens_per_s": tps, "vs_off": ratio,
                                "vs_off_per_round": per_round, "drafted": d, "accepted": acc,
                                "runs": runs, "steps": xs[0]["steps"],
                                "decode_share": xs[0]["decode_share"],
                                "same_tokens_as_off": same})
                    print(rows[-1], flush=True)
    print(table(("kind", "T", "N", "mode", "tok/s", "x off (median)", "each round", "accept",
                 "acc/run", "steps", "in decode", "same"), rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
