"""Mean pooling: tep against numpy, torch (sentence-transformers' formula) and the
sentence-transformers Pooling module, on the same hidden states.

    python benchmarks/bench_peers_pooling.py [--quick] [--budget 5]
                                             [--json benchmarks/results/peers_pooling.json]

Hidden states float32 [B, T, D] in {[32, 512, 1024], [256, 128, 384]}, lengths uniform in
[1, T] (seed 0), attention mask = the valid prefix. One thread everywhere
(torch.set_num_threads(1), n_threads=1).
  tep          tep.kernels.pool(h, mask=mask, mode="mean")   (and lengths=, the same result)
  numpy        (h * mask[..., None]).sum(1) / count
  torch        sentence-transformers' formula: mask.unsqueeze(-1).expand(h.size()).float(),
               sum(h * m, 1) / clamp(m.sum(1), min=1e-9)   (torch.from_numpy: zero copy)
  st.Pooling   sentence_transformers Pooling(D, "mean").forward({"token_embeddings",
               "attention_mask"}) on the same tensors
  floor        [np.sum(h[b, :len_b], axis=0) for b in range(B)]: reads only valid tokens
Targets (issue 5): numpy / tep >= 3, torch / tep >= 3, st.Pooling / tep >= 3.
"""
from __future__ import annotations

import argparse
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

from tep.kernels import pool  # noqa: E402

SHAPES = [(32, 512, 1024), (256, 128, 384)]
TARGET = 3.0


def load_torch():
    """(torch, its version) with one thread, or raise ImportError."""
    import torch

    torch.set_num_threads(1)
    return torch, torch.__version__


def load_st_pooling():
    """(the Pooling class, sentence-transformers version), or raise ImportError."""
    import sentence_transformers as st
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Pooling
    return Pooling, st.__version__


def bench_shape(shape, torch, Pooling, budget_s: float, min_repeats: int) -> list[dict]:
    B, T, D = shape
    rng = np.random.default_rng(0)
    h = rng.standard_normal(shape, dtype=np.float32)
    lens = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lens[:, None]
    maskf = mask.astype(np.float32)[..., None]
    count = mask.sum(1, keepdims=True).astype(np.float32)
    ref = (h * maskf).sum(1) / count
    cases = {
        "floor": lambda: [np.sum(h[b, :lens[b]], axis=0) for b in range(B)],
        "tep": lambda: pool(h, mask=mask, mode="mean", n_threads=1),
        "tep (lengths)": lambda: pool(h, lengths=lens, mode="mean", n_threads=1),
        "numpy": lambda: (h * maskf).sum(1) / count,
    }
    if torch is not None:
        th = torch.from_numpy(h)
        tm = torch.from_numpy(mask.astype(np.int64))

        def st_formula():
            m = tm.unsqueeze(-1).expand(th.size()).float()
            return torch.sum(th * m, 1) / torch.clamp(m.sum(1), min=1e-9)

        cases["torch (ST formula)"] = st_formula
        assert np.allclose(st_formula().numpy(), ref, rtol=1e-4, atol=1e-5)
        if Pooling is not None:
            mod = Pooling(D, "mean")

            def st_module():
                return mod({"token_embeddings": th, "attention_mask": tm})["sentence_embedding"]

            cases["st.Pooling"] = st_module
            with torch.inference_mode():
                assert np.allclose(st_module().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert np.allclose(pool(h, mask=mask, n_threads=1), ref, rtol=1e-4, atol=1e-5)
    if torch is not None:
        with torch.inference_mode():  # how sentence-transformers' encode() runs it
            res = interleaved(cases, min_repeats=min_repeats, budget_s=budget_s)
    else:
        res = interleaved(cases, min_repeats=min_repeats, budget_s=budget_s)
    tep = res["tep"]["median_s"]
    return [{"shape": list(shape), "peer": k, **r, "over_tep": r["median_s"] / tep,
             "over_floor": r["median_s"] / res["floor"]["median_s"]} for k, r in res.items()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "peers_pooling.json")
    args = ap.parse_args(argv)
    min_repeats = 3 if args.quick else 7
    if args.quick:
        args.budget = 1.0
    t0 = time.time()
    machine = describe()
    versions, skipped = {"numpy": np.__version__}, {}
    torch = Pooling = None
    try:
        torch, versions["torch"] = load_torch()
    except ImportError as e:
        skipped["torch"] = f"not installed ({e})"
    try:
        Pooling, versions["sentence_transformers"] = load_st_pooling()
    except ImportError as e:
        skipped["st.Pooling"] = f"not installed ({e})"
    rows = []
    for shape in SHAPES:
        rows += bench_shape(shape, torch, Pooling, args.budget, min_repeats)
    checks = []
    for r in rows:
        if r["peer"] in ("numpy", "torch (ST formula)", "st.Pooling"):
            checks.append({"name": f"{r['peer']} / tep [{'x'.join(map(str, r['shape']))}]",
                           "value": r["over_tep"], "op": ">=", "target": TARGET,
                           "pass": r["over_tep"] >= TARGET})
    print("\nMean pooling, 1 thread: median ms per call")
    for r in rows:
        print(f"  {str(r['shape']):>16} {r['peer']:>20} {r['median_s'] * 1e3:9.3f} ms "
              f"{r['over_tep']:7.2f}x tep {r['over_floor']:6.2f}x floor")
    for k, v in skipped.items():
        print(f"  {k}: SKIPPED - {v}")
    print_targets(checks)
    return write_result(args.json, {
        "bench": "peers_pooling", "quick": args.quick, "machine": machine,
        "versions": versions, "skipped": skipped, "wall_s": time.time() - t0,
        "rows": rows, "targets": checks})


if __name__ == "__main__":
    main()
