# cython: cdivision=True
"""Speculative-decoding verification (compiled; use tep.kernels.verify).

A sequence proposes k draft tokens d_0..d_{k-1}; the target model returns k + 1 logits rows
for it in one forward (row j = the distribution after the sequence plus d_0..d_{j-1}).
Exact-match verification samples row j with the sampler's own row function, the same
knobs and edits, Philox keyed on (seed, step + j), and the output history extended by the
tokens accepted so far; the draft is accepted while d_j equals that sample. The run ends
at the first mismatch with the target's own token there (or, when all k are accepted, the
bonus token of row k). Every emitted token is therefore exactly what sampling one step at
a time would have produced from the same logits rows: a seeded output does not change
with speculation, at any temperature or knob setting.
"""
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from tep._kernels._typedefs cimport (float32_t, float64_t, int32_t, int64_t, intp_t,
                                     uint8_t, uint32_t, uint64_t)
from tep._kernels.sampling cimport (TEP_NO_MEMORY, TEP_OK, Knobs, Ragged, RowEdits,
                                    Scratch, raw_logprobs_row, ragged_row, sample_row,
                                    scratch_alloc, scratch_free, set_ragged)

cdef extern from "_simd.h" nogil:
    int tep_mask_all_ones(const uint32_t* mask, Py_ssize_t n)

cdef enum:
    TEP_BAD_DRAFT = 5       # a draft id outside [0, V) (the wrapper checks; re-checked here)


cdef int verify_row(const float32_t* x, intp_t V, const int32_t* draft, intp_t k,
                    const Knobs* kn, RowEdits* ed, int32_t* hist, Scratch* sc,
                    int n_top, bint want_lp, int64_t* tok_out, intp_t* n_out,
                    float32_t* lp_out, int64_t* rank_out, int64_t* top_ids_out,
                    float32_t* top_lp_out, const uint32_t* mask, intp_t mask_words) noexcept nogil:
    """Verify one sequence's k drafts against its k + 1 logits rows x[(k+1)*V] (IN).

    tok_out[k+1] (OUT) gets the emitted tokens, n_out[0] how many (1..k+1 on TEP_OK; on an
    error the tokens before the failing row, which the caller may still deliver). hist,
    when not NULL, has room for ed.n_output + k ids: the output history is copied there
    and grown by each accepted token (the penalties see what a step-by-step run sees).
    mask, when not NULL, holds k + 1 bitmask rows of mask_words words (row j for position
    j). lp_out/rank_out [k+1] and top_*_out [(k+1)*n_top] are written when want_lp."""
    cdef Knobs kj = kn[0]
    cdef RowEdits ej = ed[0]
    cdef intp_t j
    cdef int64_t t = 0
    cdef int st
    n_out[0] = 0
    for j in range(k):
        if draft[j] < 0 or draft[j] >= V:
            return TEP_BAD_DRAFT
    if hist != NULL:
        if ej.n_output > 0:
            memcpy(hist, ej.output_ids, ej.n_output * sizeof(int32_t))
        ej.output_ids = hist
    for j in range(k + 1):
        kj.step = kn.step + <uint64_t>j
        ej.mask = NULL
        if mask != NULL:
            ej.mask = mask + j * mask_words
            if tep_mask_all_ones(ej.mask, V):
                ej.mask = NULL
        st = sample_row(x + j * V, V, &kj, &ej, sc, &t)
        if st != TEP_OK:
            return st
        if want_lp:
            st = raw_logprobs_row(x + j * V, V, t, n_top, False, sc, &lp_out[j], &rank_out[j],
                                  top_ids_out + j * n_top, top_lp_out + j * n_top)
            if st != TEP_OK:
                return st
        tok_out[j] = t
        n_out[0] = j + 1
        if j == k or t != draft[j]:
            break
        if hist != NULL:
            hist[ej.n_output] = <int32_t>t
            ej.n_output += 1
    return TEP_OK


cdef struct VBatch:
    const float32_t* logits
    intp_t n_logit_rows
    intp_t V
    const int64_t* row_start
    const int64_t* n_draft
    const int32_t* drafts
    intp_t kmax
    const float64_t* knobs
    intp_t knob_cols
    intp_t knob_stride
    const uint64_t* seed
    intp_t seed_stride
    const uint64_t* step
    intp_t step_stride
    Ragged prompt
    Ragged output
    Ragged bias
    Ragged allowed
    const uint8_t* has_allowed
    const uint32_t* mask          # [n_logit_rows, mask_words] or NULL
    intp_t mask_words
    int n_top
    bint want_lp
    int64_t* out_tok              # [B, kmax + 1]
    int64_t* out_count            # [B]
    int32_t* out_status           # [B]
    float32_t* out_lp             # [B, kmax + 1]
    int64_t* out_rank
    int64_t* out_top_ids          # [B, kmax + 1, n_top]
    float32_t* out_top_lp


