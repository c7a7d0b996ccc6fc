"""A BERT encoder over ragged batches: compiled forward pass, numpy reference.

Only what a sentence-embedding model needs: embeddings + LayerNorm, then N layers of
multi-head self-attention and a GELU feed-forward, each followed by a residual LayerNorm
(post-LN, exactly as Hugging Face's ``BertModel``). No torch: weights come from a
``model.safetensors`` file through the ``safetensors`` numpy API.

Layout: a batch is *ragged* — the token IDs of all sequences concatenated (``ids_n``, [N])
plus ``offsets_b1`` ([B+1]); sequence b is ``ids_n[offsets_b1[b]:offsets_b1[b+1]]``.
Nothing is padded, so a batch costs the sum of its sequences' costs and gives the same
vectors as the sequences one by one.

``BertEncoder.__call__`` runs the compiled kernel (:mod:`tep._kernels.encoder`): BLAS
sgemm from scipy (``scipy.linalg.cython_blas``) for the projections, fused row kernels for
bias + GELU, residual + LayerNorm and the per-sequence attention softmax, tep's own threads
(``n_threads``) and BLAS held at one thread. ``BertEncoder.forward_reference`` is the same
model in plain numpy (attention batched over groups of equal-length sequences), kept as the
independent reference the tests compare the kernel with.
"""
from __future__ import annotations

import ctypes
import glob
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tep._kernels import encoder as _kernel

__all__ = ["BertConfig", "BertEncoder", "gelu_erf", "scipy_sgemm", "blas_threads"]


@dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face ``config.json`` that the encoder reads."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_file(cls, path: str | Path) -> "BertConfig":
        """Read ``config.json``; raise ``ValueError`` for a model this encoder cannot run."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type {model_type!r} is not supported (only 'bert')")
        pos_type = raw.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"{path}: position_embedding_type {pos_type!r} is not supported")
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {act!r} is not supported ({sorted(_ACTIVATIONS)})")
        cfg = cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        return cfg


# --- activations --------------------------------------------------------------------------

# erfc(z) for z >= 0 as t*P(t)*exp(-z^2), t = 1/(1 + p z): Abramowitz & Stegun 7.1.26,
# absolute error <= 1.5e-7 — below float32 resolution of GELU's output, so this is the
# exact (erf) GELU for float32 purposes without scipy (math.erf per element is far too slow).
_AS_P = np.float32(0.3275911)
_AS_A = tuple(np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


# Elements per GELU pass: ~20 elementwise passes run over a block that stays in L2 cache
# instead of streaming the whole [N, intermediate] array through memory each time
# (measured 2.5x faster than whole-array passes for N ~ 6000 tokens).
_GELU_BLOCK = 1 << 16


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` of a contiguous float32 array, in place.

    Returns ``x`` (overwritten). Uses erf's symmetry: with ``q = erfc(|x| / sqrt 2)``,
    GELU is ``x - 0.5 x q`` for x >= 0 and ``0.5 x q`` for x < 0. Max abs error vs the
    float64 GELU is ~3e-7 (float32 rounding of the exact formula gives ~4e-7).
    """
    flat = x.reshape(-1)  # a view: x is contiguous
    n_blk = min(flat.size, _GELU_BLOCK)
    z_buf = np.empty(n_blk, np.float32)
    t_buf = np.empty(n_blk, np.float32)
    p_buf = np.empty(n_blk, np.float32)
    m_buf = np.empty(n_blk, np.bool_)
    for s in range(0, flat.size, _GELU_BLOCK):
        xv = flat[s:s + _GELU_BLOCK]
        n = xv.size
        z, t, p, neg = z_buf[:n], t_buf[:n], p_buf[:n], m_buf[:n]
        np.abs(xv, out=z)
        z *= _INV_SQRT2
        np.multiply(z, _AS_P, out=t)
        t += np.float32(1.0)
        np.reciprocal(t, out=t)
        np.multiply(t, _AS_A[0], out=p)
        for a in _AS_A[1:]:
            p += a
            p *= t
        np.square(z, out=z)
        np.negative(z, out=z)
        np.exp(z, out=z)
        p *= z                          # erfc(|x|/sqrt2)
        p *= xv
        p *= np.float32(0.5)            # h = 0.5 x erfc
        np.less(xv, np.float32(0.0), out=neg)
        xv -= p                         # x >= 0: x - h
        np.copyto(xv, p, where=neg)     # x < 0: h
    return x


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """tanh-approximated GELU (``gelu_new`` / ``gelu_pytorch_tanh``), in place."""
    inner = x * x
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= x
    inner *= np.float32(math.sqrt(2.0 / math.pi))
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= np.float32(0.5)
    x *= inner
    return x


