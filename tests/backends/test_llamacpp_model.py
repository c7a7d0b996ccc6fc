"""The llama.cpp model on the real GGUF (SmolLM2-135M-Instruct), driven directly.

References: llama-cpp-python's high-level ``Llama`` (its own context and batch code)
on the same file and context settings; the model alone vs in a batch of 16 sequences.
"""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from tep.backends.llamacpp import load_model  # noqa: E402
from tep.engine.chat_template import render_chat  # noqa: E402
from tep.engine.model import StepBatch  # noqa: E402
from support import smollm2  # noqa: E402

CTX = 512
THREADS = 1
N_NEW = 64
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "List three prime numbers.",
    "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning Python.", "Why is the sky blue?",
    "Name a famous painter.", "What do bees make?", "Tell me a short joke.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Suggest a name for a dog.",
]


def _last_logits(llm) -> np.ndarray:
    """The logits of the last token ``llm`` evaluated, read from its llama.cpp context."""
    ptr = llama_cpp.llama_get_logits(llm.ctx)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    path = smollm2.model_path()
    m = load_model(path, context_size=CTX, max_num_seqs=16, n_threads=THREADS)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts(model):
    out = []
    for q in QUESTIONS:
        text = render_chat(model.chat_template, [{"role": "user", "content": q}],
                           bos_token=model.bos_token, eos_token=model.eos_token)
        out.append(model.tokenize(text, add_special=False))
    return out


def _step(seqs: list[tuple[int, list[int], int]]) -> StepBatch:
    """(seq_id, tokens, first position) per sequence -> one StepBatch, logits at the ends."""
    tok, pos, sid, want = [], [], [], []
    for s, toks, p0 in seqs:
        tok += toks
        pos += range(p0, p0 + len(toks))
        sid += [s] * len(toks)
        want += [False] * (len(toks) - 1) + [True]
    return StepBatch(np.array(tok, np.int32), np.array(pos, np.int32),
                     np.array(sid, np.int32), np.array(want, bool))


def greedy(model, prompts: list[list[int]], n_new: int, *, reuse: bool = False):
    """Greedy-decode all prompts together (one forward per step); tokens and the logit
    rows seen at each step, per sequence. Ignores end-of-generation (fixed length)."""
    ids = list(range(len(prompts)))
    fed = []
    for s, p in zip(ids, prompts):
        n = model.reuse_prefix(s, p) if reuse else 0
        fed.append((s, list(p[n:]), n))
    out = [[] for _ in ids]
    rows = [[] for _ in ids]
    lengths = [len(p) for p in prompts]
    try:
        for _ in range(n_new):
            logits = model.forward(_step(fed))
            fed = []
            for s in ids:
                row = logits[s]
                t = int(np.argmax(row))
                out[s].append(t)
                rows[s].append(row.copy())
                fed.append((s, [t], lengths[s]))
                lengths[s] += 1
    finally:
        for s in ids:
            model.release(s)
    return out, rows


@pytest.fixture(scope="module")
def alone(model, prompts):
    out = []
    for p in prompts:
        toks, rows = greedy(model, [p], N_NEW)
        out.append((toks[0], rows[0]))
    return out


def _first_divergence(a_tokens, a_rows, b_tokens, b_rows) -> str:
    for i, (x, y) in enumerate(zip(a_tokens, b_tokens)):
        if x != y:
            r = a_rows[i]
            top2 = np.sort(r)[-2:]
            return (f"first divergence at step {i}: {x} vs {y}; logit margin "
                    f"{top2[1] - top2[0]:.3g}, max |d logit| {np.abs(r - b_rows[i]).max():.3g}")
    return "no divergence"


def test_greedy_alone_equals_llama_cpp_python(model, prompts, alone):
    ref = llama_cpp.Llama(model_path=str(model.model_path), n_ctx=model.context_size,
                          n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                          flash_attn=True, **smollm2.reference_kv(model.kv_type),
                          verbose=False)
    try:
        for k in range(10):
            ref.reset()
            ref.eval(prompts[k])
            toks = []
            for i in range(N_NEW):
                row = _last_logits(ref)
                if i == 0:  # the prompt's last logits, computed independently
                    np.testing.assert_allclose(alone[k][1][0], row, atol=1e-4, rtol=0)
                t = int(np.argmax(row))
                toks.append(t)
                ref.eval([t])
            assert alone[k][0] == toks, (k, _first_divergence(alone[k][0], alone[k][1],
                                                               toks, alone[k][1]))
    finally:
        ref.close()


def test_greedy_alone_equals_batch_of_16_bitwise(model, prompts, alone):
    toks, rows = greedy(model, prompts, N_NEW)
    for k in range(len(prompts)):
        assert toks[k] == alone[k][0], (k, _first_divergence(alone[k][0], alone[k][1],
                                                            toks[k], rows[k]))
        # flash attention on: the logits themselves are the same bits
        assert np.array_equal(np.stack(rows[k]), np.stack(alone[k][1])), k


