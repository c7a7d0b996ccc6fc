"""Prefix-aware routing on Ray Serve vs Ray's default router (issue 21), in one run.

Workload: U users x T turns of chat (default 32 x 6); each turn resends the whole history
plus one user message and streams the answer; W users talk at once (a pool of W client
threads, each taking the next user when one is done). Deployments, one after the other
on one local Ray:

- the real model (SmolLM2-135M GGUF, tep's llama.cpp backend, 1 thread per replica) on 2
  replicas with ``router="prefix"`` and ``router="default"`` (Ray's power of two
  choices, same ingress + replicas shape), and on 1 replica (the single-replica hit rate);
- the toy engine in instant mode (no model compute, prefix cache of 64 sequences) on
  4 and 8 replicas, both routers, and 1 replica.

Per deployment: prefix-cache hit rate (prompt tokens reused / prompt tokens, summed over
the replicas' engine counters at the ingress's /metrics), TTFT p50/p99 (client side, to
the first content chunk), aggregate completion tokens/s, and the router's time per
routed call (``choose_replicas``; plus the ingress's route-key hashing, timed here
in-process on this workload's keys). Also the llama.cpp prefill cost per token (direct,
no server), for the model in docs/SCALING.md.

    python benchmarks/bench_routing.py                 # everything (~10 min on 2 cores)
    python benchmarks/bench_routing.py --quick         # 16 users x 4 turns, fewer configs
    python benchmarks/bench_routing.py --only toy      # or --only llm

Writes results/routing.json and results/routing.png (matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import describe  # noqa: E402
from tep.obs.metrics import sample_values  # noqa: E402
from _harness import metrics_text, pct, wait_ready  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def _question(u: int, t: int) -> dict:
    """User ``u``'s message of turn ``t``."""
    return {"role": "user", "content": f"I am user {u}. Question {t}: what is {u + 3 * t} "
                                       f"plus {7 * t + 1}?"}


def _histories(users: int, turns: int) -> list[list[dict]]:
    """Every request's messages in this workload, in order (answers stand in as 40
    characters), for the in-process router timings."""
    convs = []
    for u in range(users):
        msgs = [{"role": "system", "content": SYSTEM}]
        for t in range(turns):
            msgs = msgs + [_question(u, t)]
            convs.append(msgs)
            msgs = msgs + [{"role": "assistant", "content": "x" * 40}]
    return convs


def _replica_totals(url: str) -> tuple[float, float, int]:
    text = metrics_text(url)
    hit = sample_values(text, "tep_replica_prefix_cache_hit_tokens_total")
    miss = sample_values(text, "tep_replica_prefix_cache_miss_tokens_total")
    return sum(hit.values()), sum(miss.values()), len(hit)


def _router_cost(url: str) -> tuple[float, float]:
    text = metrics_text(url)
    s = sum(sample_values(text, "tep_router_route_seconds_total").values())
    n = sum(sample_values(text, "tep_router_routed_total").values())
    return s, n


