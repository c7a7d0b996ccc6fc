"""Speculative decoding in-process (no HTTP): tep's engine on the real GGUF, off vs ngram
(vs draft), the prompt kinds and sampling of bench_speculative.py, one process, 2 threads.

    python benchmarks/bench_speculative_engine.py [--modes off ngram] [--clients 1 4]
        [--temperatures 0 0.8] [--kinds copy edit free] [--max-tokens 128] [--json PATH]

Per case: N sequences submitted together (seeds = index), e2e tokens/s = generated
tokens / wall time; every mode's tokens are compared with off's (exact acceptance: they
must be equal); acceptance from the engine's counters; the share of the wall time inside
llama_decode.
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from tep.backend import Sampling, StreamSink
    from tep.backends.llamacpp import default_model_path, load_model
    from tep.engine import Engine
    from tep.engine.chat_template import render_chat
    from tep.engine.speculative import SpecConfig

    model = load_model(default_model_path(), context_size=1024, max_num_seqs=8,
                       n_threads=a.threads)

    def toks(kind: str, i: int) -> list[int]:
        text = render_chat(model.chat_template, [{"role": "user", "content": prompt(kind, i)}],
                           bos_token=model.bos_token, eos_token=model.eos_token)
        return model.tokenize(text, add_special=False)

    rows, out = [], []
    for kind in a.kinds:
        for T in a.temperatures:
            for c in a.clients:
                base = None
                for mode in a.modes:
                    spec = None if mode == "off" else SpecConfig(mode=mode, k=a.k,
                                                                   draft_model=None)
                    eng = Engine(model, max_num_seqs=8, max_batch_tokens=512, speculative=spec,
                                 sample_threads=1)
                    sinks = []
                    st0 = model.step_times()
                    t0 = time.perf_counter()
                    for i in range(c):
                        s = Sampling(max_tokens=a.max_tokens, temperature=T, seed=i)
                        k = StreamSink(s)
                        sinks.append(k)
                        eng.add_request(toks(kind, i), s, k, lambda e: None)
                    eng.run_until_idle()
                    wall = time.perf_counter() - t0
                    st1 = model.step_times()
                    ids = [k.result().token_ids for k in sinks]
                    n = sum(len(x) for x in ids)
                    sp = eng.spec_stats
                    d, acc, runs = (sum(sp.drafted.values()), sum(sp.accepted.values()),
                                    sum(sp.runs.values()))
                    tps = n / wall
                    if mode == "off":
                        base = (tps, ids)
                    ratio = tps / base[0] if base else None
                    same = ids == base[1] if base else None
                    dec = (st1.decode_ns - st0.decode_ns) / 1e9 / wall
                    rows.append((kind, T, c, mode, tps, ratio, d and acc / d, runs and acc / runs,
                                 eng.stats.steps, dec, same))
                    out.append({"kind": kind, "temperature": T, "clients": c, "mode": mode,
                                "tokens": n, "tokens_per_s": tps, "vs_off": ratio,
                                "drafted": d, "accepted": acc, "runs": runs,
                                "steps": eng.stats.steps, "decode_share": dec,
                                "same_tokens_as_off": same})
                    print(rows[-1], flush=True)
    print(table(("kind", "T", "N", "mode", "tok/s", "x off", "accept", "acc/run", "steps",
                 "in decode", "same"), rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