def test_prefix_reuse_gives_the_same_tokens_and_counts_hits(model, prompts, alone):
    before = model.prefix_cache_stats()
    # prompts[0] again, then prompts[1] (shares the template's system turn)
    greedy(model, [prompts[0]], 1, reuse=True)
    toks, _ = greedy(model, [prompts[1]], N_NEW, reuse=True)
    after = model.prefix_cache_stats()
    assert toks[0] == alone[1][0]
    shared = 0
    while prompts[0][shared] == prompts[1][shared]:
        shared += 1
    assert shared > 10  # the default system turn
    assert after.reused_tokens - before.reused_tokens >= shared
    assert 0 < after.hit_rate <= 1


def test_position_past_the_context_is_a_value_error_and_the_model_still_works(model, prompts, alone):
    bad = StepBatch(np.array([1], np.int32), np.array([model.context_size], np.int32),
                    np.array([0], np.int32), np.array([True]))
    with pytest.raises(ValueError, match="context"):
        model.forward(bad)
    model.release(0)
    with pytest.raises(ValueError, match="vocabulary"):
        model.detokenize([model.vocab_size])
    toks, _ = greedy(model, [prompts[2]], 8)
    assert toks[0] == alone[2][0][:8]


def test_vocab_metadata(model):
    assert model.vocab_size == 49152
    im_end = model.tokenize("<|im_end|>", add_special=False)
    assert len(im_end) == 1 and im_end[0] in model.eog_token_ids
    assert model.eos_token_id in model.eog_token_ids
    assert model.context_size == CTX and model.max_num_seqs == 16


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café 中文 🙂", "  two  spaces\n"])
def test_tokenize_detokenize_round_trip_and_pieces_join(model, text):
    ids = model.tokenize(text, add_special=False)
    assert model.detokenize(ids) == text.encode()
    assert b"".join(model.detokenize([t]) for t in ids) == text.encode()


@pytest.mark.parametrize("way", list(smollm2.exact_ways()))
def test_a_batch_out_of_slot_order_gives_each_sequence_its_own_rows(prompts, way):
    """llama.cpp micro-batches only consecutive slots in batch order, so the model feeds
    a step's sequences sorted by slot: a batch listed in another order must give every
    sequence the same bits as the batch listed in slot order, in its own row."""
    ps = prompts[:3]

    def run(order):
        m = load_model(smollm2.model_path(), context_size=CTX, max_num_seqs=4,
                       n_threads=THREADS, **smollm2.exact_ways()[way])
        try:
            for s in (2, 0, 1):
                m.reuse_prefix(s, ps[s])
            slot = {s: m._slots.slot_of(s) for s in order}
            first = m.forward(_step([(s, ps[s], 0) for s in order])).copy()
            t = {s: int(np.argmax(first[order.index(s)])) for s in order}
            second = m.forward(_step([(s, [t[s]], len(ps[s])) for s in order])).copy()
        finally:
            m.close()
        return slot, {s: (first[order.index(s)], second[order.index(s)]) for s in order}

    slot, _ = run([0, 1, 2])
    by_slot = sorted(slot, key=slot.get)
    _, want = run(by_slot)
    for order in ([0, 1, 2], [1, 2, 0], [2, 1, 0]):
        if order == by_slot:
            continue
        got = run(order)[1]
        for s in order:
            for k in range(2):
                assert np.array_equal(got[s][k], want[s][k]), (order, s, k)
    # the rows really differ between sequences (not one row repeated)
    assert not np.array_equal(want[0][1], want[1][1])


@pytest.mark.parametrize("way", list(smollm2.exact_ways()))
def test_one_token_steps_give_the_same_bits_through_the_list_path_and_the_general_one(prompts,
                                                                                    way):
    """A decode step of several sequences, one token each, takes a shortcut of list
    arithmetic (``_forward_singles``); with the shortcut switched off the same steps go
    through the general path. Both must give every sequence the same logit bits, in its
    own row, and leave the slots holding the same tokens, also when the batch is not in
    slot order."""
    ps = prompts[:3]
    order = [2, 0, 1]

    def run(shortcut):
        m = load_model(smollm2.model_path(), context_size=CTX, max_num_seqs=4,
                       n_threads=THREADS, **smollm2.exact_ways()[way])
        if not shortcut:
            m._forward_singles = lambda batch: None
        try:
            for s in (0, 1, 2):          # slots 0, 1, 2; the batch lists them 2, 0, 1
                m.reuse_prefix(s, ps[s])
            out = m.forward(_step([(s, ps[s], 0) for s in order])).copy()
            rows, pos = [out], {s: len(ps[s]) for s in order}
            for _ in range(3):
                t = {s: int(np.argmax(rows[-1][i])) for i, s in enumerate(order)}
                rows.append(m.forward(_step([(s, [t[s]], pos[s]) for s in order])).copy())
                pos = {s: p + 1 for s, p in pos.items()}
            held = {s: list(m._slots.tokens(m._slots.slot_of(s))) for s in order}
        finally:
            m.close()
        return rows, held

    fast, fast_held = run(True)
    slow, slow_held = run(False)
    assert fast_held == slow_held
    for a, b in zip(fast, slow):
        assert np.array_equal(a, b)
    assert not np.array_equal(fast[-1][0], fast[-1][1])
