"""A GGUF model as a :class:`tep.engine.Model`, through llama-cpp-python's low-level API.

One engine step is one ``llama_decode``: every token of the step goes into one
``llama_batch`` whose arrays are numpy buffers owned here (filled with slice assignments,
no per-token Python), each token with one seq id. llama-cpp-python calls the library
through ``ctypes.CDLL``, which releases the GIL for the duration of the call, so the HTTP
threads run while llama.cpp computes. The logits come back as a numpy view of llama.cpp's
own output buffer (no copy).

KV cache: one stream per sequence slot (``kv_unified=False``, as ``llama-server -np N``)
so a sequence's attention never looks at another's cells, and flash attention on
(llama.cpp's "auto"). Slots keep what they held after a sequence ends; the next sequence
reuses the longest cached prefix of its prompt and only the rest is computed. llama.cpp
batches only adjacent slots together, so running sequences are kept in adjacent slots
(copying streams where needed) and each step's tokens go to llama.cpp in slot order
(:mod:`tep.backends.llamacpp_slots`).

Exact mode (the default, ``exact=True``): a token's logits and KV are the same bits
however its sequence was batched, chunked or cached. llama.cpp's CPU flash attention
has three kernels and picks one per micro-batch: a tiled one when a stream has >= 64
(``GGML_FA_TILE_Q``) query tokens in it, a KV-split one (a reduction whose partition
follows the thread count and the padded cache length) when the micro-batch is one token
of one stream and that stream's padded cache is >= 512 cells, and a per-row one
otherwise. The per-row kernel's result for a token depends only on the cells before it.
The tiled and KV-split kernels exist only for an f16 (or f32) KV cache. With the default
f16 cache exact mode switches the context's CPU backend to llama.cpp's reference kernels
(:mod:`tep.backends.llamacpp_reference`), under which only the per-row kernel runs, and
feeds each step as it comes. Where that switch cannot be found, it falls back to feeding
rules that keep the other two kernels from running: each sequence in pieces of at most
``block_tokens`` (< 64) tokens, pieces of equal length to llama.cpp together sorted by
slot (so its micro-batch split never strands one token of one stream), and a token at
position >= 255 that would be alone in its micro-batch (no adjacent slot decoding with
it) fed with the token before it again (its cell is rewritten with the same bits). With
``kv_type="q8_0"`` (an 8-bit cache) the per-row kernel is the only one, so exact mode
needs neither and feeds each step as it comes.
The cost and the evidence: docs/DETERMINISM.md.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from tep.backends.llamacpp_slots import SlotTable
from tep.engine.model import StepBatch

__all__ = ["LlamaCppModel", "PrefixCacheStats", "StepTimes"]

log = logging.getLogger("tep.llamacpp")

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# KV cache element types (ggml type ids). Only f16 has llama.cpp's tiled and KV-split
# flash-attention kernels, so only f16 needs exact mode's feeding rules.
KV_TYPES = {"f16": 1, "q8_0": 8}
_MAX_SLOTS = 256  # llama.cpp's LLAMA_MAX_SEQ
_FA_TILE_Q = 64   # llama.cpp CPU: >= this many query rows of a stream -> the tiled kernel
# a one-token, one-stream micro-batch takes the KV-split kernel once the stream's padded
# cache (a multiple of 256 cells) reaches 512, i.e. from position 256 on; 255 leaves a margin
_LONE_TOKEN_LAST_SAFE = 254


class PrefixCacheStats(NamedTuple):
    """Prompt tokens placed so far and how many of them were found in a slot's cache;
    stream copies made to place a sequence next to the busy slots (``copies``) and to
    close a gap left by ended sequences (``moves``)."""

    prompt_tokens: int
    reused_tokens: int
    copies: int = 0
    moves: int = 0

    @property
    def hit_rate(self) -> float:
        """reused / prompt tokens (0 when none)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class StepTimes(NamedTuple):
    """Where ``forward`` spent its time since the model was built (nanoseconds)."""

    steps: int
    forward_ns: int   # all of forward(), llama_decode included
    decode_ns: int    # inside llama_decode (+ the logits view)

    @property
    def own_share(self) -> float:
        """Fraction of forward() spent outside llama_decode."""
        return 1.0 - self.decode_ns / self.forward_ns if self.forward_ns else 0.0