cdef void vbatch_row(intp_t r, const VBatch* bt, Scratch* sc, int32_t* hist) noexcept nogil:
    cdef Knobs kn
    cdef RowEdits ed
    cdef const float64_t* kv = bt.knobs + r * bt.knob_stride
    cdef intp_t c = bt.knob_cols, a, k = bt.n_draft[r], n = 0, w = bt.kmax + 1
    cdef int64_t r0 = bt.row_start[r]
    cdef int st
    cdef bint pen
    bt.out_count[r] = 0
    if k < 0 or k > bt.kmax or r0 < 0 or r0 + k + 1 > bt.n_logit_rows:
        bt.out_status[r] = TEP_BAD_DRAFT
        return
    kn.temperature = <float>kv[0]
    kn.top_k = <int64_t>kv[c]
    kn.top_p = <float>kv[2 * c]
    kn.min_p = <float>kv[3 * c]
    kn.repetition_penalty = <float>kv[4 * c]
    kn.presence_penalty = <float>kv[5 * c]
    kn.frequency_penalty = <float>kv[6 * c]
    kn.seed = bt.seed[r * bt.seed_stride]
    kn.step = bt.step[r * bt.step_stride]
    ed.n_prompt = ragged_row(&bt.prompt, r, &a); ed.prompt_ids = bt.prompt.ids + a
    ed.n_output = ragged_row(&bt.output, r, &a); ed.output_ids = bt.output.ids + a
    ed.n_bias = ragged_row(&bt.bias, r, &a)
    ed.bias_ids = bt.bias.ids + a; ed.bias_values = bt.bias.vals + a
    ed.n_allowed = ragged_row(&bt.allowed, r, &a); ed.allowed_ids = bt.allowed.ids + a
    ed.has_allowed = bt.has_allowed[r] != 0
    ed.mask = NULL
    pen = (kn.repetition_penalty != 1.0 or kn.presence_penalty != 0.0
           or kn.frequency_penalty != 0.0)
    st = verify_row(bt.logits + r0 * bt.V, bt.V, bt.drafts + r * bt.kmax, k, &kn, &ed,
                    hist if pen and k > 0 else NULL, sc, bt.n_top, bt.want_lp,
                    bt.out_tok + r * w, &n, bt.out_lp + (r * w if bt.want_lp else 0),
                    bt.out_rank + (r * w if bt.want_lp else 0),
                    bt.out_top_ids + r * w * bt.n_top, bt.out_top_lp + r * w * bt.n_top,
                    bt.mask + r0 * bt.mask_words if bt.mask != NULL else NULL,
                    bt.mask_words)
    bt.out_count[r] = n
    bt.out_status[r] = st


