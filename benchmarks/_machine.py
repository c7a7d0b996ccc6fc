"""A description of the machine a benchmark ran on (for the JSON and RESULTS.md)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

__all__ = ["describe"]


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, _, val = line.partition(":")
        info[key.strip()] = val.strip()
    return info


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe() -> dict:
    """CPU model, logical CPUs, cores, memory, load average now, OS and library versions."""
    import numpy as np

    cpu = _lscpu()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": cpu.get("Model name", platform.processor() or "?"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads_per_core": cpu.get("Thread(s) per core"),
        "cores_per_socket": cpu.get("Core(s) per socket"),
        "flags_simd": sorted(f for f in cpu.get("Flags", "").split()
                             if f in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")),
        "mem_gib": _mem_gib(),
        "loadavg_1_5_15": load,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE",
                                           "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                if k in os.environ},
    }