def run_workload(url: str, model: str, users: int, turns: int, workers: int,
                 max_tokens: int, think_s: float = 0.0) -> dict:
    """The chat workload; TTFTs, tokens, wall time and the replica of every turn."""
    ttft: list[float] = []
    tokens = [0]
    per_turn_prompt = [[] for _ in range(turns)]
    per_turn_answer = [[] for _ in range(turns)]
    lock = threading.Lock()
    stick = [0, 0]

    def user(u: int) -> None:
        msgs = [{"role": "system", "content": SYSTEM}]
        first = None
        rnd = random.Random(u)
        with httpx.Client(base_url=url, timeout=300) as cl:
            for t in range(turns):
                if t and think_s:
                    time.sleep(rnd.uniform(0, think_s))   # the user reads, then types
                msgs.append(_question(u, t))
                body = {"model": model, "messages": msgs, "max_tokens": max_tokens,
                        "seed": u * 100 + t, "temperature": 0.7, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                t_first = None
                text, n, p = [], 0, 0
                with cl.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    name = r.headers.get("x-tep-replica")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if ev.get("choices"):
                            piece = ev["choices"][0]["delta"].get("content")
                            if piece:
                                if t_first is None:
                                    t_first = time.perf_counter() - t0
                                text.append(piece)
                        elif ev.get("usage"):
                            n = ev["usage"]["completion_tokens"]
                            p = ev["usage"]["prompt_tokens"]
                msgs.append({"role": "assistant", "content": "".join(text)})
                with lock:
                    if t_first is not None:
                        ttft.append(t_first)
                    tokens[0] += n
                    per_turn_prompt[t].append(p)
                    per_turn_answer[t].append(n)
                    if first is None:
                        first = name
                    else:
                        stick[1] += 1
                        stick[0] += name == first

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(user, u) for u in range(users)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "requests": users * turns, "same_replica_share": stick[0] / max(stick[1], 1),
            "turn_prompt_tokens": [statistics.mean(x) for x in per_turn_prompt],
            "turn_answer_tokens": [statistics.mean(x) for x in per_turn_answer]}


def deploy_and_run(serve, port: int, backend: str, options: dict, n: int, router: str,
                   args: argparse.Namespace, model: str | None, max_tokens: int) -> dict:
    import tep.server.ray

    app = tep.server.ray.app(backend, router=router, num_replicas=n,
                             backend_options=options, routing_stats_period_s=0.5,
                             ray_actor_options={"num_cpus": 0}, name="tep")
    t0 = time.perf_counter()
    serve.run(app, name="tep", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=300.0)
    start_s = time.perf_counter() - t0
    model = model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    res = run_workload(url, model, args.users, args.turns, args.workers, max_tokens,
                       args.think_ms / 1e3)
    # the replicas' counters reach the ingress every 0.5 s: wait until they settle
    last = None
    for _ in range(40):
        time.sleep(0.75)
        cur = _replica_totals(url)
        if cur == last and cur[2] == n:
            break
        last = cur
    hit, miss, _ = cur
    route_s, routed = _router_cost(url)
    res.update(replicas=n, router=router, hit_rate=hit / (hit + miss) if hit + miss else 0.0,
               prompt_tokens=hit + miss, reused_tokens=hit, start_s=start_s,
               route_us_per_call=1e6 * route_s / routed if routed else None)
    serve.delete("tep")
    print(f"  {backend.split(':')[-1]:<22} n={n} {router:<8} hit {res['hit_rate']:.3f}  "
          f"TTFT p50 {res['ttft_p50_ms']:.1f} ms p99 {res['ttft_p99_ms']:.1f} ms  "
          f"{res['tokens_per_s']:.1f} tok/s  route {res['route_us_per_call'] or 0:.0f} us",
          flush=True)
    return res


def key_hash_cost(users: int, turns: int) -> dict:
    """Route-key bytes + hash chain + table match/insert at 8 replicas, per request (us
    of CPU), on this workload's chat histories (answers stand in as 40 characters)."""
    from tep.server.ray.prefix_table import PrefixTable, RouteKey, chat_key_bytes

    convs = _histories(users, turns)
    reps = [f"r{i}" for i in range(8)]
    table = PrefixTable()
    t0 = time.thread_time()
    for i, m in enumerate(convs):
        k = RouteKey.of(chat_key_bytes("m", m))
        best, _ = table.match(k.chain, reps)
        table.insert(best[0] if best else reps[i % 8], k.chain)
    per = (time.thread_time() - t0) / len(convs)
    return {"key_hash_match_insert_us": 1e6 * per, "mean_key_blocks":
            statistics.mean(len(RouteKey.of(chat_key_bytes("m", m)).chain) for m in convs)}


