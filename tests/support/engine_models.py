"""Plain-numpy engine models for the engine tests (no tep code inside)."""
from __future__ import annotations

import numpy as np

V = 300          # 0..255 bytes, 256 = end of generation, 257..299 decode to "<n>"
EOG = 256


class HashModel:
    """A row-independent model: a sequence's logits at position t are standard normals
    drawn from a generator seeded by (its last two tokens, t), times 3. Its cache is the
    last two tokens and the length of each sequence, so a wrong position is caught.

    ``poison``: a token ID whose presence in a step makes ``forward`` raise.
    ``nan_token``: a token ID after which the row's logits are all NaN.
    """

    chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n"
                     "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    eog_token_ids = (EOG,)

    def __init__(self, max_num_seqs: int = 256, *, poison: int | None = None,
                 nan_token: int | None = None, context_size: int | None = None) -> None:
        self.vocab_size = V
        self.max_num_seqs = max_num_seqs
        self.poison = poison
        self.nan_token = nan_token
        if context_size is not None:
            self.context_size = context_size
        self.last = np.full((max_num_seqs, 2), -1, np.int64)
        self.length = np.zeros(max_num_seqs, np.int64)
        self.released: list[int] = []
        self.batches: list = []

    def list_models(self) -> list[str]:
        return ["hash"]

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids) -> bytes:
        out = b""
        for t in ids:
            t = int(t)
            out += bytes([t]) if t < 256 else (b"" if t == EOG else f"<{t}>".encode())
        return out

    def forward(self, batch) -> np.ndarray:
        self.batches.append((batch.n_tokens, len(set(batch.seq_ids.tolist()))))
        if self.poison is not None and np.any(batch.token_ids == self.poison):
            raise RuntimeError("poisoned batch")
        rows = []
        for t, p, s, w in zip(batch.token_ids.tolist(), batch.positions.tolist(),
                              batch.seq_ids.tolist(), batch.logits.tolist()):
            assert p == self.length[s], (s, p, self.length[s])
            self.last[s] = (self.last[s, 1], t)
            self.length[s] = p + 1
            if w:
                if t == self.nan_token:
                    rows.append(np.full(V, np.nan, np.float32))
                    continue
                key = (int(self.last[s, 0]) + 1) * 1_000_003 + t * 7919 + p
                rows.append((np.random.default_rng(key).standard_normal(V) * 3)
                            .astype(np.float32))
        return np.stack(rows) if rows else np.zeros((0, V), np.float32)

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)
        self.last[seq_id] = -1
        self.length[seq_id] = 0


class InstantModel:
    """No compute at all: the same preallocated logits every step (benchmarks/tests)."""

    def __init__(self, vocab_size: int = 32000, max_num_seqs: int = 256) -> None:
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self._rows = np.random.default_rng(0).standard_normal(
            (max_num_seqs, vocab_size)).astype(np.float32)

    def list_models(self) -> list[str]:
        return ["instant"]

    def forward(self, batch) -> np.ndarray:
        return self._rows[:batch.n_logit_rows]

    def release(self, seq_id: int) -> None:
        pass


class InductionModel:
    """A copying model with a rewindable cache, for speculative decoding: the logits of a
    row are hash noise (seeded by the last two tokens and the position, like HashModel)
    plus ``peak`` on the token that followed the latest earlier occurrence of the current
    token - so text that repeats keeps repeating, as an LLM copying a paragraph does.
    A row depends only on its sequence's tokens up to it (never on the batch, nor on how
    many of its tokens one forward held). ``rewind(seq_id, n)`` drops positions >= n."""

    eog_token_ids = (EOG,)

    def __init__(self, max_num_seqs: int = 16, *, peak: float = 9.0,
                 context_size: int | None = None) -> None:
        self.vocab_size = V
        self.max_num_seqs = max_num_seqs
        self.peak = peak
        if context_size is not None:
            self.context_size = context_size
        self.hist: list[list[int]] = [[] for _ in range(max_num_seqs)]
        self.batches: list = []
        self.rewinds = 0

    def list_models(self) -> list[str]:
        return ["induction"]

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids) -> bytes:
        return HashModel.detokenize(self, ids)

    def _row(self, h: list[int]) -> np.ndarray:
        p, t = len(h) - 1, h[-1]
        prev = h[-2] if len(h) > 1 else -1
        key = (prev + 1) * 1_000_003 + t * 7919 + p
        row = np.random.default_rng(key).standard_normal(V) * 1.5
        for i in range(len(h) - 2, -1, -1):
            if h[i] == t:
                row[h[i + 1]] += self.peak
                break
        return row.astype(np.float32)

    def forward(self, batch) -> np.ndarray:
        self.batches.append((batch.n_tokens, batch.n_logit_rows))
        rows = []
        for t, p, s, w in zip(batch.token_ids.tolist(), batch.positions.tolist(),
                              batch.seq_ids.tolist(), batch.logits.tolist()):
            h = self.hist[s]
            assert p == len(h), (s, p, len(h))
            h.append(t)
            if w:
                rows.append(self._row(h))
        return np.stack(rows) if rows else np.zeros((0, V), np.float32)

    def rewind(self, seq_id: int, n_tokens: int) -> None:
        self.rewinds += 1
        del self.hist[seq_id][n_tokens:]

    def release(self, seq_id: int) -> None:
        self.hist[seq_id] = []
