"""What a model author writes for the engine: one batched forward over a ``StepBatch``.

The engine (``tep.engine.EngineBackend``) owns scheduling, sampling, streaming, stops and
cancellation; the model owns its weights and its KV cache. A sequence is named by a
``seq_id`` in ``[0, max_num_seqs)``: the engine hands out free ids and calls
``release(seq_id)`` when the sequence ends, after which the id may be reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["StepBatch", "Model", "TextModel", "PrefixCachingModel", "RewindableModel",
           "EmbeddingModel"]


@dataclass(frozen=True)
class StepBatch:
    """The tokens fed to the model in one engine step: llama.cpp's ``llama_batch`` shape.

    Every array has length N = the number of tokens fed this step. A sequence contributes
    either a chunk of its prompt or the one token it decoded last step; its tokens are
    contiguous and in position order.

    Attributes:
        token_ids: int32 [N], the tokens to append.
        positions: int32 [N], each token's position in its sequence (0-based).
        seq_ids: int32 [N], which sequence each token belongs to.
        logits: bool [N], True where the model must return a row of logits (the last
            token of a sequence that will sample this step).
    """

    token_ids: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    logits: np.ndarray

    @property
    def n_tokens(self) -> int:
        """N, the number of tokens in the step."""
        return int(self.token_ids.shape[0])

    @property
    def n_logit_rows(self) -> int:
        """How many rows ``forward`` returns (the count of True in ``logits``)."""
        return int(np.count_nonzero(self.logits))


@runtime_checkable
class Model(Protocol):
    """A batched model the engine can drive.

    Required: ``vocab_size``, ``list_models``, ``forward``, ``release``. Optional
    (looked up with ``getattr``): ``tokenize``/``detokenize`` for text, ``chat_template``
    (+ ``bos_token``/``eos_token``) for chat, ``eog_token_ids`` (tokens that end a
    sequence), ``context_size`` (most positions per sequence), ``max_num_seqs`` (most
    sequences the model can hold), ``reuse_prefix`` (prefix caching), ``rewind``
    (speculative decoding, see :class:`RewindableModel`) and ``embed``
    (+ ``embedding_dim``) for embeddings (see :class:`EmbeddingModel`).

    How the engine uses them: ``detokenize([t])`` of one token is taken to be
    context-free and is cached per token ID; a chat request's messages (text content
    parts joined) are rendered with ``chat_template`` (Hugging Face semantics, generation
    prompt added, ``tools`` passed through) and then tokenized; ``prompt + max_tokens >
    context_size`` is refused with a 400 that states both numbers; sampling an
    ``eog_token_ids`` token ends the sequence with finish reason "stop".

    ``forward`` may be called from a thread other than the one that built the model, but
    never concurrently with itself; it should release the GIL while it computes.
    """

    vocab_size: int

    def list_models(self) -> list[str]:
        """Model ids served (``GET /v1/models``)."""
        ...

    def forward(self, batch: StepBatch) -> np.ndarray:
        """Append ``batch``'s tokens to their sequences' caches and return float32
        ``[batch.n_logit_rows, vocab_size]``: one row per True in ``batch.logits``, in
        batch order. Rows must not depend on the other sequences in the batch."""
        ...

    def release(self, seq_id: int) -> None:
        """The sequence ended: its cache may be dropped (or kept for prefix reuse)."""
        ...


class TextModel(Model, Protocol):
    """Optional text hooks of a :class:`Model`."""

    def tokenize(self, text: str) -> list[int]:
        """Text -> token ids (special tokens in the text are parsed as such)."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> bytes:
        """Token ids -> bytes; a token may end inside a UTF-8 character."""
        ...


class PrefixCachingModel(Model, Protocol):
    """Optional prefix reuse: before a sequence's first forward, the engine asks how much of
    its prompt is already in the cache."""

    def reuse_prefix(self, seq_id: int, prompt: Sequence[int]) -> int:
        """Make ``seq_id``'s cache hold the longest cached prefix of ``prompt`` (e.g. by
        copying another sequence's cache) and return its length n, with
        ``0 <= n <= len(prompt) - 1`` (the last prompt token is always fed, for its
        logits). The engine then feeds ``prompt[n:]`` at positions ``n...``."""
        ...


class RewindableModel(Model, Protocol):
    """Optional cache rewind, needed for speculative decoding: a step may feed a sequence
    its last token plus K draft tokens (K + 1 logits rows, row j after token j); the
    drafts the engine rejects are then dropped from the cache. For the seeded outputs to
    be the same with and without speculation, a row's logits must not depend on how many
    tokens of its sequence the step held (llama.cpp on CPU: they are the same bits)."""

    def rewind(self, seq_id: int, n_tokens: int) -> None:
        """Drop positions ``>= n_tokens`` of ``seq_id``'s cache (the next feed of that
        sequence is at position ``n_tokens``)."""
        ...


class EmbeddingModel(Model, Protocol):
    """Optional embeddings: concurrent ``/v1/embeddings`` requests are batched into one
    call (waiting at most a few milliseconds for company)."""

    embedding_dim: int

    def embed(self, inputs: Sequence[Sequence[int]]) -> Sequence[np.ndarray] | np.ndarray:
        """One pooled float32 [embedding_dim] vector per token-ID list (B lists in, B
        vectors or a [B, embedding_dim] array out). Called from the engine's embeddings
        thread, never concurrently with itself or with ``forward`` (they share a lock)."""
        ...