def router_microbench(users: int, turns: int, n: int = 8) -> dict:
    """CPU time of one ``PrefixRouter.choose_replicas`` + ``on_request_routed`` over ``n``
    replicas, in-process on this workload's keys (stand-in replicas, no Ray cluster)."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentID, ReplicaID

    from tep.server.ray.prefix_table import RouteKey, chat_key_bytes
    from tep.server.ray.route_state import RouteTicket
    from tep.server.ray.router import PrefixRouter

    dep = DeploymentID(name="m", app_name="a")
    reps = [SimpleNamespace(replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=dep))
            for i in range(n)]
    router = object.__new__(PrefixRouter)   # the routing logic alone, no Ray state
    router.initialize_state()
    keys = [RouteKey.of(chat_key_bytes("m", m)) for m in _histories(users, turns)]

    async def go() -> float:
        cpu = 0.0
        for k in keys:
            pr = SimpleNamespace(kwargs={"route": RouteTicket(k)})
            t0 = time.thread_time()
            ranks = await router.choose_replicas(reps, pr)
            router.on_request_routed(pr, ranks[0][0].replica_id, None)
            cpu += time.thread_time() - t0
        return cpu

    asyncio.run(go())                     # warm: fills the table
    router.initialize_state()
    cpu = asyncio.run(go())
    return {"choose_and_record_us": 1e6 * cpu / len(keys), "replicas": n,
            "by_prefix_share": router.counters.by_prefix / len(keys)}


def prefill_cost(n_threads: int = 1) -> dict:
    """llama.cpp prefill seconds per prompt token (SmolLM2, direct engine, 1 token out)."""
    from tep.backend import Sampling, StreamSink
    from tep.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(n_threads=n_threads, context_size=1024, max_num_seqs=2)
    try:
        def once(n: int, salt: int) -> float:
            ids = [(salt * 7919 + i * 31) % 20000 + 100 for i in range(n)]
            s = Sampling(max_tokens=1, temperature=0.0)
            t0 = time.perf_counter()
            be.generate_stream_from_tokens(be.list_models()[0], ids, s,
                                           StreamSink(s, prompt_tokens=n))
            return time.perf_counter() - t0

        once(32, 0)
        small = min(once(32, k) for k in range(1, 4))
        large = min(once(480, k) for k in range(4, 7))
    finally:
        be.close()
    return {"prefill_s_per_token": (large - small) / (480 - 32), "fixed_s": small,
            "n_threads": n_threads}


def shared_prefix_tokens(backend: str, options: dict) -> int:
    """Prompt tokens two users' first turns share (the rendered system turn)."""
    from tep.server.ray.replica import build_backend

    be = build_backend(backend, dict(options))
    try:
        a, b = ([{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": f"I am user {u}. Question 0: what is 1?"}]
                for u in (1, 2))
        x, y = be.chat_prompt_ids(a), be.chat_prompt_ids(b)
    finally:
        close = getattr(be, "close", None)
        if close:
            close()
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def paper_model(L: list[float], A: list[float], S: int, n: int) -> dict:
    """Expected reused prompt tokens per turn for this workload (docs/SCALING.md).

    With affinity every turn k > 1 reuses what its replica fed for turn k-1 (prompt and
    answer but its last token): ``h_k = L_{k-1} + A_{k-1} - 1``; turn 1 reuses the shared
    system turn ``S``. A prompt-blind router puts each turn on one of ``n`` replicas at
    random: turn k finds the conversation up to turn j < k (the latest turn its replica
    served) with probability ``(1/n)(1-1/n)^(k-1-j)``, else only ``S``."""
    T = len(L)
    aff = [float(S)] + [L[k - 1] + A[k - 1] - 1 for k in range(1, T)]
    blind = []
    q = 1.0 / n
    for k in range(T):
        e = (1 - q) ** k * S
        for j in range(k):
            e += q * (1 - q) ** (k - 1 - j) * aff[j + 1]
        blind.append(e)
    total = sum(L)
    return {"hit_rate_affinity": sum(aff) / total, "hit_rate_blind": sum(blind) / total,
            "saved_tokens_per_request": (sum(aff) - sum(blind)) / T}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["toy", "llm"])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="a pause of up to this many ms before each later turn (a user "
                         "reading); 0: the next turn is sent at once")
    ap.add_argument("--no-single", action="store_true",
                    help="skip the single-replica runs")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "routing.json")
    args = ap.parse_args()
    if args.quick:
        args.users, args.turns = 16, 4
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    port = 8765
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT),
                                       "RAY_USAGE_STATS_ENABLED": "0"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    out: dict = {"machine": describe(), "users": args.users, "turns": args.turns,
                 "workers": args.workers, "think_ms": args.think_ms, "runs": []}
    print(f"bench_routing: {args.users} users x {args.turns} turns, {args.workers} at once "
          f"(2 shared cores: small runs, ratios from this run only)", flush=True)
    try:
        if args.only in (None, "llm"):
            out["shared_prefix_tokens"] = {"smollm2": shared_prefix_tokens(
                "llamacpp", {"n_threads": 1, "context_size": 1024, "max_num_seqs": 2})}
            out["prefill"] = prefill_cost()
            print(f"  llama.cpp prefill {1e3 * out['prefill']['prefill_s_per_token']:.3f} "
                  f"ms/token (1 thread)", flush=True)
            opts = {"n_threads": 1, "context_size": 1024, "max_num_seqs": 8}
            for n, router in [(1, "prefix"), (2, "default"), (2, "prefix")][
                    1 if args.no_single else 0:]:
                r = deploy_and_run(serve, port, "llamacpp", opts, n, router, args,
                                   None, max_tokens=16)
                out["runs"].append({"model": "smollm2", **r})
        if args.only in (None, "toy"):
            opts = {"instant": True, "prefix_cache": 64, "max_num_seqs": 16}
            out.setdefault("shared_prefix_tokens", {})["toy-instant"] = \
                shared_prefix_tokens("toy", opts)
            grid = [(1, "prefix"), (4, "default"), (4, "prefix"), (8, "default"),
                    (8, "prefix")]
            if args.quick:
                grid = [(1, "prefix"), (8, "default"), (8, "prefix")]
            for n, router in grid:
                r = deploy_and_run(serve, port, "toy", opts, n, router, args, "tep-toy",
                                   max_tokens=16)
                out["runs"].append({"model": "toy-instant", **r})
    finally:
        serve.shutdown()
        ray.shutdown()
    out["key_cost"] = key_hash_cost(args.users, args.turns)
    out["router_cpu"] = router_microbench(args.users, args.turns)
    model_vs_measured(out)
    report(out)
    write_result(args.json, out)
    plot(out, args.json.with_suffix(".png"))


