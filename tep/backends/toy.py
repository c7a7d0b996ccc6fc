"""The toy backend: a small deterministic numpy "language model", no download.

Vocabulary (``vocab_size`` V >= 257):
  - IDs 0..255 are the bytes 0x00..0xFF, so text tokenizes as its UTF-8 bytes and
    ``detokenize`` gives real text;
  - ID 256 is ``<|endoftext|>`` (EOS; ends generation, decodes to "");
  - IDs 257..V-1 (only with a larger ``vocab_size``, for benchmarks) decode to a space
    followed by a deterministic lowercase word spelled from the ID.

Model: the hidden state at position t is ``tanh(sum of hashed embeddings of the last
three tokens (unigram, bigram, trigram buckets))`` (float32 [D]); logits are
``hidden @ W + b`` (float32 [V]) with W, b drawn from a fixed seed. b favours printable
ASCII so samples look like text. Sampling uses :func:`tep.kernels.sample` with every
knob of the request's :class:`tep.Sampling`, ``step`` = index of the generated token, so
the same seed gives the same text streamed or not.

Chat template (documented, simple): each message becomes ``<|{role}|>\\n{content}\\n``
(text parts of a content list joined), then ``<|assistant|>\\n`` is appended; the whole
string is tokenized as bytes.

Embeddings: mean of the per-token hidden states, L2-normalised
(:func:`tep.kernels.pool`), D = ``dim``.

Engine model: :class:`ToyModel` is the same model as a :class:`tep.engine.Model` (one
batched ``forward``; its "KV cache" is the last two tokens and the length of each
sequence), and :class:`ToyEngineBackend` serves it with continuous batching (the default
``tep serve`` backend). Its logits rows are computed exactly as the per-request path
computes them, so a seeded request gives the same tokens on both paths. Its chat template
is :data:`CHAT_TEMPLATE`, the Jinja spelling of :func:`chat_template`.

Settings (keyword arguments, or environment when constructed with none):
``TEP_TOY_VOCAB_SIZE`` (default 257), ``TEP_TOY_DIM`` (64), ``TEP_TOY_INSTANT`` (0): the
instant mode does no model compute at all: it emits the bytes of a fixed lorem-ipsum text
(cycled from a position derived from the prompt and seed), logprob 0.0, and embeddings that
are a fixed unit vector, for measuring the HTTP layer.
"""
from __future__ import annotations

import codecs
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from tep.backend import Backend, ChatStreamSink, StreamSink, TokenLogprob
from tep.errors import BadRequestError
from tep.backend import Sampling
from tep.wire.chat import ChatRequest, text_message


__all__ = ["ToyBackend", "ToyModel", "ToyEngineBackend", "EOS", "chat_template",
           "CHAT_TEMPLATE", "toy_tokenizer"]

EOS = 256
N_BYTES = 256
_BUCKETS = 4096
_LOREM = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
          b"incididunt ut labore et dolore magna aliqua. ")
_MASK64 = (1 << 64) - 1


def _word(token_id: int) -> str:
    """A deterministic word for an ID >= 257: base-26 letters of the ID."""
    n, letters = token_id, []
    while True:
        n, r = divmod(n, 26)
        letters.append(chr(ord("a") + r))
        if n == 0:
            break
    return " " + "".join(reversed(letters))


def toy_tokenizer(vocab_size: int = 257) -> Any:
    """The toy vocabulary as an ``llguidance.LLTokenizer``: bytes, EOS 256, then
    :func:`_word` for ids >= 257 (cached per size)."""
    from tep.structured.tokenizer import byte_tokenizer

    return byte_tokenizer(vocab_size, EOS, _word)


