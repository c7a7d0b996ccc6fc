"""Run every benchmark, write JSON, render benchmarks/RESULTS.md and the PNG plots.

    python benchmarks/run_all.py            # everything, about 5-8 minutes on 2 cores
    python benchmarks/run_all.py --quick    # reduced grid and repeats, about 2-3 minutes
    python benchmarks/run_all.py --only kernels peers_sampling   # a subset
    python benchmarks/run_all.py --render-only                   # re-render from the JSON

Each benchmark runs in its own interpreter (so torch's and tep's OpenMP runtimes and thread
settings never share a process with another benchmark) and writes
benchmarks/results/<name>.json; this script then renders RESULTS.md, kernels_vs_vocab.png
and server.png from those files. A benchmark that fails is reported in RESULTS.md, and the
others still run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

BENCHES = {
    "kernels": "bench_kernels.py",
    "peers_sampling": "bench_peers_sampling.py",
    "peers_pooling": "bench_peers_pooling.py",
    "server": "bench_server.py",
    "engine": "bench_engine.py",     # renders its own section (results/engine.md)
}
# Sections rendered by their own benchmark (or written with its JSON): included as they are.
SECTIONS = ("engine", "llm", "structured", "bitmask", "embeddings", "layout")
TIMEOUT_S = {"kernels": 480, "peers_sampling": 360, "peers_pooling": 240, "server": 480,
             "engine": 600}


def run(names: list[str], quick: bool) -> dict[str, str]:
    """Run the named benchmarks one after another; returns {name: error} for failures."""
    errors = {}
    for name in names:
        cmd = [sys.executable, str(HERE / BENCHES[name]), "--json", str(RESULTS / f"{name}.json")]
        if quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, timeout=TIMEOUT_S[name])
            if p.returncode:
                errors[name] = f"exit status {p.returncode}"
        except subprocess.TimeoutExpired:
            errors[name] = f"timed out after {TIMEOUT_S[name]} s"
        print(f"== {name}: {time.time() - t0:.0f} s {errors.get(name, 'ok')}", flush=True)
    return errors


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


# ---- plots ----------------------------------------------------------------------------------

def plot_kernels(ps: dict, path: Path) -> bool:
    """Sampling time vs vocabulary size, one panel per case, one line per peer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ps["rows"]
    cases = ["greedy", "chain", "top_p", "full", "penalties"]
    peers = ["tep", "llama.cpp", "llama.cpp+copy", "numpy", "torch"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4), sharey=True)
    floor = sorted((r["V"], r["median_s"]) for r in rows if r["peer"].startswith("floor"))
    for ax, case in zip(axes, cases):
        for peer in peers:
            pts = sorted((r["V"], r["median_s"]) for r in rows
                         if r["peer"] == peer and r["case"] == case)
            if pts:
                ax.plot([v for v, _ in pts], [t * 1e6 for _, t in pts], marker="o", label=peer)
        ax.plot([v for v, _ in floor], [t * 1e6 for _, t in floor], "k--", marker="x", label="floor np.max")
        ax.set_xscale("log")
        ax.set_yscale("log")
        vs = [v for v, _ in floor]
        ax.set_xticks(vs, [f"{v / 1000:.0f}k" for v in vs])
        ax.minorticks_off()
        ax.set_title(case)
        ax.set_xlabel("vocabulary size V")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("us per call (one row, 1 thread)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Sampling one row: median time per call vs vocabulary size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_server(sv: dict, path: Path) -> bool:
    """Requests/s and tokens/s per server."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v for k, v in sv["results"].items() if "rps" in v}
    if not res:
        return False
    names = list(res)
    panels = [
        ("non-streaming req/s, 16 connections", [res[n]["rps"]["rps"] for n in names]),
        ("one stream of 2000 tokens: tokens/s", [res[n]["stream1"]["tokens_per_s"] for n in names]),
        ("64 streams x 256: aggregate tokens/s",
         [res[n]["stream64"]["agg_tokens_per_s"] for n in names]),
        ("64 streams x 256: slowest stream tokens/s",
         [res[n]["stream64"]["slowest_stream_tokens_per_s"] for n in names]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (title, vals) in zip(axes, panels):
        colors = {"tep": "tab:blue", "tep-c64": "tab:cyan", "litserve": "tab:orange",
                  "floor": "tab:gray"}
        bars = ax.bar(names, vals, color=[colors.get(n, "tab:green") for n in names])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("HTTP serving on loopback (instant models)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---- markdown -------------------------------------------------------------------------------

def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def _targets_table(checks: list[dict], source: str) -> list[str]:
    out = []
    for c in checks:
        v = c["value"]
        out.append(f"| {source} | {c['name']} | {v:,.2f} | {c['op']} {c['target']:g} | "
                   f"{'PASS' if c['pass'] else '**MISS**'} |")
    return out


def render(errors: dict[str, str], quick: bool) -> str:
    kn, ps, pp, sv = (load(n) for n in ("kernels", "peers_sampling", "peers_pooling",
                                        "server"))
    anyres = next((d for d in (kn, ps, pp, sv) if d), None)
    L = ["# tep benchmark results", "",
         "Rendered by `python benchmarks/run_all.py` from `benchmarks/results/*.json`"
         + (" (**quick mode**: reduced grid and repeats)" if quick else "") + ". "
         "All numbers are medians of interleaved repeats from one run on the machine below; "
         "compare ratios within one table (same run), not absolute times across runs.", ""]
    if anyres:
        m = anyres["machine"]
        L += ["## Machine", "",
              f"- CPU: {m['cpu_model']}; {m['logical_cpus']} logical CPUs "
              f"({m.get('cores_per_socket')} cores/socket, {m.get('threads_per_core')} "
              f"threads/core); SIMD: {', '.join(m['flags_simd']) or '?'}",
              f"- Memory: {m['mem_gib']} GiB; OS: {m['os']}; Python {m['python']}, "
              f"numpy {m['numpy']}"]
        loads = [(n, d["machine"].get("loadavg_1_5_15"), d["machine"].get("loadavg_end"))
                 for n, d in zip(BENCHES, (kn, ps, pp, sv)) if d]
        L.append("- Load: the cores are shared with other engineers' test runs, so timings "
                 "are noisy. 1-minute load average at start -> end of each benchmark: " +
                 "; ".join(f"{n} {a[0]:.1f} -> {b[0]:.1f}" for n, a, b in loads if a and b))
        if m.get("env"):
            L.append(f"- Environment: {m['env']} (OPENBLAS_CORETYPE does not affect np.max)")
        L.append("")
    if errors:
        L += ["## Failures in this run", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]

    L += ["## Targets", "", "| bench | check | measured | target | |", "|---|---|---|---|---|"]
    for name, d in zip(BENCHES, (kn, ps, pp, sv)):
        if d:
            L += _targets_table(d["targets"], name)
    L.append("")

    skipped = {}
    for d in (ps, pp, sv):
        if d:
            skipped.update(d.get("skipped", {}))
    if sv:
        skipped.update({k: v["skipped"] for k, v in sv["results"].items() if "skipped" in v})
    versions = {}
    for d in (ps, pp, sv):
        if d:
            versions.update(d.get("versions", {}))
    L += ["## Peers", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    L += [f"- **{k}: skipped** - {v}" for k, v in skipped.items()] or ["- every peer ran"]
    L.append("")

    if kn:
        L += ["## tep kernels (issue 2)", "",
              f"Logits: {kn['logits']}. Median us per call; `x` = ratio to the `np.max` floor "
              "over the same logits in the same group (`np.max(logits, axis=1)`). "
              "Cases: greedy (T=0); chain (T=0.8, top_k=40, top_p=0.95, min_p=0.05); top_p "
              "(0.95 alone); full (T=1, no filter); penalties (chain + repetition 1.1, "
              "presence 0.5, frequency 0.5 over a 512-token history). `seed=0`, default "
              "`logprobs=None`.", ""]
        names = ["greedy", "chain", "top_p", "full", "penalties"]
        L += ["| logits | V | B | layout | threads | floor | " + " | ".join(names) + " |",
              "|---|---:|---:|---|---:|---:|" + "---:|" * len(names)]
        rows = [r for r in kn["rows"] if r["kind"] == "sampling"]
        key = lambda r: (r["dist"], r["V"], r["B"], r.get("layout", "[B,V]"))  # noqa: E731
        groups = sorted({(*key(r), r["threads"]) for r in rows if r["case"] != "floor"},
                        key=lambda g: (g[0] != "normal2", *g[1:]))
        for dist, V, B, lay, t in groups:
            fl = next(r for r in rows if key(r) == (dist, V, B, lay) and r["case"] == "floor")
            cells = []
            for n in names:
                r = next((r for r in rows if key(r) == (dist, V, B, lay)
                          and r["threads"] == t and r["case"] == n), None)
                cells.append(f"{_us(r['median_s'])} ({r['ratio_to_floor']:.1f}x)" if r else "-")
            L.append(f"| {dist} | {V} | {B} | {lay} | {t} | {_us(fl['median_s'])} | " +
                     " | ".join(cells) + " |")
        L += ["", "Pooling (masked mean), median ms per call:", "",
              "| shape [B, T, D] | case | threads | ms | numpy / case | case / floor |",
              "|---|---|---:|---:|---:|---:|"]
        for r in kn["rows"]:
            if r["kind"] == "pooling":
                L.append(f"| {r['shape']} | {r['case']} | {r['threads']} | "
                         f"{r['median_s'] * 1e3:.3f} | {r['numpy_over']:.2f} | "
                         f"{r['over_floor']:.2f} |")
        L.append("")

    if ps:
        L += ["## Sampling against peers (issue 5)", "",
              f"Logits: {ps['logits']}; one thread everywhere. `llama.cpp` = `llama_sampler_apply` "
              "alone (copy-in subtracted), `llama.cpp+copy` = refilling the "
              "`llama_token_data_array` from the logits and applying, `llama.cpp copy-in` = "
              "the refill alone. x = peer time / tep time for the same case. llama.cpp's chain "
              "runs its default order (penalties, top_k, top_p, min_p, temp, dist: filters "
              "before the temperature) where tep filters the tempered distribution; numpy is "
              "a float64 softmax + argsort/cumsum + `Generator.choice`; torch is vLLM's "
              "sort/cumsum/scatter + exponential race, `torch.set_num_threads(1)`. Peers run "
              "in turn, so each tep sample starts right after another peer's call (caches and "
              "clocks as a decode loop leaves them); the kernels table above times tep calls "
              "back to back, where top_p at V=128256 is faster.", "",
              "![sampling time vs vocabulary size](results/kernels_vs_vocab.png)", ""]
        for V in sorted({r["V"] for r in ps["rows"]}):
            vr = [r for r in ps["rows"] if r["V"] == V]
            tep = {r["case"]: r["median_s"] for r in vr if r["peer"] == "tep"}
            fl = next(r for r in vr if r["peer"].startswith("floor"))
            cases = [c for c in ["greedy", "chain", "top_p", "full", "penalties"] if c in tep]
            L += [f"V = {V} (floor `np.max`: {_us(fl['median_s'])} us)", "",
                  "| peer | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
            for peer in ["tep", "llama.cpp", "llama.cpp+copy", "numpy", "torch"]:
                cells = []
                for c in cases:
                    r = next((r for r in vr if r["peer"] == peer and r["case"] == c), None)
                    cells.append(f"{_us(r['median_s'])} us ({r['median_s'] / tep[c]:.1f}x)"
                                 if r else "-")
                if any(c != "-" for c in cells):
                    L.append(f"| {peer} | " + " | ".join(cells) + " |")
            cp = next((r for r in vr if r["peer"] == "llama.cpp copy-in"), None)
            if cp:
                L.append(f"| llama.cpp copy-in | {_us(cp['median_s'])} us (any case) |" +
                         " |" * (len(cases) - 1))
            L.append("")

    if pp:
        L += ["## Pooling against peers (issue 5)", "",
              "Mean pooling with an attention mask, one thread. x = peer / tep (mask).", "",
              "| shape [B, T, D] | peer | ms | x tep | x floor |", "|---|---|---:|---:|---:|"]
        for r in pp["rows"]:
            L.append(f"| {r['shape']} | {r['peer']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['over_tep']:.2f} | {r['over_floor']:.2f} |")
        L.append("")

    if sv:
        L += ["## HTTP serving (issue 5)", "",
              f"Loopback only. Non-streaming requests/s: {sv['rps_tool']}, 16 connections, "
              "max_tokens 16. Streams: this directory's asyncio client (one stream of 2000 "
              "tokens; 64 concurrent streams of 256 tokens). Load generator and server share "
              "the machine's cores. `interleaved` = streams whose first token arrived before "
              "any stream finished (a target for tep-c64, where all 64 are admitted: tep "
              "yields between writes and joins at most 16 ready events per write; with "
              "instant models a server that never suspends a stream finishes one before "
              "starting the next, the floor included). tep: `tep serve --toy-instant` (1 "
              "process, default `--max-concurrency 8`: 8 requests run at once and the rest "
              "wait in FIFO order for a slot, so at most 8 of 64 can interleave); "
              "tep-c64: the same with `--max-concurrency 64`; LitServe: OpenAISpec, 1 API server + 1 inference worker; "
              "floor: a bare ASGI app on hypercorn that parses the JSON and answers.", "",
              "![server](results/server.png)", "",
              "| server | req/s @16 | p50 ms | p99 ms | 1 stream tok/s | TTFT ms | "
              "64x256 agg tok/s | slowest stream tok/s | TTFT max ms (64) | interleaved |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in sv["results"].items():
            if "rps" not in r:
                L.append(f"| {name} | {r.get('skipped') or r.get('error')} |" + " |" * 9)
                continue
            p50, p99 = r["rps"].get("p50_s"), r["rps"].get("p99_s")
            s1, s64 = r["stream1"], r["stream64"]
            L.append(f"| {name} | {r['rps']['rps']:,.0f} | "
                     f"{p50 * 1e3 if p50 else float('nan'):.2f} | "
                     f"{p99 * 1e3 if p99 else float('nan'):.2f} | "
                     f"{s1['tokens_per_s']:,.0f} | {s1['ttft_s'] * 1e3:.2f} | "
                     f"{s64['agg_tokens_per_s']:,.0f} | "
                     f"{s64['slowest_stream_tokens_per_s']:,.0f} | "
                     f"{s64['ttft_max_s'] * 1e3:.1f} | {s64['interleaved']}/64 |")
        fl = sv["results"].get("floor", {})
        if "rps_asyncio_client" in fl:
            a = fl["rps_asyncio_client"]
            L += ["", f"Client check: the asyncio client drives the floor at {a['rps']:,.0f} "
                  f"req/s using {a['client_cpu_frac']:.0%} of one core (wrk is the rps tool). "
                  "For streams, the client's CPU share below says how close it was to its "
                  "limit: near 100% (the floor) means the number is the client's ceiling, a "
                  "lower bound for that server; well below (tep, LitServe) means the server "
                  "is what limits the rate.", "",
                  "Stream client CPU (share of one core while streaming): " + "; ".join(
                      f"{n}: one stream {r['stream1'].get('client_cpu_frac', float('nan')):.0%}, "
                      f"64 streams {r['stream64'].get('client_cpu_frac', float('nan')):.0%}"
                      for n, r in sv["results"].items() if "stream1" in r)]
        L.append("")
    # benchmarks that render their own section (results/<name>.md), in this order
    for name in SECTIONS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            L += [md.read_text().rstrip(), ""]
    L += ["## Reproduce", "", "```", ". /work/venv/bin/activate   # or any env with tep built",
          "pip install -r benchmarks/requirements-peers.txt   # optional peers",
          "python setup.py build_ext --inplace", "python benchmarks/run_all.py [--quick]", "```",
          ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark in its quick mode")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    ap.add_argument("--render-only", action="store_true", help="re-render from existing JSON")
    args = ap.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    t0 = time.time()
    errors = {} if args.render_only else run(args.only, args.quick)
    ps, sv = load("peers_sampling"), load("server")
    if ps:
        plot_kernels(ps, RESULTS / "kernels_vs_vocab.png")
    if sv:
        plot_server(sv, RESULTS / "server.png")
    quick = any((load(n) or {}).get("quick") for n in BENCHES)
    (HERE / "RESULTS.md").write_text(render(errors, quick))
    print(f"wrote {HERE / 'RESULTS.md'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
