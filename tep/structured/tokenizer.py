"""llguidance tokenizers for tep's models, built once per model and cached.

A mask is only as good as the tokenizer behind it: llguidance needs each token's bytes
(to know which tokens can extend the text the grammar allows) and the end-of-sequence ids
(allowed once the grammar is complete; the only tokens allowed after it has finished).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from functools import lru_cache
from typing import Any, Callable, Sequence

__all__ = ["byte_tokenizer", "llamacpp_tokenizer", "tokenizer_from_pieces"]

_lock = threading.Lock()


class _Pieces:
    """The object ``llguidance.TokenizerWrapper`` reads: ``tokens`` (bytes per id),
    ``eos_token_id``, ``bos_token_id``, ``special_token_ids``, and ``__call__`` (bytes ->
    ids, used for text the grammar forces)."""

    def __init__(self, tokens: list[bytes], eos: int, special: Sequence[int],
                 encode) -> None:
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = list(special)
        self._encode = encode

    def __call__(self, s: bytes) -> list[int]:
        return self._encode(s)


def tokenizer_from_pieces(tokens: list[bytes], eos_ids: Sequence[int],
                          special_ids: Sequence[int], encode) -> Any:
    """An ``llguidance.LLTokenizer`` from each id's bytes. ``special_ids`` never match
    grammar text (only the grammar's EOS handling or ``<special>`` references reach them);
    ``encode(bytes) -> list[int]`` tokenizes forced text."""
    import llguidance

    eos_ids = list(eos_ids)
    wrapper = llguidance.TokenizerWrapper(_Pieces(tokens, eos_ids[0], special_ids, encode))
    return llguidance.LLTokenizer(wrapper, n_vocab=len(tokens), eos_token=eos_ids)


@lru_cache(maxsize=8)
def byte_tokenizer(vocab_size: int = 257, eos_id: int = 256,
                   word: Callable[[int], str] | None = None) -> Any:
    """A byte vocabulary: ids 0..255 are bytes, ``eos_id`` (256) is ``<|endoftext|>``, and
    ids 257..V-1 are spelled by ``word(id)`` (ASCII; required when V > 257). The toy model
    passes its own spelling (``tep.backends.toy.toy_tokenizer``). Cached per arguments."""
    if vocab_size < 257 or eos_id != 256:
        raise ValueError(f"the byte vocabulary needs vocab_size >= 257 and EOS 256, got "
                         f"{vocab_size}, {eos_id}")
    if vocab_size > 257 and word is None:
        raise ValueError("a byte vocabulary larger than 257 needs word(id) for ids >= 257")
    tokens = [bytes([i]) for i in range(256)] + [b"<|endoftext|>"]
    if word is not None:
        tokens += [word(t).encode("ascii") for t in range(257, vocab_size)]
    return tokenizer_from_pieces(tokens, [eos_id], [eos_id], lambda s: list(bytes(s)))


# llama.cpp models: one tokenizer per owner object, kept while it lives.
_llama_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _vocab_of(owner: Any) -> Any:
    """The ``llama_vocab_p`` of a ``llama_cpp.Llama`` or its ``LlamaModel``."""
    inner = getattr(owner, "_model", owner)          # Llama -> LlamaModel
    vocab = getattr(inner, "vocab", None)
    if vocab is None or callable(vocab):
        raise TypeError(f"cannot find a llama.cpp vocab on {type(owner).__name__}; pass "
                        "vocab=<llama_vocab_p>")
    return vocab


def llamacpp_tokenizer(owner: Any, *, vocab: Any = None, eos_ids: Sequence[int] | None = None,
                       n_vocab: int | None = None) -> Any:
    """An ``llguidance.LLTokenizer`` for a llama.cpp model: each token's piece read from the
    GGUF vocabulary (about a second for 49k tokens), cached per ``owner`` while it lives.

    Args:
        owner: what keeps the model alive: a ``llama_cpp.Llama`` (its vocab is found), or
            any object holding a model loaded with the low-level API (then pass ``vocab``).
            llguidance calls llama.cpp's tokenizer through the vocab, so the tokenizer must
            not outlive it.
        vocab: the ``llama_vocab_p`` (``llama_cpp.llama_model_get_vocab(model)``).
        eos_ids: every end-of-generation id (the engine's stop ids; default: the vocab's
            EOS). The grammar allows them when complete and only them once finished.
        n_vocab: the logits' width V when it exceeds the vocab (padded models), so mask
            rows are ``ceil(V/32)`` words.
    """
    from llguidance.llamacpp import lltokenizer_from_vocab

    key = (tuple(eos_ids) if eos_ids is not None else None, n_vocab)
    with _lock:
        per = _llama_cache.setdefault(owner, {})
        tok = per.get(key)
        if tok is None:
            v = vocab if vocab is not None else _vocab_of(owner)
            with warnings.catch_warnings():   # llguidance calls a deprecated llama.cpp alias
                warnings.simplefilter("ignore", DeprecationWarning)
                tok = lltokenizer_from_vocab(v, n_vocab=n_vocab,
                                             eos_token=list(eos_ids) if eos_ids else None)
            per[key] = tok
        return tok