def chat_template(messages: list[dict]) -> str:
    """The toy chat template: ``<|role|>\\ncontent\\n`` per message, then
    ``<|assistant|>\\n``. Non-text content parts are a 400."""
    out = []
    for i, m in enumerate(messages):
        c = text_message(i, m, "the toy backend").get("content")
        out.append(f"<|{m['role']}|>\n{c or ''}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


# The same template in Jinja (rendered by tep.engine.chat_template.render_chat).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] or '' }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


class ToyBackend(Backend):
    """A deterministic numpy model with a byte-level vocabulary. See the module docstring.

    Args:
        model: the model ID it serves.
        vocab_size: V >= 257 (257 = bytes + EOS).
        dim: hidden/embedding size D.
        instant: no model compute (fixed text), for measuring the HTTP layer.
        weights_seed: seed of the fixed random weights.
    """

    def __init__(self, model: str = "tep-toy", *, vocab_size: int | None = None,
                 dim: int | None = None, instant: bool | None = None,
                 weights_seed: int = 1234) -> None:
        self.model = model
        self.vocab_size = vocab_size if vocab_size is not None else _env_int("TEP_TOY_VOCAB_SIZE", 257)
        self.dim = dim if dim is not None else _env_int("TEP_TOY_DIM", 64)
        self.instant = bool(instant if instant is not None else _env_int("TEP_TOY_INSTANT", 0))
        if self.vocab_size < N_BYTES + 1:
            raise ValueError(f"vocab_size must be >= {N_BYTES + 1}, got {self.vocab_size}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        self.weights_seed = weights_seed
        rng = np.random.default_rng(weights_seed)
        V, D = self.vocab_size, self.dim
        self._emb = (rng.standard_normal((3, _BUCKETS, D)) / np.sqrt(3)).astype(np.float32)
        self._w = (rng.standard_normal((D, V)) * (1.5 / np.sqrt(D))).astype(np.float32)
        b = np.full(V, -6.0, dtype=np.float32)
        printable = np.arange(32, 127)
        b[printable] = 0.5
        b[ord(" ")] = 2.0
        b[[ord(c) for c in "etaoinshr"]] = 1.5
        b[ord("\n")] = -1.0
        b[EOS] = -2.0
        b[N_BYTES + 1:] = 0.0
        self._b = b

    # ---- metadata
    def list_models(self) -> list[str]:
        return [self.model]

    def fingerprint(self, model: str) -> str | None:
        """The weights are a function of (vocab size, dim, seed): those and tep's version
        (hashed once: every answer carries it)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            from tep import __version__
            from tep.backend.fingerprint import fingerprint_of

            fp = self.__dict__["_fingerprint"] = fingerprint_of(
                {"model": "tep-toy", "vocab_size": self.vocab_size, "dim": self.dim,
                 "weights_seed": self.weights_seed, "instant": self.instant,
                 "tep": __version__})
        return fp

    def supports_chat(self) -> bool:
        return True

    def supports_embeddings(self) -> bool:
        return True

    def embedding_dimensions(self, model: str) -> int | None:
        return self.dim

    # ---- text
    def tokenize(self, model: str, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        return self._decode_bytes(token_ids).decode("utf-8", errors="replace")

    def _decode_bytes(self, token_ids: list[int]) -> bytes:
        out = bytearray()
        for t in token_ids:
            if 0 <= t < N_BYTES:
                out.append(t)
            elif t == EOS:
                continue
            elif N_BYTES < t < self.vocab_size:
                out += _word(t).encode("ascii")
            else:
                raise BadRequestError(f"token ID {t} is outside the vocabulary "
                                      f"[0, {self.vocab_size})", param="prompt")
        return bytes(out)

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise BadRequestError(f"token ID {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", param=param)

    def prompt_logprobs(self, model: str, token_ids: list[int],
                        top_n: int) -> list[TokenLogprob]:
        """The model's logprob of each prompt token given the ones before (the first is
        null), with the ``top_n`` most likely alternatives."""
        from tep.kernels import log_softmax

        ids = [int(t) for t in token_ids]
        self._check_ids(ids, "prompt")
        out = []
        for i, t in enumerate(ids):
            text = self.detokenize(model, [t])
            if i == 0:
                out.append(TokenLogprob(token=text, logprob=None, token_id=t, top=None))
                continue
            lp = log_softmax(self._logits(ids[:i]))
            top = np.argsort(-lp, kind="stable")[:top_n]
            out.append(TokenLogprob(token=text, logprob=float(lp[t]), token_id=t,
                                    top=[(self.detokenize(model, [int(j)]), float(lp[j]))
                                         for j in top]))
        return out

    # ---- the model
    def _hidden(self, ctx: list[int], t: int) -> np.ndarray:
        """Hidden state float32 [D] at position t (uses ctx[t-2..t])."""
        h = np.zeros(self.dim, dtype=np.float32)
        a = ctx[t]
        h += self._emb[0, (a * 2654435761) % _BUCKETS]
        if t >= 1:
            h += self._emb[1, ((ctx[t - 1] * 40503 + a) * 2246822519) % _BUCKETS]
        if t >= 2:
            h += self._emb[2, ((ctx[t - 2] * 65599 + ctx[t - 1]) * 97 + a) * 3266489917
                           % _BUCKETS]
        return np.tanh(h)

    def _logits(self, ctx: list[int]) -> np.ndarray:
        if not ctx:
            return self._b.copy()
        return self._hidden(ctx, len(ctx) - 1) @ self._w + self._b

    # ---- generation
    def generate_stream_from_tokens(self, model: str, token_ids: list[int],
                                    sampling: Sampling, sink: StreamSink) -> None:
        self._check_ids(token_ids, "prompt")
        self._generate(list(token_ids), sampling, sink)

    def _generate(self, prompt: list[int], s: Sampling, sink: StreamSink) -> None:
        if s.logit_bias:
            self._check_ids(list(s.logit_bias), "logit_bias")
        if s.allowed_token_ids:
            self._check_ids(s.allowed_token_ids, "allowed_token_ids")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if self.instant:
            self._generate_instant(prompt, s, sink, decoder)
            return
        from tep.kernels import sample

        ctx = list(prompt)
        out: list[int] = []
        for step in range(s.max_tokens):
            r = sample(self._logits(ctx), temperature=s.temperature, top_k=s.top_k,
                       top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                       presence_penalty=s.presence_penalty,
                       frequency_penalty=s.frequency_penalty, prompt_token_ids=prompt,
                       output_token_ids=out, logit_bias=s.logit_bias,
                       allowed_token_ids=s.allowed_token_ids, seed=s.seed, step=step,
                       logprobs=s.logprobs)
            if s.logprobs is None:
                tok, kw = int(r), {}
            else:
                tok = int(r.token_ids)
                kw = {"logprob": float(r.logprobs),
                      "top_logprobs": list(zip(np.asarray(r.top_token_ids).tolist(),
                                               np.asarray(r.top_logprobs).tolist())),
                      "token_bytes": self._decode_bytes([tok])}
            ctx.append(tok)
            out.append(tok)
            if tok == EOS:
                piece = decoder.decode(b"", final=True)
                sink.emit_token(piece, token_id=tok, **kw)
                sink.emit_finish("stop")
                return
            if not sink.emit_token(decoder.decode(self._decode_bytes([tok])), token_id=tok, **kw):
                return
        tail = decoder.decode(b"", final=True)
        if tail:
            sink.emit_token(tail)  # pragma: no cover - only after max_tokens, dropped by sink

    def _generate_instant(self, prompt: list[int], s: Sampling, sink: StreamSink,
                          decoder: Any) -> None:
        start = (sum(prompt) + (s.seed or 0)) % len(_LOREM)
        for step in range(s.max_tokens):
            tok = _LOREM[(start + step) % len(_LOREM)]
            kw = {} if s.logprobs is None else {"logprob": 0.0, "top_logprobs": [(tok, 0.0)]}
            if not sink.emit_token(chr(tok), token_id=tok, **kw):
                return

    # ---- chat
    def apply_chat_template(self, req: ChatRequest) -> str:
        return chat_template(req.messages)

    def chat_completion_stream(self, req: ChatRequest, sink: ChatStreamSink) -> None:
        ids = self.tokenize(req.model, self.apply_chat_template(req))
        sink.prompt_tokens = len(ids)
        self._generate(ids, req.sampling, sink)

    # ---- embeddings
    def generate_embeddings(self, model: str, token_ids: list[int]) -> np.ndarray:
        self._check_ids(token_ids, "input")
        if self.instant:
            v = np.zeros(self.dim, dtype=np.float32)
            v[0] = 1.0
            return v
        from tep.kernels import pool

        n = len(token_ids)
        hidden = np.empty((n, self.dim), dtype=np.float32)
        for t in range(n):
            hidden[t] = self._hidden(token_ids, t)
        out = pool(hidden, offsets=np.array([0, n], dtype=np.int64), mode="mean",
                   normalize=True)
        return out[0]


class ToyModel:
    """The toy model as a :class:`tep.engine.Model`: see the module docstring.

    Args:
        toy: the :class:`ToyBackend` whose weights, tokenizer and settings it uses
            (default: a new one from the keyword arguments / environment).
        max_num_seqs: slots (sequence IDs ``0..max_num_seqs-1``).
        context_size: most positions per sequence (prompt + generated), or None.
        prefix_cache: finished sequences kept for prefix reuse (0 = no prefix cache). A
            new sequence starts from the kept one sharing the longest prefix with its
            prompt; the least recently used one is evicted past this many.
        **kw: passed to :class:`ToyBackend` when ``toy`` is None.
    """

    chat_template = CHAT_TEMPLATE
    bos_token = ""
    eos_token = "<|endoftext|>"
    eog_token_ids = (EOS,)

    def __init__(self, toy: ToyBackend | None = None, *, max_num_seqs: int = 256,
                 context_size: int | None = None, prefix_cache: int = 0,
                 **kw: Any) -> None:
        self.toy = toy if toy is not None else ToyBackend(**kw)
        self.vocab_size = self.toy.vocab_size
        self.embedding_dim = self.toy.dim
        self.max_num_seqs = max_num_seqs
        self.context_size = context_size
        # the cache: per slot, the last three tokens seen (-1 = none) and the length
        self._last = np.full((max_num_seqs, 3), -1, np.int64)
        self._len = np.zeros(max_num_seqs, np.int64)
        # the prefix cache: every token of each live slot, and the kept finished ones
        self.prefix_cache = max(0, int(prefix_cache))
        self.evicted = 0
        self._hist: list[list[int]] | None = None
        self._kept: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._kept_seq = 0
        if self.prefix_cache:
            self._hist = [[] for _ in range(max_num_seqs)]
            self.reuse_prefix = self._reuse_prefix  # the engine looks this hook up
        if self.toy.instant:
            n = len(_LOREM)
            self._instant_rows = np.zeros((n, self.vocab_size), np.float32)
            self._instant_rows[np.arange(n), list(_LOREM)] = 60.0

    def list_models(self) -> list[str]:
        return [self.toy.model]

    def fingerprint(self) -> str | None:
        """The toy's fingerprint (its logits do not depend on batching)."""
        return self.toy.fingerprint(self.toy.model)

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: Any) -> bytes:
        return self.toy._decode_bytes([int(t) for t in token_ids])

    def forward(self, batch: Any) -> np.ndarray:
        """Append each sequence's tokens to its 3-token window (numpy over the batch; a
        position that is not the next one is a ValueError); for each logits row compute
        ``hidden(window) @ W + b`` one row at a time (so a row never depends on the
        batch). Instant mode returns a row peaked on the next lorem-ipsum byte."""
        toks = batch.token_ids.astype(np.int64)
        pos = batch.positions.astype(np.int64)
        sids = batch.seq_ids.astype(np.int64)
        want = batch.logits
        n = toks.shape[0]
        last, length = self._last, self._len
        if n == 0:
            return np.empty((0, self.vocab_size), np.float32)
        # runs: each sequence's tokens are contiguous and in order
        idx = np.arange(n)
        starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        expected = length[sids] + (idx - run_start)
        if not np.array_equal(expected, pos):
            k = int(np.flatnonzero(expected != pos)[0])
            raise ValueError(f"sequence {int(sids[k])}: token at position {int(pos[k])}, "
                             f"expected {int(expected[k])}")
        ends = np.r_[starts[1:], n] - 1
        rs = sids[starts]
        single = ends == starts
        if single.all():   # decoding: one token per sequence
            last[rs, 0], last[rs, 1], last[rs, 2] = last[rs, 1], last[rs, 2], toks[ends]
        else:
            for b, e, sq in zip(starts.tolist(), ends.tolist(), rs.tolist()):
                w = np.concatenate([last[sq], toks[b:e + 1]])[-3:]
                last[sq] = w
        length[rs] = pos[ends] + 1
        if self._hist is not None:
            hist, tl = self._hist, toks.tolist()
            for b, e, sq in zip(starts.tolist(), ends.tolist(), rs.tolist()):
                hist[sq].extend(tl[b:e + 1])
        rows = np.flatnonzero(want)
        if self.toy.instant:
            return self._instant_rows[pos[rows] % len(_LOREM)]
        out = np.empty((rows.shape[0], self.vocab_size), np.float32)
        toy = self.toy
        for r, i in enumerate(rows.tolist()):
            sq, p = int(sids[i]), int(pos[i])
            ctx = [int(x) for x in last[sq, 3 - min(3, p + 1):]]
            out[r] = toy._hidden(ctx, len(ctx) - 1) @ toy._w + toy._b
        return out

    def release(self, seq_id: int) -> None:
        self._last[seq_id] = -1
        self._len[seq_id] = 0
        if self._hist is not None and self._hist[seq_id]:
            self._kept[self._kept_seq] = np.asarray(self._hist[seq_id], np.int64)
            self._kept_seq += 1
            self._hist[seq_id] = []
            while len(self._kept) > self.prefix_cache:
                self._kept.popitem(last=False)
                self.evicted += 1

    def _reuse_prefix(self, seq_id: int, prompt: Any) -> int:
        """Start ``seq_id`` from the kept sequence sharing the longest prefix with
        ``prompt`` (at most ``len(prompt) - 1`` tokens, the last is always fed): the toy's
        cache at position n is the three tokens before n, so reuse is exact."""
        p = np.asarray(prompt, np.int64)
        best, best_key = 0, None
        for key, kept in self._kept.items():
            m = min(kept.shape[0], p.shape[0] - 1)
            if m <= best:
                continue
            diff = np.flatnonzero(kept[:m] != p[:m])
            n = int(diff[0]) if diff.size else m
            if n > best:
                best, best_key = n, key
        if best_key is not None:
            self._kept.move_to_end(best_key)  # recently used: evicted last
        self._last[seq_id] = -1
        if best:
            w = p[max(0, best - 3):best]
            self._last[seq_id, 3 - w.shape[0]:] = w
        self._len[seq_id] = best
        self._hist[seq_id] = p[:best].tolist()  # type: ignore[index]
        return best

    def structured_tokenizer(self) -> Any:
        """The byte vocabulary for llguidance (structured outputs)."""
        return toy_tokenizer(self.vocab_size)

    def embed(self, inputs: list) -> list:
        """Mean-pooled, L2-normalised hidden states, one float32 [D] per input."""
        return [self.toy.generate_embeddings(self.toy.model, list(x)) for x in inputs]


