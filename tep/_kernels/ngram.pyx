# cython: cdivision=True
"""N-gram draft lookup for speculative decoding (compiled; used by
tep.engine.speculative.NgramDrafter).

Per slot: a token buffer (the prompt, then every emitted token) and, for each n-gram size n,
an open-addressing table n-gram -> the position right after its latest occurrence. The
tables cover the n-grams that end before the last token (indexed lazily, at the next
lookup), so the lookup of the last n tokens finds an *earlier* occurrence whose
continuation exists. Sizes are tried in the order given (largest first in the engine); the
first one found wins and its continuation toks[q:q + k] is the draft. The match length m
(how far back the match reaches, at most ``reach`` tokens and never past the start) tells
a copied run from a coincidence; the caller maps it to a draft kind.

An entry holds a 32-bit hash tag and the position only: its key is read back from the
slot's own buffer. Memory is the buffer plus 16-32 bytes per distinct n-gram per size (8
per entry, load factor 1/4 to 1/2), grown with the slot's tokens and freed on release.
"""
from cpython.number cimport PyNumber_Index
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import operator

import numpy as np

from tep._kernels._typedefs cimport int32_t, int64_t, intp_t, uint32_t, uint64_t

cdef intp_t MAX_LEN = 0x7FFFFFFE       # positions are int32 and 0 marks an empty entry
cdef int64_t MAX_TOKEN = 0x7FFFFFFF


# ---- kernels ---------------------------------------------------------------------------------

cdef inline uint64_t ng_hash(const int32_t* t, intp_t n) noexcept nogil:
    """Hash of the n tokens t[0:n]: a multiply-xorshift chain, a splitmix64-style finish."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef intp_t i
    for i in range(n):
        h = (h ^ <uint32_t>t[i]) * 0xBF58476D1CE4E5B9ULL
        h ^= h >> 29
    h *= 0x94D049BB133111EBULL
    return h ^ (h >> 32)


cdef int table_grow(NgTable* tab, const int32_t* toks, intp_t n,
                    size_t* nbytes) noexcept nogil:
    """Double tab's capacity (16 on first use), re-placing every entry."""
    cdef intp_t cap = tab.cap * 2 if tab.cap else 16, mask = cap - 1, i, j
    cdef NgEntry* e = <NgEntry*>malloc(cap * sizeof(NgEntry))
    if e == NULL:
        return NG_NO_MEMORY
    memset(e, 0, cap * sizeof(NgEntry))
    for i in range(tab.cap):
        if tab.e[i].pos != 0:
            j = <intp_t>(ng_hash(toks + tab.e[i].pos - n, n) & <uint64_t>mask)
            while e[j].pos != 0:
                j = (j + 1) & mask
            e[j] = tab.e[i]
    free(tab.e)
    nbytes[0] += (cap - tab.cap) * sizeof(NgEntry)
    tab.e = e
    tab.cap = cap
    return NG_OK


cdef intp_t table_find(const NgTable* tab, const int32_t* toks, intp_t end, intp_t n,
                       uint64_t h) noexcept nogil:
    """The entry of tab holding the n-gram toks[end - n:end] (of hash h), or the empty
    entry where it would go (tab.cap > 0, and the load factor keeps an empty entry)."""
    cdef uint32_t tag = <uint32_t>(h >> 32)
    cdef intp_t mask = tab.cap - 1
    cdef intp_t j = <intp_t>(h & <uint64_t>mask)
    cdef const NgEntry* e
    while True:
        e = &tab.e[j]
        if e.pos == 0 or (e.tag == tag and memcmp(toks + e.pos - n, toks + end - n,
                                                  n * sizeof(int32_t)) == 0):
            return j
        j = (j + 1) & mask


