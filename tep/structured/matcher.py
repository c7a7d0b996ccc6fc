"""Per-sequence grammar state and the per-step mask fill.

:class:`Constraint` follows one sequence: before each of its sampling steps the engine
asks for the allowed tokens (:meth:`Constraint.fill_bitmask`, or :func:`fill_bitmasks` for
all constrained rows of the step at once), and after sampling it reports the token
(:meth:`Constraint.accept`). Once the grammar is complete, end-of-sequence tokens are
allowed; once it cannot continue, they are the only ones allowed, so the engine ends the
sequence the usual way.

Mask filling releases the GIL (llguidance is Rust), so :class:`MaskFiller` runs it on a
worker thread while the model's forward runs: a constrained step then costs about what an
unconstrained one does.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Sequence

import numpy as np

from tep.errors import BadRequestError
from tep.structured import limits as _limits
from tep.structured.bitmask import bitmask_words
from tep.structured.limits import MASK_THREADS, PROBE_STEPS
from tep.structured.types import ConstraintSpec

__all__ = ["Constraint", "ConstraintFailed", "make_constraint", "probe", "fill_bitmasks",
           "MaskFiller", "StepMasks", "StepMaskResult"]


class ConstraintFailed(BadRequestError):
    """The grammar matcher gave up on a sequence (a grammar it cannot follow, e.g. a
    lexer that grows past llguidance's limits, or a token outside the grammar). A 400
    naming the constraint's field; mid-stream it ends that stream with an error event."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message, param=param, code="constraint_failed")


def _first_line(err: str) -> str:
    err = err.strip()
    return err.splitlines()[0] if err else "unknown error"


class Constraint:
    """One sequence's grammar state.

    Args:
        grammar: an llguidance grammar string (``ConstraintSpec.grammar``).
        tokenizer: the model's ``llguidance.LLTokenizer``
            (:mod:`tep.structured.tokenizer`); its vocabulary is the logits' width V.

    Not thread-safe: one thread at a time (the engine fills, then accepts, in turn).
    """

    __slots__ = ("_m", "vocab_size", "words", "eos_ids", "_eos_row", "param", "failed")

    def __init__(self, grammar: str, tokenizer: Any, param: str | None = None) -> None:
        import llguidance

        self.param = param          # the request field the grammar came from (errors)
        self.failed: BaseException | None = None   # set when its mask fill failed
        lim = _limits.PARSER_LIMITS
        self._m = llguidance.LLMatcher(
            tokenizer, grammar, log_level=0,
            limits=llguidance.LLParserLimits(**lim) if lim else None)
        if self._m.is_error():
            raise ConstraintFailed(f"'{param}' was rejected by the grammar matcher: "
                                   f"{_first_line(self._m.get_error())}", param)
        self.vocab_size = int(tokenizer.vocab_size)
        self.words = bitmask_words(self.vocab_size)
        self.eos_ids = tuple(int(t) for t in tokenizer.eos_tokens)
        row = np.zeros(self.words, np.int32)
        for t in self.eos_ids:
            row[t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))
        self._eos_row = row

    # ---- state
    @property
    def is_finished(self) -> bool:
        """The grammar cannot continue (or failed): only EOS is allowed now."""
        return self._m.is_stopped()

    @property
    def eos_allowed(self) -> bool:
        """The text so far is a complete match (EOS is among the allowed tokens)."""
        return self._m.is_accepting() or self._m.is_stopped()

    @property
    def error(self) -> str:
        """Why the matcher failed ('' when it has not)."""
        return self._m.get_error()

    # ---- the step
    def _check_row(self, out: np.ndarray) -> None:
        if (not isinstance(out, np.ndarray) or out.dtype != np.int32 or out.ndim != 1
                or out.shape[0] != self.words or not out.flags.c_contiguous
                or not out.flags.writeable):
            raise ValueError(f"bitmask row must be a writable contiguous int32 [{self.words}]"
                             f" (V = {self.vocab_size}), got "
                             f"{getattr(out, 'dtype', type(out).__name__)} "
                             f"{getattr(out, 'shape', '')}")

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into ``out``: an int32 ``[ceil(V/32)]`` row (bit j
        allows token j), or a bool ``[V]`` array (True = allowed). Releases the GIL."""
        if isinstance(out, np.ndarray) and out.dtype == np.bool_:
            if out.shape != (self.vocab_size,):
                raise ValueError(f"bool mask must have shape ({self.vocab_size},), got "
                                 f"{out.shape}")
            row = np.empty(self.words, np.int32)
            self.fill_bitmask(row)
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")
            out[:] = bits[:self.vocab_size].astype(bool)
            return
        self._check_row(out)
        if self._m.is_error():
            out[:] = self._eos_row
            return
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        if self._m.is_error():
            out[:] = self._eos_row

    def accept(self, token_id: int) -> bool:
        """Advance past the sampled token. False when the grammar does not allow it (the
        matcher is then failed for good; the engine ends the sequence with
        :meth:`violation`)."""
        if not 0 <= token_id < self.vocab_size:
            return False
        return bool(self._m.consume_token(int(token_id)))

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids``, from the first, the grammar allows in a row from
        the current state (the state itself does not move)."""
        if not token_ids or self._m.is_error():
            return 0
        ids = [int(t) for t in token_ids]
        if any(not 0 <= t < self.vocab_size for t in ids):
            ids = ids[:next(j for j, t in enumerate(ids) if not 0 <= t < self.vocab_size)]
        return int(self._m.validate_tokens(ids)) if ids else 0

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (speculative drafts whose masks were
        filled ahead of verification)."""
        if n > 0 and not self._m.rollback(int(n)):
            raise RuntimeError(f"the grammar matcher could not roll back {n} tokens: "
                               f"{self._m.get_error()}")

    def violation(self, token_id: int) -> ConstraintFailed:
        """The error that ends a sequence whose token :meth:`accept` refused: the
        matcher's own reason when it failed (e.g. its lexer hit a limit), else that the
        token was outside the grammar."""
        why = self._m.get_error() if self._m.is_error() else ""
        if why:
            msg = f"the grammar matcher gave up on '{self.param}': {_first_line(why)}"
        else:
            msg = f"token {token_id} is not allowed by '{self.param}'"
        return ConstraintFailed(msg, self.param)

    def copy(self) -> "Constraint":
        """An independent copy in the same state (one compile serves ``n`` choices)."""
        c = object.__new__(Constraint)
        c._m = self._m.deep_copy()
        c.vocab_size, c.words, c.eos_ids = self.vocab_size, self.words, self.eos_ids
        c._eos_row, c.param, c.failed = self._eos_row, self.param, None
        return c


def probe(c: Constraint, steps: int = PROBE_STEPS) -> None:
    """Walk a copy of ``c`` a few tokens down the grammar (each time the lowest allowed
    token that is not end-of-sequence), so a grammar the matcher cannot follow (a counted
    repetition whose lexer outgrows llguidance's limits, e.g. ``a{1000000}``) is refused
    before generation (:class:`ConstraintFailed`) instead of failing at its first token.
    ``c`` itself is not advanced. Releases the GIL while the matcher works."""
    m = c._m.deep_copy()
    row = np.empty(c.words, np.int32)
    eos = set(c.eos_ids)
    for _ in range(steps):
        if m.is_stopped():
            return
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if m.is_error():
            break
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:c.vocab_size]
        tok = next((int(t) for t in np.flatnonzero(bits) if int(t) not in eos), None)
        if tok is None:            # only EOS may follow: the grammar is complete
            return
        if not m.consume_token(tok) or m.is_error():
            break
    if m.is_error():
        raise ConstraintFailed(f"'{c.param}' is a grammar the matcher cannot follow: "
                               f"{_first_line(m.get_error())}", c.param)


# Grammars a probe refused, by (grammar, tokenizer): a client that resends one gets its
# 400 at once instead of costing the server the failing walk again (up to seconds).
_REFUSED: "OrderedDict[tuple[str, int], str]" = OrderedDict()
_REFUSED_MAX = 256
_refused_lock = threading.Lock()


def make_constraint(spec: ConstraintSpec | None, tokenizer: Any, *,
                    check: bool = False) -> Constraint | None:
    """A fresh :class:`Constraint` for one sequence (None for None). Building compiles the
    grammar's lexer for this tokenizer (GIL released): do it when the request is admitted,
    not in the step loop. ``check``: also :func:`probe` it (a failure is a
    :class:`ConstraintFailed` naming ``spec.param``; remembered, so the same grammar is
    refused at once next time)."""
    if spec is None:
        return None
    key = (spec.grammar, id(tokenizer))
    if check:
        with _refused_lock:
            why = _REFUSED.get(key)
        if why is not None:
            raise ConstraintFailed(why.replace("\0", spec.param), spec.param)
    c = Constraint(spec.grammar, tokenizer, spec.param)
    if check:
        try:
            probe(c)
        except ConstraintFailed as e:
            with _refused_lock:
                _REFUSED[key] = e.message.replace(f"'{spec.param}'", "'\0'", 1)
                while len(_REFUSED) > _REFUSED_MAX:
                    _REFUSED.popitem(last=False)
            raise
    return c


_executor = None
_executor_lock = threading.Lock()


def _llg_executor():
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance
            _executor = llguidance.LLExecutor(MASK_THREADS)
        return _executor


def fill_bitmasks(constraints: Sequence[Constraint], rows: Sequence[int],
                  bitmask: np.ndarray) -> None:
    """Fill row ``rows[i]`` of ``bitmask`` (int32 ``[B, ceil(V/32)]``, C-contiguous) for
    ``constraints[i]``, all rows in parallel on llguidance's thread pool, GIL released.
    Rows not named are left as they are (all -1 = unconstrained). A constraint that is
    not a :class:`Constraint` fills its own row with ``fill_bitmask(row)``."""
    if len(constraints) != len(rows):
        raise ValueError(f"{len(constraints)} constraints but {len(rows)} rows")
    if not constraints:
        return
    if (not isinstance(bitmask, np.ndarray) or bitmask.dtype != np.int32
            or bitmask.ndim != 2 or not bitmask.flags.c_contiguous
            or not bitmask.flags.writeable):
        raise ValueError("bitmask must be a writable C-contiguous int32 [B, ceil(V/32)]")
    B, W = bitmask.shape
    pairs = []
    ours = []
    for c, r in zip(constraints, rows):
        if not isinstance(c, Constraint):  # any object with fill_bitmask(int32 row)
            if not 0 <= r < B:
                raise ValueError(f"row {r} is outside the bitmask's {B} rows")
            c.fill_bitmask(bitmask[r])
            continue
        ours.append((c, r))
        if c.words != W:
            raise ValueError(f"bitmask has {W} words per row, the constraint's vocabulary "
                             f"(V = {c.vocab_size}) needs {c.words}")
        if not 0 <= r < B:
            raise ValueError(f"row {r} is outside the bitmask's {B} rows")
        pairs.append((c._m, int(r)))
    if not ours:
        return
    if len(ours) == 1:
        ours[0][0].fill_bitmask(bitmask[ours[0][1]])
        return
    _llg_executor().unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, W * 4, B)
    for c, r in ours:
        if c._m.is_error():
            bitmask[r] = c._eos_row


class MaskFiller:
    """Fills a step's masks on one worker thread, so the caller can run the forward
    meanwhile: ``fut = filler.submit(constraints, rows, bitmask)``; ``model.forward(...)``;
    ``fut.result()``; then sample with ``bitmask``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tep-mask")

    def submit(self, constraints: Sequence[Constraint], rows: Sequence[int],
               bitmask: np.ndarray) -> Future:
        """Start filling; the future's result is None (or raises what the fill raised)."""
        return self._pool.submit(fill_bitmasks, list(constraints), list(rows), bitmask)

    def close(self) -> None:
        """Stop the worker thread (after the running fill, if any)."""
        self._pool.shutdown(wait=True)


class StepMaskResult(NamedTuple):
    """What :meth:`StepMasks.finish` gives: the step's bitmask (None when no row was
    constrained) and the fill's failure (None when it worked). After a failure the
    constrained rows hold end-of-sequence only, so the step can still sample; the engine
    fails those sequences."""

    bitmask: np.ndarray | None
    error: BaseException | None


class StepMasks:
    """The engine's per-step helper: one reusable bitmask buffer and a :class:`MaskFiller`.

    ``start(n_rows, [(row, constraint), ...])`` before the forward (returns at once);
    ``finish()`` after it: the int32 ``[n_rows, ceil(V/32)]`` bitmask to pass to
    ``tep.kernels.sample(..., token_bitmask=...)``, or None when no row is constrained
    (then sample without a mask). Unconstrained rows are all ones. The returned array is
    reused by the next ``start``: use it before then.

    Args:
        vocab_size: the logits' width V (the constraints' tokenizers must have this V).
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.words = bitmask_words(self.vocab_size)
        self._filler = MaskFiller()
        self._buf = np.full((0, self.words), -1, np.int32)
        self._fut: Future | None = None
        self._view: np.ndarray | None = None
        self._rows: Sequence[tuple[int, Any]] = ()

    def start(self, n_rows: int, constrained: Sequence[tuple[int, Constraint]]) -> None:
        """Begin filling the rows of ``constrained`` (row index, constraint) on the worker
        thread. Rows are indices into this step's ``[n_rows, V]`` logits."""
        if self._fut is not None:
            self.finish()
        if not constrained:
            self._view = None
            return
        if self._buf.shape[0] < n_rows:
            self._buf = np.full((max(n_rows, 2 * self._buf.shape[0]), self.words), -1,
                                np.int32)
        view = self._buf[:n_rows]
        view.fill(-1)
        self._view = view
        self._rows = list(constrained)
        rows = [r for r, _ in constrained]
        self._fut = self._filler.submit([c for _, c in constrained], rows, view)

    def finish(self) -> StepMaskResult:
        """Wait for the fill: the bitmask (None when nothing was constrained) and the
        fill's error. Never raises for a failed fill: the rows it was filling are then set
        to end-of-sequence only (never a half-written row), and the error says why."""
        fut, self._fut = self._fut, None
        rows, self._rows = self._rows, ()
        if fut is None:
            return StepMaskResult(self._view, None)
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001 - the grammar engine's, one request's fault
            for r, c in rows:
                self._view[r] = getattr(c, "_eos_row", 0)
                param = getattr(c, "param", None)
                try:
                    c.failed = ConstraintFailed(
                        f"the grammar matcher failed on '{param}': {e}", param)
                except AttributeError:  # a constraint object without the attribute
                    pass
            return StepMaskResult(self._view, e)
        return StepMaskResult(self._view, None)

    def close(self) -> None:
        """Stop the worker thread."""
        if self._fut is not None:
            self._fut.cancel()
        self._filler.close()