def _find(out: dict, model: str, n: int, router: str) -> dict | None:
    for r in out["runs"]:
        if r["model"] == model and r["replicas"] == n and r["router"] == router:
            return r
    return None


def model_vs_measured(out: dict) -> None:
    """The paper model's hit rates (and TTFT saving, with the measured prefill cost) for
    each run's N, from the single-replica run's per-turn token counts."""
    rows = []
    for model in ("smollm2", "toy-instant"):
        single = _find(out, model, 1, "prefix")
        if single is None:
            continue
        S = out["shared_prefix_tokens"][model]
        L, A = single["turn_prompt_tokens"], single["turn_answer_tokens"]
        c = out.get("prefill", {}).get("prefill_s_per_token") if model == "smollm2" else None
        for n in range(1, 9):
            m = paper_model(L, A, S, n)
            row = {"model": model, "replicas": n, **m}
            if c is not None:
                row["ttft_saving_ms"] = 1e3 * c * m["saved_tokens_per_request"]
            for router, key in (("prefix", "measured_hit_prefix"),
                                ("default", "measured_hit_default")):
                r = _find(out, model, n, router)
                if r is not None:
                    row[key] = r["hit_rate"]
            p, d = _find(out, model, n, "prefix"), _find(out, model, n, "default")
            if p is not None and d is not None:
                row["measured_ttft_p50_saving_ms"] = d["ttft_p50_ms"] - p["ttft_p50_ms"]
            rows.append(row)
    out["paper_model"] = rows
    print()
    print("paper model (docs/SCALING.md) vs measured")
    print(f"{'model':<12} {'N':>2} {'model aff':>9} {'measured':>8} {'model blind':>11} "
          f"{'measured':>8} {'TTFT saving model':>17} {'measured p50':>12}")
    for r in rows:
        f = (lambda k, w: f"{r[k]:>{w}.3f}" if k in r else " " * (w - 1) + "-")
        g = (lambda k, w: f"{r[k]:>{w - 2}.1f}ms" if k in r else " " * (w - 1) + "-")
        print(f"{r['model']:<12} {r['replicas']:>2} {f('hit_rate_affinity', 9)} "
              f"{f('measured_hit_prefix', 8)} {f('hit_rate_blind', 11)} "
              f"{f('measured_hit_default', 8)} {g('ttft_saving_ms', 17)} "
              f"{g('measured_ttft_p50_saving_ms', 12)}")


