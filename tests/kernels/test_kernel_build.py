"""Build-level checks of the kernels: the wheel's contents, both SIMD paths, thread counts.

The wheel test runs `python -m build --wheel` (compiles the package, about a minute on two
cores) and checks the wheel without installing it into the environment the suite runs in.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tep._kernels import sampling as _k
from tep.kernels import log_softmax, sample

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scalar_path():
    """Run a test on the portable C row primitives, then restore the default."""
    _k.simd_init(False)
    assert _k.simd_level() == 0
    try:
        yield
    finally:
        _k.simd_init(True)


def test_scalar_path_agrees_with_reference(scalar_path):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 3001)) * 2).astype(np.float32)
    x[0, 5] = np.nan
    ref = x.astype(np.float64)
    ref[np.isnan(ref)] = -np.inf
    m = ref.max(1, keepdims=True)
    lse = m + np.log(np.exp(ref - m).sum(1, keepdims=True))
    np.testing.assert_allclose(log_softmax(x), ref - lse, rtol=1e-5, atol=1e-5)
    assert (sample(x, temperature=0.0) == np.nanargmax(x, axis=1)).all()
    # top_p over a whole row (the bracket path) keeps exactly the reference set
    row = x[1]
    p = np.exp(ref[1] - m[1])
    p /= p.sum()
    order = np.argsort(-ref[1], kind="stable")
    above = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    kept = set(order[above < 0.9].tolist())
    toks = sample(np.tile(row, (4000, 1)), top_p=0.9, seed=3, step=np.arange(4000))
    assert set(toks.tolist()) <= kept


def test_simd_paths_pick_the_same_greedy_and_close_logprobs():
    if _k.simd_level() == 0:
        pytest.skip("this CPU has no AVX2+FMA: only the portable path exists here")
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((8, 50000)) * 3).astype(np.float32)
    fast = log_softmax(x), sample(x, temperature=0.0), sample(x, logprobs=5, seed=1)
    _k.simd_init(False)
    try:
        slow = log_softmax(x), sample(x, temperature=0.0), sample(x, logprobs=5, seed=1)
    finally:
        _k.simd_init(True)
    np.testing.assert_allclose(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert (fast[1] == slow[1]).all()
    np.testing.assert_array_equal(fast[2].top_token_ids, slow[2].top_token_ids)
    np.testing.assert_allclose(fast[2].top_logprobs, slow[2].top_logprobs, rtol=1e-5, atol=1e-5)


def test_same_tokens_for_every_thread_count():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 20000)).astype(np.float32)
    kw = dict(temperature=0.8, top_p=0.9, seed=11, step=3)
    one = sample(x, n_threads=1, **kw)
    for n in (2, 3, 8):
        np.testing.assert_array_equal(sample(x, n_threads=n, **kw), one)


def test_sampling_releases_the_gil():
    """A second Python thread keeps running while one long call is in the kernel."""
    import threading
    import time

    x = np.random.default_rng(0).standard_normal((256, 128256)).astype(np.float32)
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    sample(x, top_p=0.9, seed=1, n_threads=1)
    t1 = time.perf_counter()
    stop.set()
    t.join()
    during = [s for s in ticks if t0 < s < t1]
    assert t1 - t0 > 0.02, "call too short to observe"
    assert len(during) >= 3, f"the other thread ran {len(during)} times in {t1 - t0:.3f}s"


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_wheel_builds_with_compiled_kernels_and_pxd(tmp_path):
    out = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
         str(ROOT)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("tep_serve-*.whl"))  # the distribution is tep-serve
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    for mod in ("sampling", "pooling"):
        assert any(n.startswith(f"tep/_kernels/{mod}.") and n.endswith((".so", ".pyd"))
                   for n in names), f"{mod} extension missing from the wheel"
        assert f"tep/_kernels/{mod}.pxd" in names
        assert f"tep/_kernels/{mod}.pyi" in names
    assert "tep/_kernels/_typedefs.pxd" in names
    assert "tep/server/static/chat.html" in names   # the chat page at GET /
    assert not [n for n in names if n.endswith(".c")], "generated C shipped in the wheel"
    # the unpacked wheel imports and samples on its own
    site = tmp_path / "site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    code = ("import numpy as np, tep.kernels as k; "
            "x=np.arange(10, dtype=np.float32); "
            "assert k.sample(x, temperature=0) == 9; print(k.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(site) in r.stdout


def test_generated_c_is_not_committed():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "ls-files", "*.c", "*.so"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert r.stdout.strip() == ""
