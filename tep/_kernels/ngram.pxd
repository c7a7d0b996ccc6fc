# N-gram draft lookup (speculative decoding). Per slot a token buffer and open-addressing
# n-gram tables; `noexcept nogil`, returning a status. The Python user is NgramIndex
# (ngram.pyx), driven by tep/engine/speculative.py (NgramDrafter).
from tep._kernels._typedefs cimport int32_t, intp_t, uint32_t

cdef enum NgramStatus:
    NG_OK = 0
    NG_NO_MEMORY = 1

cdef enum:
    NG_MAX_SIZES = 16          # most n-gram sizes one index keeps

cdef struct NgEntry:
    uint32_t tag               # the hash's high 32 bits: most mismatches never read tokens
    int32_t pos                # position right after the n-gram's latest occurrence; 0 = empty

cdef struct NgTable:
    # The key of an entry is not stored: it is toks[pos - n:pos] of the slot's own buffer.
    NgEntry* e                 # [cap], cap a power of two (NULL / 0 before the first n-gram)
    intp_t cap
    intp_t used

cdef struct NgSlot:
    int32_t* toks              # [cap] the prompt, then every emitted token
    intp_t len
    intp_t cap
    intp_t done                # the n-grams ending before position `done` are indexed
    bint live
    NgTable* tables            # [n_sizes], one per n-gram size (in the index's order)

cdef struct NgConf:
    intp_t sizes[NG_MAX_SIZES]  # looked up in this order (the first found wins)
    intp_t n_sizes
    intp_t reach               # the match length is measured up to this many tokens back

cdef int ng_index(NgSlot* s, const NgConf* c, size_t* nbytes) noexcept nogil
cdef int ng_lookup(NgSlot* s, const NgConf* c, intp_t* q_out, intp_t* m_out,
                   size_t* nbytes) noexcept nogil
