"""Reading a Prometheus exposition text in tests."""
from __future__ import annotations

from typing import Any

__all__ = ["parse"]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of an exposition text as ``{(name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[Any, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