cdef int table_put(NgTable* tab, const int32_t* toks, intp_t p, intp_t n,
                   size_t* nbytes) noexcept nogil:
    """Record that the n-gram toks[p - n:p] is followed by position p (a later occurrence
    replaces an earlier one: the latest wins)."""
    cdef NgEntry* e
    cdef uint64_t h
    if (tab.used + 1) * 2 > tab.cap:       # load factor <= 1/2: short probe runs
        if table_grow(tab, toks, n, nbytes) != NG_OK:
            return NG_NO_MEMORY
    h = ng_hash(toks + p - n, n)
    e = &tab.e[table_find(tab, toks, p, n, h)]
    if e.pos == 0:
        e.tag = <uint32_t>(h >> 32)
        tab.used += 1
    e.pos = <int32_t>p
    return NG_OK


cdef intp_t table_get(const NgTable* tab, const int32_t* toks, intp_t L,
                      intp_t n) noexcept nogil:
    """The position after the latest indexed occurrence of toks[L - n:L], or 0."""
    if tab.cap == 0:
        return 0
    return tab.e[table_find(tab, toks, L, n, ng_hash(toks + L - n, n))].pos


cdef int ng_index(NgSlot* s, const NgConf* c, size_t* nbytes) noexcept nogil:
    """Index the n-grams of slot s ending at positions done .. len - 2 (those whose
    continuation exists), in order, so the latest occurrence of each wins. nbytes[0] grows
    by the bytes the tables grow by. NG_NO_MEMORY leaves the slot consistent (resumable)."""
    cdef intp_t end, j, n
    for end in range(s.done, s.len - 1):
        for j in range(c.n_sizes):
            n = c.sizes[j]
            if end + 1 >= n:
                if table_put(&s.tables[j], s.toks, end + 1, n, nbytes) != NG_OK:
                    s.done = end      # putting an n-gram again is harmless: resume here
                    return NG_NO_MEMORY
    if s.len - 1 > s.done:
        s.done = s.len - 1
    return NG_OK


cdef int ng_lookup(NgSlot* s, const NgConf* c, intp_t* q_out, intp_t* m_out,
                   size_t* nbytes) noexcept nogil:
    """Index what is pending, then find the latest earlier occurrence of the slot's last n
    tokens, for n in c.sizes in order (the first size found wins).

    q_out[0] (OUT): the position right after that occurrence (the drafts are
    toks[q:q + k]; 1 <= q <= len - 1), or 0 when no size matches. m_out[0] (OUT): the
    match length in tokens (n, extended backwards while the tokens before both
    occurrences agree, at most max(n, min(reach, q))), 0 when no match."""
    cdef intp_t L = s.len, j, n, q, m, lim
    cdef int st
    q_out[0] = 0
    m_out[0] = 0
    st = ng_index(s, c, nbytes)
    if st != NG_OK:
        return st
    for j in range(c.n_sizes):
        n = c.sizes[j]
        if L >= n:
            q = table_get(&s.tables[j], s.toks, L, n)
            if q != 0:
                # how far the match reaches back: a long one is a copied run
                m = n
                lim = c.reach if c.reach < q else q
                while m < lim and s.toks[q - 1 - m] == s.toks[L - 1 - m]:
                    m += 1
                q_out[0] = q
                m_out[0] = m
                return NG_OK
    return NG_OK


# ---- argument checks -------------------------------------------------------------------------