class ToyEngineBackend:
    """The toy model served by :class:`tep.engine.EngineBackend` (continuous batching).

    ``ToyEngineBackend(**kw)`` builds ``ToyModel(**kw)``; ``max_num_seqs`` and
    ``max_batch_tokens`` default to ``$TEP_MAX_NUM_SEQS`` / ``$TEP_MAX_BATCH_TOKENS``
    (else 256 / 2048).
    """

    def __new__(cls, model: str = "tep-toy", *, max_num_seqs: int | None = None,
                max_batch_tokens: int | None = None, **kw: Any) -> Any:
        from tep.engine import EngineBackend

        from tep.serving.config import ServerConfig

        cfg = ServerConfig.from_env()  # --max-num-seqs / --max-batch-tokens, one source
        seqs = max_num_seqs if max_num_seqs is not None else cfg.max_num_seqs
        toks = max_batch_tokens if max_batch_tokens is not None else cfg.max_batch_tokens
        toy_kw = {k: kw.pop(k) for k in ("vocab_size", "dim", "instant", "weights_seed")
                  if k in kw}
        m = ToyModel(ToyBackend(model, **toy_kw), max_num_seqs=seqs, **kw)
        return EngineBackend(m, max_num_seqs=seqs, max_batch_tokens=max(toks, seqs),
                             overlap=cfg.overlap == "on")
