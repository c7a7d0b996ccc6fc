"""The end of every benchmark script: the targets table and the JSON result file."""
from __future__ import annotations

import json
from pathlib import Path

from _machine import describe

__all__ = ["print_targets", "write_result"]


def print_targets(checks: list[dict]) -> None:
    """One PASS/MISS line per target check (dicts with name, value, op, target, pass)."""
    print("Targets")
    width = max((len(c["name"]) for c in checks), default=0)
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'MISS'}  {c['name']:<{width}} {c['value']:10.2f} "
              f"(target {c['op']} {c['target']})")


def write_result(path: Path | None, out: dict) -> dict:
    """Stamp the end-of-run load average into ``out["machine"]``, write ``out`` as JSON to
    ``path`` (if given) and return it."""
    out["machine"]["loadavg_end"] = describe()["loadavg_1_5_15"]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    return out