def _relu(x: np.ndarray) -> np.ndarray:
    np.maximum(x, np.float32(0.0), out=x)
    return x


_ACTIVATIONS = {"gelu": gelu_erf, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": _relu}


def _layer_norm(x_nd: np.ndarray, gamma_d: np.ndarray, beta_d: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in place (biased variance, as torch)."""
    mean = x_nd.mean(axis=-1, keepdims=True)
    x_nd -= mean
    var = np.square(x_nd).mean(axis=-1, keepdims=True)
    var += np.float32(eps)
    np.sqrt(var, out=var)
    x_nd /= var
    x_nd *= gamma_d
    x_nd += beta_d
    return x_nd


# --- BLAS ---------------------------------------------------------------------------------

_blas_lock = threading.Lock()
_blas_state: dict[str, object] = {}


def _openblas_set_threads(n: int) -> str:
    """Set the thread count of the OpenBLAS that scipy's wheel bundles; say how (or why not).

    The library is already loaded (``scipy.linalg.cython_blas`` links it), so ``CDLL`` on
    its file returns the same handle. Other BLAS builds fall back to ``threadpoolctl`` when
    it is installed; otherwise ``OPENBLAS_NUM_THREADS`` set before start-up is what holds.
    """
    import scipy

    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)),
                                  "scipy.libs", "libscipy_openblas*.so*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for sym in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return f"{os.path.basename(path)}:{sym}({n})"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return f"unknown BLAS (OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})"
    threadpool_limits(n, user_api="blas")
    return f"threadpoolctl({n})"


def scipy_sgemm() -> object:
    """scipy's Fortran-BLAS ``sgemm`` as the capsule :class:`tep._kernels.encoder.Encoder`
    takes, with that BLAS set to one thread (the encoder's threads are its own).

    Raises ``ImportError`` naming the ``tep-serve[bert]`` extra when scipy is missing.
    """
    with _blas_lock:
        if "sgemm" not in _blas_state:
            try:
                from scipy.linalg import cython_blas
            except ImportError as e:  # pragma: no cover - scipy is part of tep-serve[bert]
                raise ImportError("the BERT encoder needs scipy (pip install 'tep-serve[bert]')") from e
            _blas_state["threads"] = _openblas_set_threads(1)
            _blas_state["sgemm"] = cython_blas.__pyx_capi__["sgemm"]
        return _blas_state["sgemm"]


def blas_threads() -> str:
    """How BLAS was held at one thread (for benchmark reports); empty before first use."""
    return str(_blas_state.get("threads", ""))


def default_threads() -> int:
    """Encoder threads when none are asked for: ``TEP_BERT_THREADS``, else the CPUs this
    process may run on (at most :data:`tep._kernels.encoder.MAX_THREADS`)."""
    env = os.environ.get("TEP_BERT_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"TEP_BERT_THREADS must be >= 1, got {env!r}")
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_kernel.MAX_THREADS, cpus or 1))


# --- weights ------------------------------------------------------------------------------

@dataclass
class _Layer:
    w_qkv: np.ndarray   # [D, 3D]  (input-major, so x @ w); Q columns pre-scaled by 1/sqrt(dh)
    b_qkv: np.ndarray   # [3D]
    w_o: np.ndarray     # [D, D]
    b_o: np.ndarray
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w_i: np.ndarray     # [D, I]
    b_i: np.ndarray
    w_out: np.ndarray   # [I, D]
    b_out: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray


def _find_prefix(names: set[str]) -> str:
    """Weights are saved as ``embeddings.*`` (BertModel) or ``bert.embeddings.*`` (heads)."""
    for prefix in ("", "bert.", "model."):
        if f"{prefix}embeddings.word_embeddings.weight" in names:
            return prefix
    raise ValueError("no '[bert.]embeddings.word_embeddings.weight' tensor: not a BERT checkpoint")


class BertEncoder:
    """BERT forward pass in numpy float32 over ragged batches.

    ``BertEncoder.from_folder(path)`` reads ``config.json`` and ``model.safetensors``.
    ``encoder(ids_n, offsets_b1)`` returns the last hidden states, float32 ``[N, D]``,
    rows in the same ragged order as the input.
    """

    def __init__(self, config: BertConfig, tensors: dict[str, np.ndarray]):
        self.config = config
        c = config
        d, h = c.hidden_size, c.num_attention_heads
        self.n_heads = h
        self.head_dim = d // h
        p = _find_prefix(set(tensors))

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            try:
                t = tensors[p + name]
            except KeyError:
                raise ValueError(f"checkpoint has no tensor {p + name!r}") from None
            if tuple(t.shape) != shape:
                raise ValueError(f"tensor {p + name!r} has shape {tuple(t.shape)}, expected {shape}")
            return np.ascontiguousarray(t, dtype=np.float32)

        self.word_emb = get("embeddings.word_embeddings.weight", (c.vocab_size, d))
        self.pos_emb = get("embeddings.position_embeddings.weight", (c.max_position_embeddings, d))
        # token_type_ids are always 0 for a single-sentence embedding model: fold type 0 into
        # the position table so embedding is one gather + one add.
        type0 = get("embeddings.token_type_embeddings.weight", (c.type_vocab_size, d))[0]
        self.pos_type_emb = self.pos_emb + type0
        self.emb_ln_g = get("embeddings.LayerNorm.weight", (d,))
        self.emb_ln_b = get("embeddings.LayerNorm.bias", (d,))

        scale = np.float32(1.0 / math.sqrt(self.head_dim))
        self.layers: list[_Layer] = []
        for i in range(c.num_hidden_layers):
            L = f"encoder.layer.{i}."
            wq = get(L + "attention.self.query.weight", (d, d)) * scale
            bq = get(L + "attention.self.query.bias", (d,)) * scale
            wk = get(L + "attention.self.key.weight", (d, d))
            bk = get(L + "attention.self.key.bias", (d,))
            wv = get(L + "attention.self.value.weight", (d, d))
            bv = get(L + "attention.self.value.bias", (d,))
            # torch Linear stores [out, in]; keep [in, out] contiguous so the hot path is x @ w.
            self.layers.append(_Layer(
                w_qkv=np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0).T),
                b_qkv=np.concatenate([bq, bk, bv]),
                w_o=np.ascontiguousarray(get(L + "attention.output.dense.weight", (d, d)).T),
                b_o=get(L + "attention.output.dense.bias", (d,)),
                ln1_g=get(L + "attention.output.LayerNorm.weight", (d,)),
                ln1_b=get(L + "attention.output.LayerNorm.bias", (d,)),
                w_i=np.ascontiguousarray(get(L + "intermediate.dense.weight", (c.intermediate_size, d)).T),
                b_i=get(L + "intermediate.dense.bias", (c.intermediate_size,)),
                w_out=np.ascontiguousarray(get(L + "output.dense.weight", (d, c.intermediate_size)).T),
                b_out=get(L + "output.dense.bias", (d,)),
                ln2_g=get(L + "output.LayerNorm.weight", (d,)),
                ln2_b=get(L + "output.LayerNorm.bias", (d,)),
            ))
        self._act = _ACTIVATIONS[c.hidden_act]
        self.kernel = _kernel.Encoder(
            word_emb=self.word_emb, pos_emb=self.pos_type_emb, ln_g=self.emb_ln_g,
            ln_b=self.emb_ln_b, eps=c.layer_norm_eps, act=c.hidden_act, sgemm=scipy_sgemm(),
            layers=[dict(vars(layer), n_heads=h) for layer in self.layers])
        self.n_threads = default_threads()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "BertEncoder":
        """Load ``config.json`` + ``model.safetensors`` from a Hugging Face model folder."""
        from safetensors.numpy import load_file  # optional dependency (tep-serve[bert])

        folder = Path(folder)
        config = BertConfig.from_file(folder / "config.json")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found (only safetensors weights are supported)")
        return cls(config, load_file(str(weights)))

    @property
    def hidden_size(self) -> int:
        """D, the width of the hidden states."""
        return self.config.hidden_size

    # --- forward --------------------------------------------------------------------------

    def __call__(self, ids_n: np.ndarray, offsets_b1: np.ndarray,
                 n_threads: int | None = None) -> np.ndarray:
        """Last hidden states for a ragged batch, by the compiled kernel: float32 [N, D].

        ``ids_n``: int token IDs [N]; ``offsets_b1``: int [B+1], non-decreasing from 0 to
        N. Each sequence is encoded on its own, as if it were the only input. ``n_threads``:
        encoder threads (default ``self.n_threads``, see :func:`default_threads`).
        Raises ``ValueError`` for bad offsets, out-of-vocabulary IDs or a sequence longer
        than ``max_position_embeddings``.
        """
        ids = np.ascontiguousarray(ids_n, dtype=np.int64)
        off = np.ascontiguousarray(offsets_b1, dtype=np.int64)
        if ids.ndim != 1 or off.ndim != 1 or off.size < 1:
            raise ValueError("ids_n must be 1-D and offsets_b1 1-D with B+1 entries")
        out = np.empty((ids.shape[0], self.config.hidden_size), np.float32)
        self.kernel.encode(ids, off, out, self.n_threads if n_threads is None else n_threads)
        return out

    def forward_reference(self, ids_n: np.ndarray, offsets_b1: np.ndarray) -> np.ndarray:
        """The same forward pass in plain numpy (the tests' reference for the kernel).

        ``ids_n``: int token IDs [N], all sequences concatenated; ``offsets_b1``: int [B+1],
        non-decreasing, ``offsets_b1[0] == 0`` and ``offsets_b1[-1] == N``. Each sequence is
        encoded on its own (positions restart at 0, no cross-sequence attention), exactly
        as if it had been the only input. Returns float32 [N, D], input order.
        Raises ``ValueError`` for out-of-vocabulary IDs or a sequence longer than
        ``max_position_embeddings``.
        """
        c = self.config
        ids_n = np.asarray(ids_n)
        offsets_b1 = np.asarray(offsets_b1, dtype=np.int64)
        if ids_n.ndim != 1 or offsets_b1.ndim != 1 or offsets_b1.size < 1:
            raise ValueError("ids_n must be 1-D and offsets_b1 1-D with B+1 entries")
        n = ids_n.shape[0]
        lengths_b = np.diff(offsets_b1)
        if offsets_b1[0] != 0 or offsets_b1[-1] != n or (lengths_b < 0).any():
            raise ValueError(f"offsets_b1 must go non-decreasing from 0 to N={n}")
        if n and (ids_n.min() < 0 or ids_n.max() >= c.vocab_size):
            raise ValueError(f"token IDs must be in [0, {c.vocab_size})")
        if lengths_b.size and lengths_b.max() > c.max_position_embeddings:
            raise ValueError(f"a sequence is longer than {c.max_position_embeddings} tokens")
        if n == 0:
            return np.zeros((0, c.hidden_size), np.float32)

        # Reorder sequences by length so equal lengths are contiguous: tok_perm[j] is the
        # input row of permuted row j; groups are (start, stop, n_seqs, L) over permuted rows.
        order_b = np.argsort(lengths_b, kind="stable")
        lens_sorted = lengths_b[order_b]
        starts_sorted = offsets_b1[:-1][order_b]
        seq_of_tok = np.repeat(np.arange(order_b.size), lens_sorted)
        new_starts = np.concatenate([[0], np.cumsum(lens_sorted)[:-1]])
        pos_n = np.arange(n) - new_starts[seq_of_tok]             # position within sequence
        tok_perm = starts_sorted[seq_of_tok] + pos_n
        groups = []
        uniq, first, counts = np.unique(lens_sorted, return_index=True, return_counts=True)
        for L, f, cnt in zip(uniq.tolist(), first.tolist(), counts.tolist()):
            if L:
                s = int(new_starts[f])
                groups.append((s, s + L * cnt, cnt, L))

        x = self.word_emb[ids_n[tok_perm]]
        x += self.pos_type_emb[pos_n]
        _layer_norm(x, self.emb_ln_g, self.emb_ln_b, c.layer_norm_eps)
        for layer in self.layers:
            x = self._layer(x, layer, groups)

        out = np.empty_like(x)
        out[tok_perm] = x
        return out

    def _layer(self, x_nd: np.ndarray, w: _Layer, groups) -> np.ndarray:
        eps = self.config.layer_norm_eps
        n, d = x_nd.shape
        h, dh = self.n_heads, self.head_dim
        qkv = x_nd @ w.w_qkv
        qkv += w.b_qkv
        ctx = np.empty((n, d), np.float32)
        for s, e, nb, L in groups:
            g = qkv[s:e].reshape(nb, L, 3, h, dh)
            q = g[:, :, 0].transpose(0, 2, 1, 3)      # [nb, H, L, dh]
            kt = g[:, :, 1].transpose(0, 2, 3, 1)     # [nb, H, dh, L]
            v = g[:, :, 2].transpose(0, 2, 1, 3)      # [nb, H, L, dh]
            sc = q @ kt                               # [nb, H, L, L], already scaled
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            ctx[s:e].reshape(nb, L, h, dh)[...] = (sc @ v).transpose(0, 2, 1, 3)
        attn = ctx @ w.w_o
        attn += w.b_o
        attn += x_nd
        x_nd = _layer_norm(attn, w.ln1_g, w.ln1_b, eps)

        inter = x_nd @ w.w_i
        inter += w.b_i
        self._act(inter)
        out = inter @ w.w_out
        out += w.b_out
        out += x_nd
        return _layer_norm(out, w.ln2_g, w.ln2_b, eps)
