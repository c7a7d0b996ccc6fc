"""The sampling, speculative-verification and n-gram kernels under AddressSanitizer, over
the extreme-float fuzz (sample, verify and verify_rejection) and the n-gram index fuzz.

A copy of the package is built with ``-fsanitize=address`` in a temporary directory (the
sampling, speculative and ngram extensions; the others are copied as built), and
tests/support/kernel_fuzz.py runs against it with libasan preloaded into the interpreter. Any read
or write outside a buffer - the failure mode of an empty or stale candidate set - aborts
the child with an ASan report instead of returning a plausible token. Bounded: the build
takes ~20-40 s on two cores, the fuzz stops after its case count or 25 s.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ_CASES, FUZZ_BUDGET_S = 1200, 25


def _libasan() -> str | None:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        return None
    r = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(sys.platform != "linux", reason="ASan preload recipe is Linux/gcc")
@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_sampling_kernel_fuzz_under_address_sanitizer(tmp_path):
    libasan = _libasan()
    if libasan is None:
        pytest.skip("no gcc with libasan on this machine")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "tep", src / "tep",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    shutil.copy(ROOT / "setup.py", src / "setup.py")
    # sampling, speculative (which calls sampling's row kernel) and ngram are built with
    # ASan; the other extensions are copied as built (tep.kernels imports every one)
    sanitized = ("sampling", "speculative", "ngram")
    for so in (ROOT / "tep" / "_kernels").glob("*.so"):
        if so.name.split(".")[0] not in sanitized:
            shutil.copy(so, src / "tep" / "_kernels" / so.name)
    built = {so.name.split(".")[0] for so in (src / "tep" / "_kernels").glob("*.so")}
    want = {p.stem for p in (src / "tep" / "_kernels").glob("*.pyx")}
    only = ",".join(sanitized) if want - built <= set(sanitized) else ""
    env = {**os.environ, "TEP_ONLY": only,
           "CFLAGS": "-fsanitize=address -fno-omit-frame-pointer -g",
           "LDFLAGS": "-fsanitize=address"}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run_env = {**os.environ, "PYTHONPATH": str(src), "LD_PRELOAD": libasan,
               "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"}
    where = subprocess.run(
        [sys.executable, "-c", "import tep._kernels.sampling as s; print(s.__file__)"],
        cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert str(src) in where.stdout, f"imported the wrong build: {where.stdout}"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "kernel_fuzz.py"),
                        str(FUZZ_CASES), str(FUZZ_BUDGET_S)],
                       cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    assert "cases ok" in r.stdout
    assert "ERROR: AddressSanitizer" not in r.stderr