def report(out: dict) -> None:
    print()
    print(f"{'model':<12} {'N':>2} {'router':<8} {'hit rate':>8} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'tok/s':>7} {'route us':>8} {'sticky':>6}")
    for r in out["runs"]:
        print(f"{r['model']:<12} {r['replicas']:>2} {r['router']:<8} {r['hit_rate']:>8.3f} "
              f"{r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
              f"{r['tokens_per_s']:>7.1f} {r['route_us_per_call'] or 0:>8.1f} "
              f"{r['same_replica_share']:>6.2f}")
    kc = out["key_cost"]
    print(f"route key (bytes + hash chain, {kc['mean_key_blocks']:.0f} blocks) + table "
          f"match/insert at 8 replicas: {kc['key_hash_match_insert_us']:.1f} us/request")
    rc = out["router_cpu"]
    print(f"PrefixRouter choose_replicas + on_request_routed at {rc['replicas']} replicas, "
          f"in-process: {rc['choose_and_record_us']:.1f} us CPU/request")
    checks = []
    for model, ns in (("smollm2", [2]), ("toy-instant", [4, 8])):
        single = _find(out, model, 1, "prefix")
        for n in ns:
            p, d = _find(out, model, n, "prefix"), _find(out, model, n, "default")
            if not (single and p and d):
                continue
            checks.append({"name": f"{model} N={n}: hit rate prefix / single replica",
                           "value": p["hit_rate"] / single["hit_rate"], "op": ">=",
                           "target": 0.9,
                           "pass": p["hit_rate"] >= 0.9 * single["hit_rate"]})
            checks.append({"name": f"{model} N={n}: hit rate prefix / default router",
                           "value": p["hit_rate"] / max(d["hit_rate"], 1e-9), "op": ">=",
                           "target": 2.0, "pass": p["hit_rate"] >= 2 * d["hit_rate"]})
    out["checks"] = checks
    print_targets(checks)


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, ax in zip(("toy-instant", "smollm2"), axes):
        runs = [r for r in out["runs"] if r["model"] == model]
        if not runs:
            ax.set_visible(False)
            continue
        labels = [f"N={r['replicas']}\n{r['router']}" for r in runs]
        ax.bar(labels, [r["hit_rate"] for r in runs],
               color=["tab:green" if r["router"] == "prefix" else "tab:gray" for r in runs])
        for i, r in enumerate(runs):
            ax.text(i, r["hit_rate"] + 0.01, f"{r['ttft_p50_ms']:.0f} ms", ha="center",
                    fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("prefix-cache hit rate (reused / prompt tokens)")
        ax.set_title(f"{model}: {out['users']} users x {out['turns']} turns "
                     "(label: TTFT p50)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