def verify_batch(const float32_t[:, ::1] logits, const int64_t[::1] row_start,
                 const int64_t[::1] n_draft, const int32_t[:, ::1] drafts,
                 const float64_t[:, ::1] knobs, const uint64_t[::1] seed,
                 const uint64_t[::1] step,
                 const int32_t[::1] prompt_ids, const int64_t[::1] prompt_starts,
                 const int64_t[::1] prompt_ends,
                 const int32_t[::1] output_ids, const int64_t[::1] output_starts,
                 const int64_t[::1] output_ends,
                 const int32_t[::1] bias_ids, const float32_t[::1] bias_values,
                 const int64_t[::1] bias_starts, const int64_t[::1] bias_ends,
                 const int32_t[::1] allowed_ids, const int64_t[::1] allowed_starts,
                 const int64_t[::1] allowed_ends, const uint8_t[::1] has_allowed,
                 const uint32_t[:, ::1] bitmask, bint use_bitmask,
                 int n_top, bint want_logprobs, bint need_work, Py_ssize_t max_history,
                 Py_ssize_t max_output, int n_threads,
                 int64_t[:, ::1] out_tokens, int64_t[::1] out_count, int32_t[::1] out_status,
                 float32_t[:, ::1] out_logprobs, int64_t[:, ::1] out_ranks,
                 int64_t[:, :, ::1] out_top_ids, float32_t[:, :, ::1] out_top_logprobs):
    """Verify B sequences' drafts; the wrapper has validated every argument.

    logits [N, V]: sequence r owns rows row_start[r] .. row_start[r] + n_draft[r];
    drafts [B, K] int32 (row r's first n_draft[r] are its drafts). knobs [7, 1 or B]
    (sample_batch's layout), seed/step [1 or B], ragged edits as in sample_batch (the
    output history is the one before the drafts). bitmask [N, W] (when use_bitmask): one
    row per logits row. max_history bounds prompt + output + K, max_output output + K.
    out_tokens [B, K+1] / out_count [B] / out_status [B] always; out_logprobs, out_ranks
    [B, K+1] and out_top_* [B, K+1, n_top] when want_logprobs. No GIL; rows over n_threads.
    """
    cdef intp_t B = row_start.shape[0], V = logits.shape[1], r
    cdef Scratch* psc
    cdef int32_t* hist
    cdef VBatch bt
    cdef int ok
    if B == 0:
        return
    bt.logits = &logits[0, 0]; bt.n_logit_rows = logits.shape[0]; bt.V = V
    bt.row_start = &row_start[0]; bt.n_draft = &n_draft[0]
    bt.drafts = &drafts[0, 0]; bt.kmax = drafts.shape[1]
    bt.knobs = &knobs[0, 0]; bt.knob_cols = knobs.shape[1]
    bt.knob_stride = 1 if knobs.shape[1] > 1 else 0
    bt.seed = &seed[0]; bt.seed_stride = 1 if seed.shape[0] > 1 else 0
    bt.step = &step[0]; bt.step_stride = 1 if step.shape[0] > 1 else 0
    set_ragged(&bt.prompt, prompt_ids, NULL, prompt_starts, prompt_ends)
    set_ragged(&bt.output, output_ids, NULL, output_starts, output_ends)
    set_ragged(&bt.bias, bias_ids, &bias_values[0], bias_starts, bias_ends)
    set_ragged(&bt.allowed, allowed_ids, NULL, allowed_starts, allowed_ends)
    if bias_values.shape[0] < bias_ids.shape[0]:
        bt.bias.n_ids = bias_values.shape[0]
    bt.has_allowed = &has_allowed[0]
    bt.mask = &bitmask[0, 0] if use_bitmask else NULL
    bt.mask_words = bitmask.shape[1]
    bt.n_top = n_top; bt.want_lp = want_logprobs
    bt.out_tok = &out_tokens[0, 0]; bt.out_count = &out_count[0]
    bt.out_status = &out_status[0]
    bt.out_lp = &out_logprobs[0, 0]; bt.out_rank = &out_ranks[0, 0]
    bt.out_top_ids = &out_top_ids[0, 0, 0] if n_top > 0 else NULL
    bt.out_top_lp = &out_top_logprobs[0, 0, 0] if n_top > 0 else NULL
    need_work = need_work or use_bitmask
    with nogil, parallel(num_threads=<int>min(max(n_threads, 1), B)):
        # assigned inside the parallel block: each thread has its own scratch and history
        psc = <Scratch*>malloc(sizeof(Scratch))
        hist = <int32_t*>malloc((max_output + 1) * sizeof(int32_t))
        ok = TEP_NO_MEMORY
        if psc != NULL and hist != NULL:
            ok = scratch_alloc(psc, V, need_work, max_history, want_logprobs)
        for r in prange(B, schedule="static"):
            if ok != TEP_OK:
                out_status[r] = ok
                out_count[r] = 0
            else:
                vbatch_row(r, &bt, psc, hist)
        if psc != NULL:
            if ok == TEP_OK:
                scratch_free(psc)
            free(psc)
        free(hist)


# ---- rejection sampling (draft-model drafts with a distribution) -----------------------------

from libc.math cimport exp, INFINITY
from tep._kernels.sampling cimport TEP_NO_FINITE, TEP_POS_INF, philox_uniform

cdef uint64_t KEY_ACCEPT = 0x9E3779B97F4A7C15ULL   # independent Philox keys per draw kind
cdef uint64_t KEY_RESIDUAL = 0xD1B54A32D192ED03ULL


cdef int target_probs(const float32_t* x, intp_t V, float temperature,
                      float64_t* p) noexcept nogil:
    """p[0:V] = softmax(x / T) in double (NaN counts as -inf); T < 1e-5 is one-hot on the
    argmax (lowest id on ties)."""
    cdef intp_t i, best = -1
    cdef float m = -INFINITY, v
    cdef double z = 0.0, inv
    for i in range(V):
        v = x[i]
        if v == INFINITY:
            return TEP_POS_INF
        if v > m:
            m = v
            best = i
    if best < 0:
        return TEP_NO_FINITE
    if temperature < 1e-5:
        for i in range(V):
            p[i] = 0.0
        p[best] = 1.0
        return TEP_OK
    inv = 1.0 / <double>temperature
    for i in range(V):
        v = x[i]
        p[i] = exp((<double>v - <double>m) * inv) if v > -INFINITY else 0.0
        z += p[i]
    for i in range(V):
        p[i] /= z
    return TEP_OK


