"""Speculative decoding end to end: tep off / ngram / draft (and llama-server none /
ngram-simple / ngram-mod when a binary is given), same GGUF, same run.

    python benchmarks/bench_speculative.py [--quick] [--modes off ngram draft]
        [--clients 1 4] [--temperatures 0 0.8] [--kinds copy edit free] [--rounds 1]
        [--threads 2] [--model PATH] [--draft-model PATH] [--llama-server PATH]
        [--one-at-a-time] [--json benchmarks/results/speculative.json]

Workload: streaming chat, ~100-token prompts of three kinds - copy (repeat a paragraph),
edit (rewrite a paragraph with one change) and free (a story) - max_tokens 128, seeded
(seed = request index), greedy or temperature 0.8. N clients, each sending its requests
one after another; e2e tokens/s = completion tokens / (last byte - first send). Each
round measures every server on a case in turn, starting with a different server each
round. Every server runs the same requests; tep modes' texts are compared to tep off's
(exact acceptance: a seeded output must not change with speculation). Acceptance per
mode comes from tep's /metrics (tep_spec_*). The draft model defaults to the target GGUF
itself (no smaller GGUF of the same vocabulary is installed here): it shows the
mechanism, not a speed-up. Each server: TEP_THREADS / -t = --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from tep.obs.metrics import sample_values  # noqa: E402
from _harness import (Server, answers_chat, metrics_text, rounds,  # noqa: E402
                      run_async, run_clients, table)
from _machine import describe  # noqa: E402
from _report import print_targets, write_result  # noqa: E402

MAX_TOKENS = 128
CTX = 1024
PARAGRAPHS = [
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt "
    "wind. Every evening the keeper climbed the spiral stairs, trimmed the wick, and watched "
    "the beam sweep across the dark water. Ships passed safely because of him, though few "
    "sailors ever knew his name.",
    "Our team met on Monday to plan the new garden behind the library. We agreed to plant "
    "tomatoes along the south wall, herbs near the door, and a row of sunflowers by the "
    "fence. Maria will buy the seeds, Tom will build the raised beds, and everyone will "
    "water the plants on their assigned day.",
    "A cat sat on the warm windowsill and watched the rain fall on the quiet street. Now "
    "and then a car drove past, splashing water onto the pavement. The cat yawned, "
    "stretched its paws, and curled up again, content to spend the whole afternoon "
    "listening to the gentle rhythm of the storm.",
    "To make bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for "
    "ten minutes until it is smooth, then let it rise in a warm place for an hour. Shape "
    "the loaf, let it rise again, and bake it in a hot oven until the crust is golden "
    "brown and sounds hollow when tapped.",
]
FREE = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Write a short story about a robot learning to paint.",
        "Write a short story about two friends lost in a forest at night.",
        "Write a short story about a baker who opens a shop on the moon."]


def prompt(kind: str, i: int) -> str:
    p = PARAGRAPHS[i % len(PARAGRAPHS)]
    if kind == "copy":
        return f"Repeat the following paragraph exactly, word for word:\n\n{p}"
    if kind == "edit":
        return ("Rewrite the following paragraph exactly, but write it in the past tense "
                f"and change nothing else:\n\n{p}")
    return FREE[i % len(FREE)]


def model_id(args: argparse.Namespace) -> str:
    """The model name requests carry: tep serves the GGUF under its file name (and answers
    404 to any other); llama-server takes any name."""
    return Path(args.model).stem


def tep_server(mode: str, args: argparse.Namespace) -> Server:
    env = dict(os.environ, TEP_MODEL=str(args.model), TEP_THREADS=str(args.threads),
               TEP_MAX_NUM_SEQS="8", TEP_CONTEXT_SIZE=str(CTX), TEP_SPECULATIVE=mode,
               TEP_NUM_SPECULATIVE_TOKENS=str(args.k))
    if mode == "draft":
        env["TEP_DRAFT_MODEL"] = str(args.draft_model or args.model)
    cmd = [sys.executable, "-m", "tep", "serve", "--backend", "llamacpp", "--host",
           "127.0.0.1", "--port", "{port}", "--max-concurrency", "16",
           "--log-level", "warning"]
    return Server(cmd, env, name=f"tep-{mode}", ready=answers_chat(model_id(args)),
                  timeout_s=600.0)


def llama_server(mode: str, args: argparse.Namespace) -> Server:
    cmd = [args.llama_server, "-m", str(args.model), "--host", "127.0.0.1", "--port",
           "{port}", "-np", "8", "--cont-batching", "-t", str(args.threads),
           "-c", str(8 * CTX), "--no-webui", "--log-disable"]
    if mode != "none":
        cmd += ["--spec-type", mode]
    return Server(cmd, name=f"llama-server-{mode}", ready=answers_chat(model_id(args)),
                  timeout_s=600.0)


SPEC_COUNTERS = ("tep_spec_drafted_tokens", "tep_spec_accepted_tokens", "tep_spec_runs")


def spec_metrics(url: str) -> dict:
    """tep_spec_* counters from /metrics, by source."""
    try:
        text = metrics_text(url, timeout=10)
    except OSError:
        return {}
    out: dict = {}
    for name in SPEC_COUNTERS:
        for labels, v in sample_values(text, name + "_total").items():
            m = re.fullmatch(r'\{source="(\w+)"\}', labels)
            if m:
                out.setdefault(m.group(1), {})[name] = v
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["off", "ngram", "draft"])
    ap.add_argument("--llama-modes", nargs="+", default=["none", "ngram-simple", "ngram-mod"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.8])
    ap.add_argument("--kinds", nargs="+", default=["copy", "edit", "free"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--draft-model", type=Path, default=None)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="run each server alone (start, all its cases, stop) instead of "
                         "all of them up at once with the cases interleaved")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from tep.backends.llamacpp import default_model_path

        args.model = default_model_path()
    if args.quick:
        args.per_client = 1
    servers: list[Server] = [tep_server(m, args) for m in args.modes]
    not_run: dict = {}
    if args.llama_server and Path(args.llama_server).is_file():
        servers += [llama_server(m, args) for m in args.llama_modes]
    else:
        not_run["llama-server"] = "no binary (--llama-server / $LLAMA_SERVER); not measured"
    up = []
    if not args.one_at_a_time:
        for s in servers:
            try:
                up.append(s.start())
            except RuntimeError as e:
                not_run[s.name] = str(e)[:300]
    else:
        up = servers       # started in turn below
    cases = [(s.name, kind, T, c) for kind in args.kinds for T in args.temperatures
             for c in args.clients for s in up]

    def warm(s: Server) -> None:
        """One short request before any measured case: a server's first request pays
        one-time costs (for tep, Python code paths and caches) that would otherwise land
        on whichever case runs first."""
        run_async(run_clients(s.url, 1, 1, lambda k, i: {
            "model": model_id(args), "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 8, "temperature": 0}))
    by_name = {s.name: s for s in up}

    def measure(r: int, case: tuple) -> dict:
        name, kind, T, clients = case
        url = by_name[name].url
        before = spec_metrics(url)

        def body(k: int, i: int) -> dict:
            j = k * args.per_client + i
            return {"model": model_id(args), "messages": [{"role": "user", "content": prompt(kind, j)}],
                    "max_tokens": MAX_TOKENS, "temperature": T, "seed": j}
        print(f"{name} {kind} T={T} clients={clients}", flush=True)
        try:
            res, streams = run_async(run_clients(url, clients, args.per_client, body))
        except Exception as e:  # noqa: BLE001 - one failed case is reported, not fatal
            print(f"  FAILED: {e!r}", flush=True)
            return {"tokens_per_s": 0.0, "error": repr(e)[:300], "texts": [], "tokens": 0,
                    "drafted": 0, "accepted": 0, "runs": 0}
        res["texts"] = [r.text for r in streams]
        after = spec_metrics(url)
        for src, m in after.items():
            b = before.get(src, {})
            d = {k: m.get(k, 0) - b.get(k, 0) for k in SPEC_COUNTERS}
            res["drafted"] = d["tep_spec_drafted_tokens"]
            res["accepted"] = d["tep_spec_accepted_tokens"]
            res["runs"] = d["tep_spec_runs"]
        return res

    if args.one_at_a_time:
        # each server alone on the cores (the others are not running), all its cases,
        # then the next server: no idle server's threads beside the measured one
        results = {}
        for s in servers:
            try:
                s.start()
            except RuntimeError as e:
                not_run[s.name] = str(e)[:300]
                continue
            try:
                warm(s)
                results.update(rounds([c for c in cases if c[0] == s.name], args.rounds,
                                      measure))
            finally:
                s.stop()
    else:
        try:
            for s in up:
                warm(s)
            # each case's servers in a rotated order per round: none always goes first
            results = rounds(cases, args.rounds, measure, block=len(up))
        finally:
            for s in up:
                s.stop()
    rows, out_rows, same = [], [], []
    for (name, kind, T, c), v in results.items():
        last = v["runs"][-1]
        base = results.get(("tep-off", kind, T, c))
        ratio = v["median"] / base["median"] if base and base["median"] else None
        rate = last["accepted"] / last["drafted"] if last.get("drafted") else None
        mal = last["accepted"] / last["runs"] if last.get("runs") else None
        if base and name.startswith("tep-") and name != "tep-off":
            same.append(last["texts"] == base["runs"][-1]["texts"])
        rows.append((kind, T, c, name, v["median"], ratio, rate, mal))
        out_rows.append({"server": name, "kind": kind, "temperature": T, "clients": c,
                         "tokens_per_s": v["median"], "vs_tep_off": ratio,
                         "acceptance": rate, "mean_accepted": mal,
                         "drafted": last.get("drafted"), "tokens": last["tokens"]})
    print(table(("kind", "T", "clients", "server", "tok/s", "x tep-off", "accept",
                 "acc/run"), rows))
    checks = []
    for kind, goal in (("copy", 1.25), ("edit", 1.25), ("free", 0.97)):
        rs = [r for r in out_rows if r["server"] == "tep-ngram" and r["kind"] == kind
              and r["vs_tep_off"] is not None]
        if rs:
            worst = min(r["vs_tep_off"] for r in rs)
            checks.append({"name": f"ngram {kind}: worst ratio vs tep off", "value": worst,
                           "op": ">=", "target": goal, "pass": worst >= goal})
    # with ngram, copy and edit at least the best llama-server mode (same case)
    for kind in ("copy", "edit"):
        ratios = []
        for r in out_rows:
            if r["server"] != "tep-ngram" or r["kind"] != kind:
                continue
            peers = [p["tokens_per_s"] for p in out_rows if p["server"].startswith("llama-")
                     and (p["kind"], p["temperature"], p["clients"]) ==
                     (kind, r["temperature"], r["clients"]) and p["tokens_per_s"]]
            if peers:
                ratios.append(r["tokens_per_s"] / max(peers))
        if ratios:
            checks.append({"name": f"ngram {kind}: worst ratio vs best llama-server mode",
                           "value": min(ratios), "op": ">=", "target": 1.0,
                           "pass": min(ratios) >= 1.0})
    if same:
        checks.append({"name": "seeded texts equal to tep off (all cases)",
                       "value": float(all(same)), "op": "==", "target": 1.0,
                       "pass": all(same)})
    print_targets(checks)
    if not_run:
        print("not run:", json.dumps(not_run, indent=1))
    out = {"bench": "speculative", "machine": describe(), "rows": out_rows,
           "targets": checks, "not_run": not_run,
           "settings": {k: str(v) for k, v in vars(args).items()}}
    return write_result(args.json, out)


if __name__ == "__main__":
    main()
