"""Sampling, one row, tep against llama.cpp's sampler chain, numpy and torch (vLLM style).

    python benchmarks/bench_peers_sampling.py [--quick] [--vocab 32000 128256 262144]
                                              [--budget 6] [--json benchmarks/results/peers_sampling.json]

Logits: one row float32 [V], standard normal * 2 (seed 0), the same array for every peer.
Cases (tep's names; every peer runs the same knobs on one thread):
  greedy     temperature 0
  chain      llama.cpp's defaults: top_k 40, top_p 0.95, min_p 0.05, temperature 0.8
  top_p      top_p 0.95 alone (temperature 1)
  full       temperature 1, no filter: a draw from the full-vocabulary softmax
  penalties  chain + repetition 1.1, frequency 0.5, presence 0.5 over a 512-token history
Peers:
  tep        tep.kernels.sample(x, ..., n_threads=1)
  llama.cpp  llama-cpp-python's low-level API, no model loaded: a chain
             (llama_sampler_chain_init + llama_sampler_init_penalties/top_k/top_p/min_p/temp/
             dist, or _greedy) applied with llama_sampler_apply to a llama_token_data_array
             over the logits. Every apply mutates the array (sorts, shrinks it), so each call
             first refills it from the logits: that copy-in (numpy writes into the ctypes
             buffer) is timed on its own ("llama.cpp copy-in"), and "llama.cpp" is the apply
             alone = (copy-in + apply) - copy-in, both medians of the same interleaved run.
             llama.cpp filters before the temperature (its default chain order) where tep
             filters the tempered distribution; the work per call is the same kind.
  numpy      what a backend author writes: float64 softmax, min_p mask, np.partition for
             top_k, a full argsort + cumsum for top_p, Generator.choice for the draw.
  torch      PyTorch CPU in vLLM's style: temperature divide, min_p mask, sort + cumsum for
             top_k/top_p, masked scatter back, softmax, exponential race (probs / Exp(1),
             argmax). torch.set_num_threads(1).
A missing peer (package not installed) is reported as skipped with the reason.

Targets (issue 5, V=128256, one row): llama.cpp apply / tep >= 2 for the chain, >= 20 for
top_p alone, >= 4 for full vocabulary; numpy / tep and torch / tep >= 100 (chain).
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _cases import SAMPLING_CASES as CASES  # noqa: E402
from _machine import describe  # noqa: E402
from _report import print_targets, write_result  # noqa: E402
from _timing import interleaved  # noqa: E402

from tep.kernels import sample  # noqa: E402

TARGET_V = 128256
LLAMA_TARGETS = {"chain": 2.0, "top_p": 20.0, "full": 4.0}
SLOW_PEER_TARGET = 100.0


def _knobs(kw: dict) -> tuple[float, int, float, float, float, float, float]:
    return (kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0),
            kw.get("min_p", 0.0), kw.get("repetition_penalty", 1.0),
            kw.get("frequency_penalty", 0.0), kw.get("presence_penalty", 0.0))


# ---- numpy, as a backend author writes it ---------------------------------------------------

def numpy_sample(logits: np.ndarray, rng: np.random.Generator, history: np.ndarray | None,
                 **kw) -> int:
    """One token from float32 logits [V] with the usual knobs, plain numpy."""
    T, top_k, top_p, min_p, rep, freq, pres = _knobs(kw)
    x = logits.astype(np.float64)
    if history is not None and len(history):
        counts = np.bincount(history, minlength=x.size)
        seen = counts > 0
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        x -= freq * counts + pres * seen
    if T < 1e-5:
        return int(np.argmax(x))
    x = x / T
    p = np.exp(x - x.max())
    p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0.0
    if 0 < top_k < p.size:
        kth = np.partition(p, -top_k)[-top_k]
        p[p < kth] = 0.0
    if top_p < 1.0:
        order = np.argsort(-p)
        csum = np.cumsum(p[order])
        cut = int(np.searchsorted(csum, top_p * csum[-1])) + 1
        p[order[cut:]] = 0.0
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


# ---- torch, vLLM's style --------------------------------------------------------------------

def make_torch_sampler():
    """A vLLM-style torch CPU sampler over [1, V] logits, or raise ImportError."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)

    def torch_sample(logits_np: np.ndarray, history: np.ndarray | None, **kw) -> int:
        T, top_k, top_p, min_p, rep, freq, pres = _knobs(kw)
        logits = torch.from_numpy(logits_np).unsqueeze(0)   # zero copy, [1, V]
        if history is not None and len(history):
            counts = torch.bincount(torch.from_numpy(history), minlength=logits.shape[1])
            seen = (counts > 0).unsqueeze(0)
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep),
                                 logits)
            logits = logits - (freq * counts + pres * seen.float())
        if T < 1e-5:
            return int(logits.argmax(dim=-1))
        logits = logits / T
        if min_p > 0:
            probs = logits.softmax(dim=-1)
            logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True),
                                        float("-inf"))
        if top_k > 0 or top_p < 1.0:
            srt, idx = logits.sort(dim=-1, descending=False)
            if top_k > 0:
                kth = srt[:, -top_k].unsqueeze(1)
                srt = srt.masked_fill(srt < kth, float("-inf"))
            if top_p < 1.0:
                cum = srt.softmax(dim=-1).cumsum(dim=-1)
                drop = cum <= 1 - top_p
                drop[:, -1] = False
                srt = srt.masked_fill(drop, float("-inf"))
            logits = srt.scatter(dim=-1, index=idx, src=srt)
        probs = logits.softmax(dim=-1)
        q = torch.empty_like(probs).exponential_(generator=gen)
        return int(probs.div_(q).argmax(dim=-1))

    return torch_sample, torch.__version__