cdef int64_t draw(const float64_t* w, intp_t V, double total, double u) noexcept nogil:
    """Inverse CDF over non-negative weights w (sum total): the last positive index when
    rounding leaves the target past the end."""
    cdef double acc = 0.0, target = u * total
    cdef intp_t i, last = -1
    for i in range(V):
        if w[i] > 0.0:
            acc += w[i]
            last = i
            if target < acc:
                return i
    return last


cdef int rejection_row(const float32_t* x, intp_t V, const int32_t* draft,
                       const float32_t* q, intp_t k, float temperature, uint64_t seed,
                       uint64_t step, float64_t* p, int64_t* tok_out,
                       intp_t* n_out) noexcept nogil:
    """Leviathan / Chen speculative sampling for one sequence: draft j (drawn from the
    draft distribution q[j*V:(j+1)*V]) is accepted with probability min(1, p_j(d)/q_j(d))
    (p_j = softmax(x_j / T)); the first rejected position draws from the normalised
    residual max(0, p_j - q_j); after k acceptances a bonus token draws from p_k. The
    emitted tokens are distributed exactly as sampling from the target one by one.
    Uniforms: Philox keyed on (seed ^ key, step + j)."""
    cdef intp_t j, i
    cdef int st
    cdef int32_t d
    cdef double pd, qd, z, u
    cdef int64_t t
    n_out[0] = 0
    for j in range(k + 1):
        st = target_probs(x + j * V, V, temperature, p)
        if st != TEP_OK:
            return st
        if j < k:
            d = draft[j]
            if d < 0 or d >= V:
                return TEP_BAD_DRAFT
            pd = p[d]
            qd = q[j * V + d]
            u = philox_uniform(seed ^ KEY_ACCEPT, step + <uint64_t>j)
            if (qd <= 0.0 and pd > 0.0) or (qd > 0.0 and u * qd < pd):
                tok_out[j] = d
                n_out[0] = j + 1
                continue
            z = 0.0
            for i in range(V):
                p[i] = p[i] - <double>q[j * V + i]
                if p[i] < 0.0:
                    p[i] = 0.0
                z += p[i]
            if z <= 0.0:      # p == q up to rounding: the residual is empty; draw from p
                st = target_probs(x + j * V, V, temperature, p)
                z = 1.0
        else:
            z = 1.0
        u = philox_uniform(seed ^ KEY_RESIDUAL, step + <uint64_t>j)
        t = draw(p, V, z, u)
        if t < 0:
            return TEP_NO_FINITE
        tok_out[j] = t
        n_out[0] = j + 1
        return TEP_OK
    return TEP_OK


def rejection_batch(const float32_t[:, ::1] logits, const int64_t[::1] row_start,
                    const int64_t[::1] n_draft, const int32_t[:, ::1] drafts,
                    const float32_t[:, ::1] draft_probs, const int64_t[::1] q_start,
                    const float32_t[::1] temperature, const uint64_t[::1] seed,
                    const uint64_t[::1] step, int n_threads,
                    int64_t[:, ::1] out_tokens, int64_t[::1] out_count,
                    int32_t[::1] out_status):
    """Rejection-sampling verification of B sequences (pre-validated): sequence r owns
    logits rows row_start[r] .. + n_draft[r] and draft-distribution rows q_start[r] ..
    + n_draft[r] - 1 of draft_probs [M, V]; temperature/seed/step [B]."""
    cdef intp_t B = row_start.shape[0], V = logits.shape[1], r, w = drafts.shape[1] + 1
    cdef float64_t* p
    cdef intp_t n
    if B == 0:
        return
    with nogil, parallel(num_threads=<int>min(max(n_threads, 1), B)):
        p = <float64_t*>malloc((V + 1) * sizeof(float64_t))
        for r in prange(B, schedule="static"):
            n = 0
            if p == NULL:
                out_status[r] = TEP_NO_MEMORY
            else:
                out_status[r] = rejection_row(
                    &logits[row_start[r], 0], V, &drafts[r, 0],
                    &draft_probs[q_start[r], 0] if n_draft[r] > 0 else &draft_probs[0, 0],
                    n_draft[r], temperature[r], seed[r], step[r], p, &out_tokens[r, 0], &n)
            out_count[r] = n
        free(p)
