"""What exact mode costs: prefix-cache hit rate, time to first token and decode time of
tep's llama.cpp model, in one run, five ways:

  old     f16 KV cache, exact=False: whole chunks to llama.cpp (its tiled / KV-split
          attention kernels may run), prefix cache on
  exact   the default: f16 KV cache, exact=True, llama.cpp's reference CPU kernels
          (only the per-row attention kernel), each step fed as it comes, prefix cache on
  rules   f16 KV cache, exact=True fed by its rules instead of the reference kernels
          (pieces of ``block_tokens``, a lone token past 255 fed with the one before it)
  off     f16 KV cache, exact=True, prefix cache off
  q8_0    8-bit KV cache (only the per-row kernel exists), exact=True, each step fed
          as it comes, prefix cache on

    python benchmarks/bench_determinism.py [--threads 1] [--rounds 2] [--model PATH]
        [--json benchmarks/results/determinism.json]

Workload, one request at a time through the engine (greedy): four chats of three turns
each, every turn resent with the previous answer and a new question (what a chat client
does), then three questions about one ~400-token document. Per way: hit rate = reused
prompt tokens / prompt tokens; TTFT = median time from submit to first token; long-decode
= median time per generated token of the document questions (past position 255, where
exact mode's feeding rules feed each token with the one before it). The ways run
interleaved per round, each on its own model, so load on the machine hits all of them
alike. Also checks the
evidence: the old way's logits after a prefix hit differ from its cold run's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tep.backend import Sampling, StreamSink
from tep.backends.llamacpp import default_model_path, load_model
from tep.engine.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402
from _report import write_result  # noqa: E402

QUESTIONS = [["What is 12 times 7?", "And 13 times 7?", "And 14 times 7?"],
             ["Name a famous painter.", "What did they paint?", "When?"],
             ["Translate 'good morning' into French.", "And into Spanish?", "And German?"],
             ["Why is the sky blue?", "Why are sunsets red?", "Is it the same on Mars?"]]
DOC = " ".join(f"Shelf {i} holds {i * 3 % 11} blue boxes and {i % 5} red jars." for i in range(28))
DOC_QS = ["How many red jars are on shelf 4?", "Which shelf holds the most blue boxes?",
          "Summarise the inventory."]


def _run(model, prompt, max_tokens):
    """One request alone: (token ids, TTFT s, seconds per later token)."""
    eng = Engine(model, max_num_seqs=model.max_num_seqs, max_batch_tokens=512,
                 sample_threads=1)
    times = []
    s = Sampling(max_tokens=max_tokens, temperature=0.0)
    sink = StreamSink(s, on_delta=lambda text, lps: times.append(time.perf_counter()))
    t0 = time.perf_counter()
    eng.add_request(prompt, s, sink, lambda exc: None)
    eng.run_until_idle()
    toks = list(sink.result().token_ids)
    ttft = times[0] - t0 if times else float("nan")
    per = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return toks, ttft, per


def _workload(model):
    from tep.engine.chat_template import render_chat

    def ids(msgs):
        return model.tokenize(render_chat(model.chat_template, msgs, bos_token=model.bos_token,
                                          eos_token=model.eos_token), add_special=False)

    ttfts, per_tok = [], []
    for conv in QUESTIONS:
        msgs = []
        for q in conv:
            msgs.append({"role": "user", "content": q})
            toks, ttft, _ = _run(model, ids(msgs), 16)
            ttfts.append(ttft)
            msgs.append({"role": "assistant",
                         "content": model.detokenize(toks).decode("utf-8", "replace")})
    for q in DOC_QS:
        _, ttft, per = _run(model, ids([{"role": "user", "content": DOC + "\n\n" + q}]), 24)
        ttfts.append(ttft)
        per_tok.append(per)
    return ttfts, per_tok


def _evidence(model) -> bool:
    """After a prefix hit, are the logits the cold run's? (False = the issue.)"""
    from tep.engine.model import StepBatch

    def last(m, sid, toks, p0):
        n = len(toks)
        return m.forward(StepBatch(np.array(toks, np.int32), np.arange(p0, p0 + n, dtype=np.int32),
                                   np.full(n, sid, np.int32),
                                   np.array([False] * (n - 1) + [True]))).copy()[0]

    p = model.tokenize(DOC)[:100]                     # 100 tokens in one call
    q = p[:40] + model.tokenize(" something else entirely", add_special=False)
    last(model, 1, p, 0)
    model.release(1)
    n = model.reuse_prefix(2, q)                      # q's first 40 tokens from p's slot
    assert n == 40, n
    warm = last(model, 2, q[n:], n)
    model.release(2)
    cold = last(model, 0, q, 0)                       # a wiped slot (not the one just used)
    model.release(0)
    return bool(np.array_equal(cold, warm))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    path = a.model or default_model_path()
    ways = {"old": dict(exact=False, kv_type="f16"), "exact": dict(exact=True, kv_type="f16"),
            "rules": dict(exact=True, kv_type="f16", reference_kernels=False),
            "off": dict(exact=True, prefix_cache=False, kv_type="f16"),
            "q8_0": dict(exact=True, kv_type="q8_0")}
    models = {k: load_model(path, context_size=1024, max_num_seqs=4, n_threads=a.threads, **kw)
              for k, kw in ways.items()}
    res = {k: ([], []) for k in ways}
    for m in models.values():   # page the weights in for every model before timing
        _run(m, m.tokenize("Hello there."), 2)
    for _ in range(a.rounds):
        for k, m in models.items():
            t, d = _workload(m)
            res[k][0].extend(t)
            res[k][1].extend(d)
    print(f"threads={a.threads} rounds={a.rounds} (same run, ways interleaved)")
    base = statistics.median(res["old"][0])
    base_d = statistics.median(res["old"][1])
    rows = []
    for k, m in models.items():
        st = m.prefix_cache_stats()
        ttft, dec = statistics.median(res[k][0]), statistics.median(res[k][1])
        print(f"{k:6s} hit rate {st.hit_rate:6.1%}  TTFT median {ttft * 1e3:8.1f} ms "
              f"({ttft / base:5.2f}x old)  long-decode {dec * 1e3:6.1f} ms/token "
              f"({dec / base_d:5.2f}x old)")
        rows.append({"way": k, "settings": {kk: str(v) for kk, v in ways[k].items()},
                     "reference_kernels": m.reference_kernels, "hit_rate": st.hit_rate,
                     "ttft_s": ttft, "long_decode_s_per_token": dec,
                     "ttft_vs_old": ttft / base, "long_decode_vs_old": dec / base_d})
    evidence = {}
    for k in ("old", "exact", "rules", "q8_0"):
        evidence[k] = _evidence(models[k])
        print(f"{k} way, logits after a 40-token prefix hit equal the cold run's:",
              evidence[k])
    for m in models.values():
        m.close()
    write_result(a.json, {"bench": "determinism", "machine": describe(), "rows": rows,
                          "prefix_hit_equals_cold": evidence,
                          "settings": {"threads": a.threads, "rounds": a.rounds,
                                       "model": str(path)}})


if __name__ == "__main__":
    main()