# ---- llama.cpp through llama-cpp-python's low-level API -------------------------------------

class LlamaChain:
    """A llama.cpp sampler chain and a reusable llama_token_data_array over V tokens."""

    def __init__(self, lc, V: int, history: np.ndarray | None, **kw) -> None:
        T, top_k, top_p, min_p, rep, freq, pres = _knobs(kw)
        self.lc = lc
        params = lc.llama_sampler_chain_default_params()
        self.chain = lc.llama_sampler_chain_init(params)
        add = lambda s: lc.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if history is not None and (rep != 1.0 or freq or pres):
            # older bindings take (n_vocab, last_n, ...), newer ones (last_n, ...)
            n_args = len(inspect.signature(lc.llama_sampler_init_penalties).parameters)
            lead = (V,) if n_args == 5 else ()
            pen = lc.llama_sampler_init_penalties(*lead, len(history), rep, freq, pres)
            for t in history.tolist():
                lc.llama_sampler_accept(pen, int(t))
            add(pen)
        if T < 1e-5:
            add(lc.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                add(lc.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                add(lc.llama_sampler_init_top_p(top_p, 1))
            if min_p > 0:
                add(lc.llama_sampler_init_min_p(min_p, 1))
            add(lc.llama_sampler_init_temp(T))
            add(lc.llama_sampler_init_dist(1234))
        # The candidates buffer: numpy views onto a ctypes array of llama_token_data.
        self.buf = (lc.llama_token_data * V)()
        rec = np.ctypeslib.as_array(self.buf)                 # structured [V]
        self.ids, self.logits, self.p = rec["id"], rec["logit"], rec["p"]
        self.arr = lc.llama_token_data_array(
            data=ctypes.cast(self.buf, ctypes.POINTER(lc.llama_token_data)), size=V,
            selected=-1, sorted=False)
        self.arr_p = ctypes.byref(self.arr)
        self.arange = np.arange(V, dtype=np.int32)
        self.V = V

    def copy_in(self, x: np.ndarray) -> None:
        """Fill the candidates from logits [V] (what every sampling step must do)."""
        self.ids[:] = self.arange
        self.logits[:] = x
        self.p[:] = 0.0
        self.arr.size = self.V
        self.arr.selected = -1
        self.arr.sorted = False

    def sample(self, x: np.ndarray) -> int:
        """Copy in, apply the chain, return the selected token id."""
        self.copy_in(x)
        self.lc.llama_sampler_apply(self.chain, self.arr_p)
        return int(self.buf[self.arr.selected].id)

    def free(self) -> None:
        self.lc.llama_sampler_free(self.chain)


def load_llama():
    """llama_cpp's low-level module and its version, or raise ImportError."""
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    return lc, getattr(llama_cpp, "__version__", "?")


# ---- the run --------------------------------------------------------------------------------

def bench_vocab(V: int, peers: dict, budget_s: float, min_repeats: int) -> list[dict]:
    """Every case x peer at one vocabulary size; all interleaved in one group."""
    rng_logits = np.random.default_rng(0)
    x = rng_logits.standard_normal(V, dtype=np.float32) * np.float32(2.0)
    hist = ((np.random.default_rng(1).zipf(1.3, 512) * 7919) % V).astype(np.int64)
    cases: dict = {"floor": lambda: np.max(x)}
    chains = []
    for case, kw in CASES.items():
        h = hist if case == "penalties" else None
        extra = {"output_token_ids": h} if h is not None else {}
        cases[f"tep|{case}"] = (lambda kw=kw, extra=extra:
                                sample(x, seed=0, step=0, n_threads=1, **kw, **extra))
        if "numpy" in peers:
            rng = np.random.default_rng(0)
            cases[f"numpy|{case}"] = lambda kw=kw, h=h, rng=rng: numpy_sample(x, rng, h, **kw)
        if "torch" in peers:
            ts = peers["torch"]
            cases[f"torch|{case}"] = lambda kw=kw, h=h, ts=ts: ts(x, h, **kw)
        if "llama.cpp" in peers:
            ch = LlamaChain(peers["llama.cpp"], V, h, **kw)
            chains.append(ch)
            cases[f"llama.cpp+copy|{case}"] = lambda ch=ch: ch.sample(x)
            if case == "greedy":   # the copy-in does not depend on the chain
                cases["llama.cpp copy-in|-"] = lambda ch=ch: ch.copy_in(x)
    # sanity: every greedy peer picks argmax
    want = int(np.argmax(x))
    for key, fn in cases.items():
        if key.endswith("|greedy"):
            got = fn()
            assert int(got) == want, f"{key}: greedy gave {got}, argmax is {want}"
    res = interleaved(cases, min_repeats=min_repeats, budget_s=budget_s)
    for ch in chains:
        ch.free()
    floor = res["floor"]["median_s"]
    rows = [{"V": V, "peer": "floor (np.max)", "case": "-", **res["floor"]}]
    copy = res.get("llama.cpp copy-in|-")
    for key, r in res.items():
        if key == "floor":
            continue
        peer, case = key.split("|")
        if peer == "llama.cpp+copy":
            rows.append({"V": V, "peer": "llama.cpp+copy", "case": case, **r})
            apply_s = max(r["median_s"] - copy["median_s"], 0.0)
            rows.append({"V": V, "peer": "llama.cpp", "case": case, "median_s": apply_s,
                         "derived": "apply = (copy-in + apply) - copy-in"})
        else:
            rows.append({"V": V, "peer": peer, "case": case, **r})
    for r in rows:
        r["ratio_to_floor"] = r["median_s"] / floor
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Issue-5 sampling checks at V=128256: speedups of tep over each peer."""
    out = []
    at = {(r["peer"], r["case"]): r["median_s"] for r in rows if r["V"] == TARGET_V}
    for case, tgt in LLAMA_TARGETS.items():
        if ("llama.cpp", case) in at and ("tep", case) in at:
            v = at[("llama.cpp", case)] / at[("tep", case)]
            out.append({"name": f"llama.cpp apply / tep, {case}, V={TARGET_V}", "value": v,
                        "op": ">=", "target": tgt, "pass": v >= tgt})
    for peer in ("numpy", "torch"):
        for case in ("chain", "top_p", "full"):
            if (peer, case) in at:
                v = at[(peer, case)] / at[("tep", case)]
                out.append({"name": f"{peer} / tep, {case}, V={TARGET_V}", "value": v,
                            "op": ">=", "target": SLOW_PEER_TARGET,
                            "pass": v >= SLOW_PEER_TARGET})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="V=128256 only, fewer repeats")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 262144])
    ap.add_argument("--budget", type=float, default=6.0)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "peers_sampling.json")
    args = ap.parse_args(argv)
    min_repeats = 7
    if args.quick:
        args.vocab, args.budget, min_repeats = [TARGET_V], 1.5, 3
    t0 = time.time()
    machine = describe()
    peers: dict = {"numpy": True}
    versions: dict = {"numpy": np.__version__}
    skipped: dict = {}
    try:
        peers["torch"], versions["torch"] = make_torch_sampler()
    except ImportError as e:
        skipped["torch"] = f"not installed ({e})"
    try:
        peers["llama.cpp"], versions["llama_cpp_python"] = load_llama()
    except (ImportError, OSError) as e:
        skipped["llama.cpp"] = f"not installed or not loadable ({e})"
    rows = []
    for V in args.vocab:
        rows += bench_vocab(V, peers, args.budget, min_repeats)
        print(f"  peers sampling V={V} done", file=sys.stderr, flush=True)
    checks = targets(rows)

    print("\nSampling, one row, 1 thread: median us per call (x = ratio to tep, same case)")
    for V in args.vocab:
        vr = [r for r in rows if r["V"] == V]
        tep = {r["case"]: r["median_s"] for r in vr if r["peer"] == "tep"}
        fl = next(r for r in vr if r["peer"].startswith("floor"))
        print(f"V={V}  floor np.max {fl['median_s'] * 1e6:.1f} us")
        for r in vr:
            if r["peer"].startswith("floor"):
                continue
            rel = r["median_s"] / tep[r["case"]] if r["case"] in tep else float("nan")
            print(f"  {r['peer']:>18} {r['case']:>10} {r['median_s'] * 1e6:11.1f} us "
                  f"{rel:9.1f}x tep")
    for peer, why in skipped.items():
        print(f"  {peer}: SKIPPED - {why}")
    print_targets(checks)
    return write_result(args.json, {
        "bench": "peers_sampling", "quick": args.quick, "machine": machine,
        "versions": versions, "skipped": skipped, "wall_s": time.time() - t0,
        "rows": rows, "targets": checks, "logits": "one row, standard normal * 2, seed 0"})


if __name__ == "__main__":
    main()