cdef object _token_array(object obj, str name):
    """obj as a C-contiguous int32 [n] array of token ids in [0, 2**31 - 1]."""
    a = np.asarray(obj)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, np.int32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > MAX_TOKEN:
        raise ValueError(f"{name}: token ids must be in [0, {MAX_TOKEN}], "
                         f"got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(a, np.int32)


cdef int64_t _token(object t) except -1:
    """One token id (a Python or numpy integer, never a float) in [0, 2**31 - 1]."""
    cdef int64_t v
    try:
        v = PyNumber_Index(t)
    except OverflowError:
        v = -1
    if v < 0 or v > MAX_TOKEN:
        raise ValueError(f"tokens: token ids must be in [0, {MAX_TOKEN}], got {t!r}")
    return v


cdef int _read_int64(object obj, int64_t* out, intp_t n, str name) except -1:
    """Copy obj (a list/tuple of integers, or an integer array [n]) into out[n]; lists and
    tuples element by element (a float is refused, never truncated)."""
    cdef intp_t i = 0
    cdef const int64_t[::1] v
    if isinstance(obj, (list, tuple)):
        try:
            for i in range(n):
                out[i] = PyNumber_Index(obj[i])
        except OverflowError:
            raise ValueError(f"{name}: {obj[i]!r} is out of range") from None
        return 0
    a = np.asarray(obj)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: {a.max()} is out of range")
    v = np.ascontiguousarray(a, np.int64)
    if n:
        memcpy(out, &v[0], n * sizeof(int64_t))
    return 0


# ---- the index -------------------------------------------------------------------------------

cdef class NgramIndex:
    """Per-slot n-gram indexes for the n-gram draft source (see the module docstring).

    NgramIndex(slots, sizes, reach): ``slots`` slots (0 .. slots - 1), n-gram ``sizes``
    tried in the order given (1..16 sizes, each >= 1), match lengths measured up to
    ``reach`` tokens back. The batched lookups run without the GIL; a call that would
    change or read a slot while one of them runs in another thread raises RuntimeError.
    """
    cdef NgSlot* _slots
    cdef NgTable* _tables          # [n_slots * n_sizes], slot i's at i * n_sizes
    cdef intp_t _n
    cdef NgConf _conf
    cdef size_t _nbytes            # bytes held: bookkeeping + live slots' buffers and tables
    cdef bint _busy

    def __cinit__(self, Py_ssize_t slots, sizes, Py_ssize_t reach):
        cdef intp_t i, ns
        self._slots = NULL
        self._tables = NULL
        sizes = tuple(operator.index(n) for n in sizes)
        ns = len(sizes)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not 1 <= ns <= NG_MAX_SIZES:
            raise ValueError(f"sizes: need 1..{NG_MAX_SIZES} n-gram sizes, got {ns}")
        if any(not 1 <= n <= MAX_LEN for n in sizes):
            raise ValueError(f"sizes must be >= 1, got {sizes}")
        if reach < 0:
            raise ValueError(f"reach must be >= 0, got {reach}")
        for i in range(ns):
            self._conf.sizes[i] = sizes[i]
        self._conf.n_sizes = ns
        self._conf.reach = reach
        self._slots = <NgSlot*>calloc(slots, sizeof(NgSlot))
        self._tables = <NgTable*>calloc(slots * ns, sizeof(NgTable))
        if self._slots == NULL or self._tables == NULL:
            raise MemoryError()
        self._n = slots
        for i in range(slots):
            self._slots[i].tables = self._tables + i * ns
        self._nbytes = slots * sizeof(NgSlot) + slots * ns * sizeof(NgTable)

    def __dealloc__(self):
        cdef intp_t i
        if self._slots != NULL:
            for i in range(self._n):
                self._clear(&self._slots[i])
        free(self._slots)
        free(self._tables)

    # -- helpers (GIL held)
    cdef void _clear(self, NgSlot* s) noexcept:
        cdef intp_t j
        for j in range(self._conf.n_sizes):
            free(s.tables[j].e)
            self._nbytes -= s.tables[j].cap * sizeof(NgEntry)
            s.tables[j].e = NULL
            s.tables[j].cap = 0
            s.tables[j].used = 0
        free(s.toks)
        self._nbytes -= s.cap * sizeof(int32_t)
        s.toks = NULL
        s.cap = s.len = s.done = 0
        s.live = False

    cdef NgSlot* _at(self, Py_ssize_t slot, bint need_live) except NULL:
        if self._busy:
            raise RuntimeError("NgramIndex is in use (a call on it runs in another thread)")
        if not 0 <= slot < self._n:
            raise IndexError(f"slot {slot} is outside [0, {self._n})")
        if need_live and not self._slots[slot].live:
            raise ValueError(f"slot {slot} holds no sequence (never admitted, or released)")
        return &self._slots[slot]

    cdef int _reserve(self, NgSlot* s, intp_t need) except -1:
        cdef intp_t cap
        cdef int32_t* p
        if need <= s.cap:
            return 0
        if need > MAX_LEN:
            raise ValueError(f"a slot holds at most {MAX_LEN} tokens")
        cap = max(need, 2 * s.cap, 64)
        cap = min(cap, MAX_LEN)
        p = <int32_t*>realloc(s.toks, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self._nbytes += (cap - s.cap) * sizeof(int32_t)
        s.toks = p
        s.cap = cap
        return 0

    # -- properties
    @property
    def slots(self):
        """How many slots the index has."""
        return self._n

    @property
    def sizes(self):
        """The n-gram sizes, in lookup order."""
        return tuple(self._conf.sizes[i] for i in range(self._conf.n_sizes))

    @property
    def reach(self):
        """The most tokens a match length is measured over."""
        return self._conf.reach

    @property
    def nbytes(self):
        """Bytes of C memory held: fixed bookkeeping plus every live slot's token buffer and
        tables (back to the value after construction once every slot is released)."""
        return self._nbytes

    # -- operations
    def live(self, Py_ssize_t slot):
        """True while ``slot`` holds a sequence (admitted and not released)."""
        if not 0 <= slot < self._n:
            raise IndexError(f"slot {slot} is outside [0, {self._n})")
        return bool(self._slots[slot].live)

    def length(self, Py_ssize_t slot):
        """The number of tokens ``slot`` holds (prompt + extended)."""
        return self._at(slot, True).len

    # Converting the arguments may run Python code (__index__, __array__), and so another
    # thread: the slot is checked again after it, and nothing between that check and the
    # end of a change runs Python code. A call that builds Python objects from a slot's
    # tokens holds _busy meanwhile (a collection may run __del__ code).
    def admit(self, Py_ssize_t slot, prompt):
        """Start ``slot`` with ``prompt`` (token ids, int [P], P may be 0), replacing what it
        held."""
        self._at(slot, False)
        cdef const int32_t[::1] a = _token_array(prompt, "prompt")
        cdef intp_t n = a.shape[0]
        cdef NgSlot* s = self._at(slot, False)
        self._clear(s)
        self._reserve(s, n)
        if n:
            memcpy(s.toks, &a[0], n * sizeof(int32_t))
        s.len = n
        s.live = True

    def extend(self, Py_ssize_t slot, tokens):
        """Append ``tokens`` (a list/tuple of ints, or an int array [n]) to ``slot``. Nothing
        is appended when any id is bad."""
        cdef int32_t small[16]
        cdef const int32_t* src = small
        cdef const int32_t[::1] a
        cdef intp_t n, i
        cdef NgSlot* s = self._at(slot, True)
        if isinstance(tokens, (tuple, list)) and len(tokens) <= 16:  # the engine's 1 a step
            n = len(tokens)
            for i in range(n):
                small[i] = <int32_t>_token(tokens[i])
        else:
            a = _token_array(tokens, "tokens")
            n = a.shape[0]
            if n:
                src = &a[0]
        s = self._at(slot, True)
        self._reserve(s, s.len + n)
        if n:
            memcpy(s.toks + s.len, src, n * sizeof(int32_t))
        s.len += n

    def release(self, Py_ssize_t slot):
        """Free everything ``slot`` holds (a released slot may be admitted again)."""
        self._clear(self._at(slot, False))

    def propose(self, Py_ssize_t slot, Py_ssize_t k):
        """(drafts, match): up to k draft tokens for ``slot`` (a list; empty when no n-gram
        of the last tokens occurred before, or k == 0) and the match length (0 with no
        drafts)."""
        cdef NgSlot* s = self._at(slot, True)
        cdef intp_t q, m, i
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k == 0:
            return [], 0
        if ng_lookup(s, &self._conf, &q, &m, &self._nbytes) != NG_OK:
            raise MemoryError("n-gram index")
        if q == 0:
            return [], 0
        k = min(k, s.len - q)
        self._busy = True
        try:
            return [s.toks[q + i] for i in range(k)], m
        finally:
            self._busy = False

    cdef intp_t _lookup_many(self, object slots, object k, int64_t** rows) except -1:
        """Read slots and k (int [B] each) into rows[0] (malloc'd int64 [4, B]: slots, k,
        q, m; the caller frees it), check every row (GIL held), then look all up without
        the GIL: q and m as ng_lookup gives them (0 where k == 0). Returns B with _busy
        set (the caller clears it once its output is built); on an error _busy is as it
        was."""
        cdef intp_t B = len(slots), r, q, m
        cdef int64_t* sv
        cdef int64_t* kv
        cdef int st = NG_OK
        if len(k) != B:
            raise ValueError(f"slots and k must have the same length, got {B} and {len(k)}")
        sv = rows[0] = <int64_t*>malloc((4 * B + 1) * sizeof(int64_t))
        if sv == NULL:
            raise MemoryError()
        kv = sv + B
        _read_int64(slots, sv, B, "slots")
        _read_int64(k, kv, B, "k")
        for r in range(B):
            self._at(sv[r], True)
            if kv[r] < 0:
                raise ValueError(f"k must be >= 0, got {kv[r]} (row {r})")
        self._busy = True               # the caller clears it once its output is built
        with nogil:
            for r in range(B):
                q = m = 0
                if kv[r] > 0 and st == NG_OK:
                    st = ng_lookup(&self._slots[sv[r]], &self._conf, &q, &m, &self._nbytes)
                sv[2 * B + r] = q
                sv[3 * B + r] = m
        if st != NG_OK:
            self._busy = False
            raise MemoryError("n-gram index")
        return B

    def propose_many(self, slots, k):
        """Drafts for B slots in one call (the lookups run without the GIL).

        slots, k: int [B] (arrays or lists; a slot may appear more than once; k[r] >= 0).
        Returns (drafts int32 [B, W] padded with -1, n int64 [B] drafts per row, match
        int64 [B] match lengths, 0 where n == 0); W = max(k) capped at the longest
        requested slot's length (no row can have more drafts)."""
        cdef int64_t* rows = NULL
        cdef intp_t B, r, c, i, W = 0, q
        cdef NgSlot* s
        cdef int32_t[:, ::1] dv
        cdef int64_t[::1] nv
        cdef int64_t[::1] mv
        try:
            B = self._lookup_many(slots, k, &rows)
            try:
                for r in range(B):
                    W = max(W, min(rows[B + r], self._slots[rows[r]].len))
                drafts = np.empty((B, W), np.int32)
                n = np.empty(B, np.int64)
                match = np.empty(B, np.int64)
                dv, nv, mv = drafts, n, match
                for r in range(B):
                    s = &self._slots[rows[r]]
                    q = rows[2 * B + r]
                    c = min(rows[B + r], s.len - q) if q else 0
                    if c:
                        memcpy(&dv[r, 0], s.toks + q, c * sizeof(int32_t))
                    for i in range(c, W):
                        dv[r, i] = -1
                    nv[r] = c
                    mv[r] = rows[3 * B + r]
            finally:
                self._busy = False
        finally:
            free(rows)
        return drafts, n, match

    def propose_lists(self, slots, k):
        """:meth:`propose_many` with lists for out: (drafts, match), drafts[r] a list of up
        to k[r] ints, match[r] its match length (0 with no drafts) - for a caller that
        wants Python lists anyway (the engine), made here at C speed."""
        cdef int64_t* rows = NULL
        cdef intp_t B, r, c, i, q
        cdef NgSlot* s
        try:
            B = self._lookup_many(slots, k, &rows)
            try:
                drafts = [None] * B
                match = [0] * B
                for r in range(B):
                    s = &self._slots[rows[r]]
                    q = rows[2 * B + r]
                    c = min(rows[B + r], s.len - q) if q else 0
                    drafts[r] = [s.toks[q + i] for i in range(c)]
                    if c:
                        match[r] = rows[3 * B + r]
            finally:
                self._busy = False
        finally:
            free(rows)
        return drafts, match
