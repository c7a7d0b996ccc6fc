"""Build the Cython kernels under tep/_kernels/.

Optimisation is on (-O3) but never -ffast-math: the kernels rely on NaN comparisons
(NaN logits are treated as -inf) and -ffinite-math-only would delete those checks.
OpenMP is used when the compiler accepts -fopenmp; otherwise the kernels build serial.

TEP_DEBUG=1 turns bounds/wraparound/initialised checks back on and builds with -O0 -g.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
DEBUG = os.environ.get("TEP_DEBUG", "") not in ("", "0")


def _compiler_has_openmp() -> bool:
    """Compile and link a tiny OpenMP program with the compiler Python was built with."""
    if os.environ.get("TEP_NO_OPENMP", "") not in ("", "0"):
        return False
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()
    if shutil.which(cc[0]) is None:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "t.c"
        c.write_text(src)
        try:
            r = subprocess.run(cc + ["-fopenmp", str(c), "-o", str(Path(tmp) / "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


OPENMP = _compiler_has_openmp()

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
link_args = []
if OPENMP:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if sys.platform == "win32":  # MSVC spells these differently; keep defaults there.
    compile_args, link_args = (["/openmp"] if OPENMP else []), []

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}

extensions = [
    Extension(
        f"tep._kernels.{p.stem}",
        [str(p.relative_to(HERE))],
        include_dirs=[np.get_include(), str(HERE / "tep" / "_kernels")],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("TEP_HAVE_OPENMP", "1" if OPENMP else "0")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for p in sorted((HERE / "tep" / "_kernels").glob("*.pyx"))
    # TEP_ONLY=name[,name] builds a subset (handy while another kernel is mid-edit).
    if not os.environ.get("TEP_ONLY") or p.stem in os.environ["TEP_ONLY"].split(",")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=os.environ.get("TEP_ANNOTATE", "") not in ("", "0"),
    ),
)