def _llama():
    import llama_cpp  # noqa: PLC0415 - optional dependency, imported on first use

    return llama_cpp


class LlamaCppModel:
    """Any GGUF file, batched over sequence slots.

    Args:
        model_path: the ``.gguf`` file.
        context_size: positions per sequence (prompt + completion); llama.cpp rounds it
            up to a multiple of 256. Default 2048 (never more than the model was trained on).
        max_num_seqs: sequences decoded at once (= KV-cache slots). Default 16.
        n_threads: CPU threads for decoding and prompt processing (default: all cores).
        max_batch_tokens: most tokens in one ``forward`` call (llama.cpp's ``n_batch``);
            larger steps are split into several decodes. Default 512.
        flash_attn: "auto" (default; on where the backend supports it), "on" or "off".
        kv_unified: one KV buffer shared by all slots instead of one stream per slot.
        exact: batching, chunking and the prefix cache never change a logit (see the
            module docstring). Default True.
        block_tokens: most tokens of one sequence in one llama.cpp call when exact mode
            feeds by its rules (an f16 KV cache without reference kernels; 2..63).
            Default 32.
        kv_type: the KV cache's element type: "f16" (default, llama.cpp's) or "q8_0"
            (8-bit: half the memory, and llama.cpp has only its per-row attention kernel
            for it, so exact mode feeds steps as they come and never feeds a token twice).
        prefix_cache: reuse a slot's cached prefix (default True).
        reference_kernels: in exact mode with an f16 KV cache, switch llama.cpp's CPU
            backend to its reference kernels (:mod:`tep.backends.llamacpp_reference`;
            default True), so steps go to llama.cpp as they come. Where that cannot be
            done, or with False, exact mode keeps to its feeding rules instead.
            ``self.reference_kernels`` says which one runs and
            ``self.reference_kernels_note`` why not, when not.
        model_name: the id served in ``/v1/models`` (default: the file's stem).
        verbose: let llama.cpp log at INFO level (default: errors only).

    Attributes (the optional parts of the engine's Model contract):
        vocab_size, chat_template (Jinja from ``tokenizer.chat_template``, or None),
        bos_token / eos_token (their text, "" when the vocabulary has none),
        eog_token_ids (every id llama.cpp calls end-of-generation: EOS, EOT, ...),
        context_size (positions per sequence), max_num_seqs, max_batch_tokens,
        add_bos (whether plain-text prompts get BOS).

    The array ``forward`` returns is a view of llama.cpp's logits buffer: valid until the
    next ``forward`` call.
    """

    def __init__(self, model_path: str | os.PathLike, *, context_size: int = 2048,
                 max_num_seqs: int = 16, n_threads: int | None = None,
                 max_batch_tokens: int = 512, flash_attn: str = "auto",
                 kv_unified: bool = False, exact: bool = True, block_tokens: int = 32,
                 prefix_cache: bool = True, model_name: str | None = None,
                 verbose: bool = False, kv_type: str = "f16",
                 reference_kernels: bool = True) -> None:
        llama_cpp = _llama()
        self._lib = llama_cpp
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        if not 1 <= max_num_seqs <= _MAX_SLOTS:
            raise ValueError(f"max_num_seqs must be in [1, {_MAX_SLOTS}], got {max_num_seqs}")
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if kv_type != "f16" and flash_attn == "off":
            raise ValueError(f"kv_type {kv_type!r} needs flash attention (llama.cpp quantizes "
                             "the V cache only with it): use flash_attn 'auto' or 'on', or "
                             "kv_type 'f16'")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {sorted(_FLASH_ATTN)}, got {flash_attn!r}")
        if exact and kv_unified:
            raise ValueError("exact mode needs one KV stream per slot (kv_unified=False)")
        if not 2 <= block_tokens < _FA_TILE_Q:
            raise ValueError(f"block_tokens must be in [2, {_FA_TILE_Q - 1}], got {block_tokens}")
        threads = n_threads or os.cpu_count() or 1
        if threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")

        logging.getLogger("llama-cpp-python").setLevel(logging.INFO if verbose else logging.ERROR)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {path} (not a GGUF model?)")
        self._ctx = None
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            n_train = llama_cpp.llama_model_n_ctx_train(self._model)
            per_seq = min(context_size, n_train) if n_train > 0 else context_size
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = per_seq * max_num_seqs
            cparams.n_seq_max = max_num_seqs
            cparams.n_batch = max_batch_tokens
            cparams.n_ubatch = min(max_batch_tokens, 512)
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            cparams.flash_attn_type = _FLASH_ATTN[flash_attn]
            cparams.kv_unified = kv_unified
            cparams.type_k = cparams.type_v = KV_TYPES[kv_type]
            cparams.embeddings = False
            cparams.no_perf = True
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ValueError(f"llama.cpp could not create a context for {path} "
                                 f"(context {per_seq} x {max_num_seqs} sequences)")
            self._mem = llama_cpp.llama_get_memory(self._ctx)
            # per sequence: n_ctx / n_seq_max padded to 256 (unified: the whole buffer,
            # but each sequence is still held to what was asked)
            self.context_size = per_seq if kv_unified else int(llama_cpp.llama_n_ctx_seq(self._ctx))
            self.max_num_seqs = int(llama_cpp.llama_n_seq_max(self._ctx))
            self.max_batch_tokens = int(llama_cpp.llama_n_batch(self._ctx))
            self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
            self.n_threads = threads
            self.flash_attn = flash_attn
            self.kv_unified = kv_unified
            self.exact = exact
            self.kv_type = kv_type
            # exact mode with an f16 cache (the only one with the kernels to avoid):
            # llama.cpp's reference kernels where they can be switched on (then every
            # step goes to llama.cpp as it comes), else the feeding rules. Not for q8_0:
            # it needs neither, and its reference path rounds differently from
            # llama.cpp's usual one (measured), so it would lose llama.cpp's numbers.
            # why the reference kernels do not run (None: they do)
            self.reference_kernels_note: str | None = (
                "exact mode is off" if not exact
                else "reference_kernels=False" if not reference_kernels
                else f"not used with a {kv_type} cache" if kv_type != "f16" else None)
            if self.reference_kernels_note is None:
                from tep.backends.llamacpp_reference import use_reference_kernels

                self.reference_kernels_note = use_reference_kernels(
                    llama_cpp.llama_cpp._lib, self._ctx)
                if self.reference_kernels_note is not None:
                    log.warning("exact mode without llama.cpp's reference kernels (%s): "
                                "feeding rules instead", self.reference_kernels_note)
            self._exact_feed = exact and kv_type == "f16" and not self.reference_kernels
            self.block_tokens = block_tokens
            self.prefix_cache = prefix_cache
            self.n_ubatch = int(cparams.n_ubatch)
            self.model_path = path
            self.model_name = model_name or path.name.removesuffix(".gguf")
            self._read_vocab()
            self._fingerprint = self._make_fingerprint()
        except BaseException:
            self.close()
            raise
        # a stream copy moves the whole stream: worth ~1 prompt token per 256 cells
        self._slots = SlotTable(self.max_num_seqs,
                                copy_min_tokens=max(4, self.context_size // 256))
        self._slot_of = np.full(self.max_num_seqs, -1, dtype=np.int32)  # engine id -> slot
        if self._exact_feed and self.max_batch_tokens < 2:
            raise ValueError("exact mode with an f16 KV cache needs max_batch_tokens >= 2")
        self._block = max(2, min(block_tokens, self.max_batch_tokens))
        # most tokens a step of one token per sequence can have (more: a prompt chunk)
        self._singles_max = min(self.max_num_seqs, self.max_batch_tokens, self.n_ubatch)
        self._alloc_batch(self.max_batch_tokens)
        self._views: dict[tuple, np.ndarray] = {}   # logits views by (address, rows)
        # llama_get_logits returning the address as a plain int (it may wait for an
        # accelerator's step, so the GIL is released as for any ctypes call)
        self._logits_addr = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
            ctypes.cast(llama_cpp.llama_get_logits, ctypes.c_void_p).value)
        self._steps = 0
        self._forward_ns = 0
        self._decode_ns = 0

    # ------------------------------------------------------------------ metadata, vocab

    def _meta(self, key: str) -> str | None:
        llama_cpp = self._lib
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lib.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _read_vocab(self) -> None:
        llama_cpp, vocab = self._lib, self._vocab
        self.chat_template: str | None = self._meta("tokenizer.chat_template")
        self.bos_token_id = int(llama_cpp.llama_vocab_bos(vocab))
        self.eos_token_id = int(llama_cpp.llama_vocab_eos(vocab))
        self.bos_token = self._token_text(self.bos_token_id)
        self.eos_token = self._token_text(self.eos_token_id)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        is_eog = llama_cpp.llama_vocab_is_eog
        self.eog_token_ids: tuple[int, ...] = tuple(
            t for t in range(self.vocab_size) if is_eog(vocab, t))
        # byte pieces of every token (special tokens render as b"", as llama-server does)
        buf = ctypes.create_string_buffer(256)
        pieces = []
        to_piece = llama_cpp.llama_token_to_piece
        for t in range(self.vocab_size):
            n = to_piece(vocab, t, buf, 256, 0, False)
            if n < 0:  # longer than 256 bytes: ask again with room
                big = ctypes.create_string_buffer(-n)
                n = to_piece(vocab, t, big, -n, 0, False)
                pieces.append(big.raw[:n])
            else:
                pieces.append(buf.raw[:n])
        self._pieces = pieces
        self._special: dict[int, bytes] = {}   # special tokens' spelled-out text, by id

    def list_models(self) -> list[str]:
        """The one model id served."""
        return [self.model_name]

    def _make_fingerprint(self) -> str:
        from tep import __version__
        from tep.backend.fingerprint import file_digest, fingerprint_of

        info = self._lib.llama_print_system_info()
        return fingerprint_of({
            "model": file_digest(self.model_path), "tep": __version__,
            "llama_cpp": getattr(self._lib, "__version__", "?"),
            "system": info.decode(errors="replace") if isinstance(info, bytes) else str(info),
            "n_threads": self.n_threads, "n_batch": self.max_batch_tokens,
            "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn,
            "kv_unified": self.kv_unified, "exact": self.exact,
            "block_tokens": self.block_tokens, "kv_type": self.kv_type,
            "reference_kernels": self.reference_kernels})

    @property
    def reference_kernels(self) -> bool:
        """Whether llama.cpp's reference CPU kernels run (``reference_kernels_note`` says
        why not, when not)."""
        return self.reference_kernels_note is None

    def fingerprint(self) -> str:
        """``system_fingerprint``: the model file's digest, tep's and llama.cpp's
        versions, the CPU features llama.cpp was built for, and the settings that
        change the arithmetic (threads, batch sizes, KV cache type, exact mode, its
        block and whether the reference kernels run)."""
        return self._fingerprint

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Text -> token ids with the model's tokenizer. Special tokens written in the text
        (``<|im_start|>``) become their ids. ``add_special`` adds BOS when the vocabulary
        asks for it, unless the text already starts with the BOS text."""
        data = text.encode("utf-8")
        if add_special and self.bos_token and text.startswith(self.bos_token):
            add_special = False
        n_max = len(data) + 8
        while True:
            buf = (ctypes.c_int32 * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max,
                                         add_special, True)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> bytes:
        """Token ids -> the bytes they stand for (may end inside a UTF-8 character).
        Special tokens (``<|im_end|>``) are empty, as in generated text; ``special=True``
        spells them out (``/detokenize``, so that text with special tokens round-trips)."""
        pieces, v = self._pieces, self.vocab_size
        try:
            if token_ids and min(token_ids) < 0:
                raise IndexError
            if special:
                return b"".join([pieces[t] or self._special_piece(t) for t in token_ids])
            return b"".join([pieces[t] for t in token_ids])
        except IndexError:
            bad = next(t for t in token_ids if not 0 <= t < v)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {v})") from None

    def _special_piece(self, token: int) -> bytes:
        """The text of a token whose plain piece is empty (a special token), cached."""
        got = self._special.get(token)
        if got is None:
            buf = ctypes.create_string_buffer(256)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, big, -n, 0, True)
                buf = big
            got = self._special[token] = buf.raw[:max(n, 0)]
        return got

    # ------------------------------------------------------------------ batch buffers

    def _alloc_batch(self, n: int) -> None:
        llama_cpp = self._lib
        self._tok = np.zeros(n, dtype=np.int32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._nseq = np.ones(n, dtype=np.int32)       # one seq id per token, always
        self._seq = np.zeros(n, dtype=np.int32)
        self._want = np.zeros(n, dtype=np.int8)
        # seq_id is int32**: pointer i -> self._seq[i]
        self._seq_ptrs = (self._seq.ctypes.data + 4 * np.arange(n, dtype=np.uint64)).astype(np.uint64)
        b = llama_cpp.llama_batch()
        b.n_tokens = 0
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        b.embd = None
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs.ctypes.data,
                               ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
        b.logits = self._want.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b

    # ------------------------------------------------------------------ the engine contract

    def reuse_prefix(self, seq_id: int, prompt: Sequence[int]) -> int:
        """Place a new sequence in the free slot with the longest cached prefix of
        ``prompt``; returns how many prompt tokens need not be fed (< len(prompt))."""
        self._check_seq_id(seq_id)
        p = self._slots.acquire(seq_id, prompt, reuse=self.prefix_cache)
        if p.copy_from is not None:   # bit for bit, applied before the next decode
            self._lib.llama_memory_seq_cp(self._mem, p.copy_from, p.slot, -1, -1)
        self._lib.llama_memory_seq_rm(self._mem, p.slot, p.drop_from, -1)
        self._slot_of[seq_id] = p.slot
        return p.reused

    def rewind(self, seq_id: int, n_tokens: int) -> None:
        """Drop ``seq_id``'s cache from position ``n_tokens`` on (speculative decoding:
        the KV of rejected draft tokens), with ``llama_memory_seq_rm``."""
        self._check_seq_id(seq_id)
        s = int(self._slot_of[seq_id])
        if s < 0:
            return
        try:
            self._write(s, n_tokens, ())
        except ValueError:     # the slot holds fewer tokens: nothing to drop
            return

    def _write(self, slot: int, first_pos: int, tokens: Sequence[int]) -> None:
        """Record ``tokens`` as written at ``first_pos...`` of ``slot``; when that rewinds
        the slot, llama.cpp's cells from ``first_pos`` on are removed first. Raises
        ValueError for a position past what the slot holds (nothing changes then)."""
        drop = self._slots.fed(slot, first_pos, tokens)
        if drop >= 0:
            self._lib.llama_memory_seq_rm(self._mem, slot, drop, -1)

    def release(self, seq_id: int) -> None:
        """The sequence ended: its slot becomes free and keeps its cache for reuse."""
        if 0 <= seq_id < self.max_num_seqs:
            self._slots.release(seq_id)
            self._slot_of[seq_id] = -1

    def clear_prefix_cache(self) -> None:
        """Forget what the free slots hold (their cache cells are removed); running
        sequences keep theirs."""
        for s in self._slots.free_slots():
            self._lib.llama_memory_seq_rm(self._mem, s, 0, -1)
            self._slots.forget(s)

    def structured_tokenizer(self) -> Any:
        """llguidance's view of this vocabulary (structured outputs), built once: each
        token's bytes and every end-of-generation id."""
        from tep.structured.tokenizer import llamacpp_tokenizer

        return llamacpp_tokenizer(self, vocab=self._vocab, eos_ids=self.eog_token_ids,
                                  n_vocab=self.vocab_size)

    def _check_seq_id(self, seq_id: int) -> None:
        if not 0 <= seq_id < self.max_num_seqs:
            raise ValueError(f"seq_id {seq_id} outside [0, {self.max_num_seqs})")

    def forward(self, batch: StepBatch) -> np.ndarray:
        """One ``llama_decode`` over every token of ``batch``; float32 logits
        ``[batch.n_logit_rows, vocab_size]`` (a view, valid until the next call)."""
        t0 = time.perf_counter_ns()
        n = batch.n_tokens
        if n == 0:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        for mv in self._slots.compact():   # sequences ended and left a gap: close it
            self._lib.llama_memory_seq_cp(self._mem, mv.src, mv.dst, -1, -1)
            if mv.seq_id is not None:
                self._slot_of[mv.seq_id] = mv.dst
        out = self._forward_one(batch) if n == 1 else self._forward_singles(batch)
        if out is not None:
            self._steps += 1
            self._forward_ns += time.perf_counter_ns() - t0
            return out
        seq = np.asarray(batch.seq_ids, dtype=np.int32)
        pos = np.asarray(batch.positions, dtype=np.int32)
        if seq.min() < 0 or seq.max() >= self.max_num_seqs:
            raise ValueError(f"seq ids must be in [0, {self.max_num_seqs})")
        if pos.min() < 0 or pos.max() >= self.context_size:
            raise ValueError(f"position {int(pos.max())} is past the context of "
                             f"{self.context_size} tokens per sequence")
        # segments: each sequence's tokens are contiguous and in position order
        cut = np.flatnonzero(seq[1:] != seq[:-1]) + 1
        if n > 1 and np.any(np.diff(pos)[seq[1:] == seq[:-1]] != 1):
            raise ValueError("a sequence's positions in a step must be consecutive")
        starts = np.concatenate(([0], cut)).tolist()
        ends = np.concatenate((cut, [n])).tolist()
        tok = np.asarray(batch.token_ids, dtype=np.int32)
        if tok.min() < 0 or tok.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        want = np.asarray(batch.logits, dtype=bool)
        table, rm = self._slots, self._lib.llama_memory_seq_rm
        try:
            out = self._feed(table, rm, seq, pos, tok, want, starts, ends, n)
        except BaseException:
            # what these slots hold is no longer known: forget it rather than reuse it
            self._drop_slots(np.unique(self._slot_of[seq][self._slot_of[seq] >= 0]))
            raise
        self._steps += 1
        self._forward_ns += time.perf_counter_ns() - t0
        return out

    def _forward_one(self, batch: StepBatch) -> np.ndarray | None:
        """One token of one placed sequence (one stream decoding: the most common step),
        with the calls the general path makes for it and none of its array bookkeeping
        (scalar stores into the batch buffers); None when the general path must decide (an
        unplaced sequence, a position past the lone-token limit in exact mode, anything
        out of range: its errors)."""
        sid, p0, t = int(batch.seq_ids[0]), int(batch.positions[0]), int(batch.token_ids[0])
        if not (0 <= sid < self.max_num_seqs and 0 <= p0 < self.context_size
                and 0 <= t < self.vocab_size):
            return None
        if self._exact_feed and p0 > _LONE_TOKEN_LAST_SAFE:
            return None
        s = int(self._slot_of[sid])
        if s < 0:
            return None
        want = bool(batch.logits[0])
        try:
            self._write(s, p0, (t,))
            self._tok[0] = t
            self._pos[0] = p0
            self._seq[0] = s
            self._want[0] = want
            return self._run_decode(1, int(want))
        except BaseException:
            self._drop_slots(np.array([s]))
            raise

    def _forward_singles(self, batch: StepBatch) -> np.ndarray | None:
        """A decode step of several placed sequences, one token each, all wanting logits,
        every position within the lone-token limit in exact mode (a busy server's usual
        step): what the general path does for it — fed in slot order, rows returned in
        batch order — in list arithmetic instead of its per-segment numpy bookkeeping.
        None when the general path must decide (its errors included)."""
        n = batch.n_tokens
        if n > self._singles_max:
            return None     # a prompt chunk (more tokens than sequences): no list work
        sids = np.asarray(batch.seq_ids).tolist()
        ps = np.asarray(batch.positions).tolist()
        ts = np.asarray(batch.token_ids).tolist()
        if (len(set(sids)) != n or min(sids) < 0 or max(sids) >= self.max_num_seqs
                or min(ps) < 0 or max(ps) >= self.context_size
                or min(ts) < 0 or max(ts) >= self.vocab_size
                or not bool(np.all(batch.logits))):
            return None
        if self._exact_feed and max(ps) > _LONE_TOKEN_LAST_SAFE:
            return None
        slots = self._slot_of[sids].tolist()
        if min(slots) < 0:
            return None
        order = sorted(range(n), key=slots.__getitem__)
        sorted_ = all(order[i] == i for i in range(n))
        try:
            for i in order:
                self._write(slots[i], ps[i], (ts[i],))
            self._tok[:n] = ts if sorted_ else [ts[i] for i in order]
            self._pos[:n] = ps if sorted_ else [ps[i] for i in order]
            self._seq[:n] = sorted(slots)
            self._want[:n] = 1
            out = self._run_decode(n, n)
        except BaseException:
            self._drop_slots(np.unique(np.array(slots)))
            raise
        if sorted_:
            return out
        back = np.empty_like(out)
        back[order] = out           # row j of the call is the batch's row order[j]
        return back

    def _feed(self, table, rm, seq, pos, tok, want, starts, ends, n):  # noqa: ANN001, ANN202
        slots = self._slot_of[seq]
        for a in starts:
            if int(slots[a]) < 0:  # no reuse_prefix call: place it with nothing reused
                sid = int(seq[a])
                s = table.acquire(sid, ()).slot
                rm(self._mem, s, 0, -1)
                self._slot_of[sid] = s
                slots = self._slot_of[seq]
        first = slots[starts]
        if len(starts) > 1 and bool(np.any(first[1:] <= first[:-1])):
            # llama.cpp puts only consecutive slot ids, in batch order, into one
            # micro-batch: feed the segments sorted by slot, give the rows back in order
            order = np.argsort(first, kind="stable")
            perm = np.concatenate([np.arange(starts[i], ends[i]) for i in order])
            lens = np.array(ends)[order] - np.array(starts)[order]
            e = np.cumsum(lens)
            out = self._feed_placed(table, pos[perm], tok[perm], slots[perm], want[perm],
                                    (e - lens).tolist(), e.tolist(), n)
            back = np.empty_like(out)
            back[(np.cumsum(want) - 1)[perm][want[perm]]] = out
            return back
        return self._feed_placed(table, pos, tok, slots, want, starts, ends, n)

    def _feed_placed(self, table, pos, tok, slots, want, starts, ends, n):  # noqa: ANN001, ANN202
        if self._exact_feed:
            return self._feed_exact(table, pos, tok, slots, starts, ends, want)
        for a, b in zip(starts, ends):
            s = int(slots[a])
            self._write(s, int(pos[a]), tok[a:b].tolist())
        if n <= self.max_batch_tokens:
            out = self._decode(tok, pos, slots, want, 0, n)
        else:  # several decodes; each overwrites the logits buffer, so copy
            parts = [self._decode(tok, pos, slots, want, a, min(a + self.max_batch_tokens, n)).copy()
                     for a in range(0, n, self.max_batch_tokens)]
            out = np.concatenate(parts)
        return out

    def _cuts(self, n: int) -> list[tuple[int, int]]:
        """(offset, length) pieces of an n-token segment: at most ``block`` tokens each,
        and no 1-token piece unless n == 1 (the last piece borrows one)."""
        block = self._block
        cuts = [(a, min(block, n - a)) for a in range(0, n, block)]
        if len(cuts) > 1 and cuts[-1][1] == 1:
            a, m = cuts[-2]
            cuts[-2] = (a, m - 1)
            cuts[-1] = (a + m - 1, 2)
        return cuts

    def _feed_exact(self, table, pos, tok, slots, starts, ends, want):  # noqa: ANN001, ANN202
        """Feed every segment in pieces that only ever reach llama.cpp's per-row flash
        attention kernel (see the module docstring); logit rows in batch order."""
        n_rows = int(np.count_nonzero(want))
        row_of = np.cumsum(want) - 1          # token index -> its logit row
        rounds: list[list[tuple]] = []        # rounds[r]: the r-th piece of each segment
        simple, paired = True, False
        # one-token segments go to llama.cpp in one call, sorted by slot; a run of adjacent
        # slots shares a micro-batch (several streams: not the KV-split kernel), so only a
        # slot without a neighbour there needs the lone-token rule. Valid while that call
        # is not cut (it fits one decode and one micro-batch).
        singles = {int(slots[a]) for a, b in zip(starts, ends) if b - a == 1}
        if len(singles) > min(self.max_batch_tokens, self.n_ubatch):
            singles = set()
        for a, b in zip(starts, ends):
            s, p0 = int(slots[a]), int(pos[a])
            t, w = tok[a:b], want[a:b]
            idx = np.arange(a, b)
            if b - a == 1 and p0 > _LONE_TOKEN_LAST_SAFE and (
                    s - 1 in singles or s + 1 in singles):
                paired = True   # safe only if llama.cpp sees the slots sorted
            elif b - a == 1 and p0 > _LONE_TOKEN_LAST_SAFE:
                # one token alone would take the KV-split kernel: feed the one before it
                # again (same inputs, same kernel: its cell gets the same bits back)
                held = table.tokens(s)
                if len(held) < p0:
                    raise ValueError(f"slot {s} holds {len(held)} tokens; cannot write at "
                                     f"position {p0}")
                t = np.array([held[p0 - 1], t[0]], dtype=np.int32)
                w = np.array([False, w[0]])
                idx = np.array([-1, a])
                p0 -= 1
                simple = False
            self._write(s, p0, t.tolist())
            for r, (o, m) in enumerate(self._cuts(len(t))):
                if r == len(rounds):
                    rounds.append([])
                rounds[r].append((s, p0 + o, t[o:o + m], w[o:o + m], idx[o:o + m]))
        if simple and len(rounds) == 1 and len({len(pc[2]) for pc in rounds[0]}) == 1 \
                and len(tok) <= self.max_batch_tokens and \
                (not paired or bool(np.all(np.diff(slots[list(starts)]) > 0))):
            # one call of equal pieces in batch order: llama.cpp's buffer, no copy
            return self._decode(tok, pos, slots, want, 0, len(tok))
        out = np.empty((n_rows, self.vocab_size), dtype=np.float32)
        cap = self.max_batch_tokens
        for pieces in rounds:
            by_len: dict[int, list[tuple]] = {}
            for pc in pieces:
                by_len.setdefault(len(pc[2]), []).append(pc)
            for m, group in sorted(by_len.items()):
                group.sort(key=lambda pc: pc[0])   # adjacent slots share a micro-batch
                per_call = max(1, cap // m)
                for c in range(0, len(group), per_call):
                    part = group[c:c + per_call]
                    g_tok = np.concatenate([pc[2] for pc in part])
                    g_pos = np.concatenate([np.arange(pc[1], pc[1] + m, dtype=np.int32)
                                            for pc in part])
                    g_slot = np.repeat(np.array([pc[0] for pc in part], np.int32), m)
                    g_want = np.concatenate([pc[3] for pc in part])
                    g_idx = np.concatenate([pc[4] for pc in part])
                    rows = self._decode(g_tok, g_pos, g_slot, g_want, 0, len(g_tok))
                    if rows.shape[0]:
                        out[row_of[g_idx[g_want]]] = rows
        return out

    def _decode(self, tok: np.ndarray, pos: np.ndarray, slots: np.ndarray,
                want: np.ndarray, a: int, b: int) -> np.ndarray:
        m = b - a
        self._tok[:m] = tok[a:b]
        self._pos[:m] = pos[a:b]
        self._seq[:m] = slots[a:b]
        self._want[:m] = want[a:b]
        return self._run_decode(m, int(np.count_nonzero(want[a:b])))

    def _run_decode(self, m: int, rows: int) -> np.ndarray:
        """``llama_decode`` of the first ``m`` tokens in the batch buffers, ``rows`` of
        them asking for logits; their logits ``[rows, V]``."""
        self._batch.n_tokens = m
        t = time.perf_counter_ns()
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            self._decode_ns += time.perf_counter_ns() - t
            raise RuntimeError(f"llama_decode failed (status {rc}) on a step of {m} tokens")
        if rows == 0:
            out = np.empty((0, self.vocab_size), dtype=np.float32)
        else:
            out = self._logits_view(rows)
        self._decode_ns += time.perf_counter_ns() - t
        return out

    def _logits_view(self, rows: int) -> np.ndarray:
        """float32 [rows, V], a view of llama.cpp's output buffer. The buffer moves only
        when llama.cpp grows it, so the view is kept per (address, rows): building one
        (``np.ctypeslib.as_array``) costs ~100 us after a decode, ~1 % of a CPU step.
        The address comes from a prototype of ``llama_get_logits`` that returns a plain
        int (llama-cpp-python's returns a float pointer object, cast each step)."""
        key = (self._logits_addr(self._ctx), rows)
        out = self._views.get(key)
        if out is None:
            if len(self._views) >= 64:
                self._views.clear()
            ptr = ctypes.cast(key[0], ctypes.POINTER(ctypes.c_float))
            out = self._views[key] = np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size))
        return out

    def _drop_slots(self, slots: np.ndarray) -> None:
        """After a failed decode the cache of these slots is unknown: clear them."""
        for s in slots.tolist():
            self._lib.llama_memory_seq_rm(self._mem, s, 0, -1)
            self._slots.forget(s)

    # ------------------------------------------------------------------ stats, teardown

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens placed, how many came from a slot's cache, and the stream copies
        made to keep busy slots adjacent, since start."""
        t = self._slots
        return PrefixCacheStats(t.prompt_tokens, t.reused_tokens, t.copies, t.moves)

    def step_times(self) -> StepTimes:
        """Time spent in ``forward`` and inside ``llama_decode``, since start."""
        return StepTimes(self._steps, self._forward_ns, self._decode_ns)

    def close(self) -> None:
        """Free the llama.cpp context and model (also done at garbage collection)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        self._views = {}
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
