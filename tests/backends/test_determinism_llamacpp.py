"""Determinism by construction on the real GGUF (SmolLM2-135M-Instruct): the logits a
sequence sees are the same bits whether its prefix came from the prefix cache or from its
own prefill, alone or in a batch of 16 or 64, in any arrival order, after any history.

References: the same model with nothing cached (cold: a wiped slot, the whole prompt
fed), and llama-cpp-python's ``Llama`` run directly on the same prompt tokens.

Every test runs three ways: an f16 KV cache (the default) with llama.cpp's CPU backend
switched to its reference kernels, so only the per-row attention kernel runs and steps
go to llama.cpp as they come; an f16 cache fed by exact mode's rules instead (the
fallback where that switch is not available), which keep the tiled and KV-split kernels
from running; and a q8_0 cache, for which llama.cpp has only its per-row kernel.

Most tests run llama.cpp on one thread (fast on a busy CI box: its threads spin-wait);
the long-prompt test runs two, since the kernel that exact mode avoids past position 255
only differs from the per-row one with more than one thread.
"""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tep.backend import Sampling, StreamSink  # noqa: E402
from tep.backends.llamacpp import load_model  # noqa: E402
from tep.engine.chat_template import render_chat  # noqa: E402
from tep.engine.engine import Engine  # noqa: E402
from tep.engine.model import StepBatch  # noqa: E402
from support import smollm2  # noqa: E402

CTX = 256
THREADS = 1
LONG_CTX = 512
LONG_THREADS = 2
A = [{"role": "user", "content": "Translate 'good morning' into French and Spanish."}]
B = [{"role": "user", "content": "What is 12 times 7?"},
     {"role": "assistant", "content": "12 times 7 is 84."},
     {"role": "user", "content": "And 13 times 7?"}]
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "List three prime numbers.",
    "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Describe a cat.", "Give me a tip for learning Python.",
    "Why is the sky blue?", "Name a famous painter.", "What do bees make?",
    "Tell me a short joke.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Suggest a name for a dog.",
]
LONG = " ".join(f"Item {i} is painted blue and sits on shelf {i % 7}." for i in range(30))


WAYS = smollm2.exact_ways()


def _check_way(m, way: str) -> None:
    assert m.exact
    # on the llama.cpp build CI installs the switch must work: the rules are the fallback
    assert m.reference_kernels == (way == "f16"), m.reference_kernels_note


@pytest.fixture(scope="module", params=list(WAYS))
def model(request):
    path = smollm2.model_path()
    m = load_model(path, context_size=CTX, max_num_seqs=64, n_threads=THREADS,
                   **WAYS[request.param])
    _check_way(m, request.param)
    yield m
    m.close()


@pytest.fixture(scope="module", params=list(WAYS))
def long_model(request):
    m = load_model(smollm2.model_path(), context_size=LONG_CTX, max_num_seqs=3,
                   n_threads=LONG_THREADS, **WAYS[request.param])
    _check_way(m, request.param)
    yield m
    m.close()


def chat_ids(model, messages) -> list[int]:
    text = render_chat(model.chat_template, messages, bos_token=model.bos_token,
                       eos_token=model.eos_token)
    return model.tokenize(text, add_special=False)


def _step(seqs) -> StepBatch:
    tok, pos, sid, want = [], [], [], []
    for s, toks, p0 in seqs:
        tok += toks
        pos += range(p0, p0 + len(toks))
        sid += [s] * len(toks)
        want += [False] * (len(toks) - 1) + [True]
    return StepBatch(np.array(tok, np.int32), np.array(pos, np.int32),
                     np.array(sid, np.int32), np.array(want, bool))


def greedy(model, prompts, n_new: int, *, reuse: bool, ids=None):
    """Greedy-decode ``prompts`` together (whole prompts in the first forward, then one
    token each per forward); per prompt its tokens and the stacked logit rows. ``reuse``
    places each with ``reuse_prefix``; without it the model wipes a free slot (cold)."""
    ids = list(range(len(prompts))) if ids is None else ids
    fed = []
    for s, p in zip(ids, prompts):
        n = model.reuse_prefix(s, p) if reuse else 0
        fed.append((s, list(p[n:]), n))
    toks = [[] for _ in ids]
    rows = [[] for _ in ids]
    length = [len(p) for p in prompts]
    try:
        for _ in range(n_new):
            out = model.forward(_step(fed))
            fed = []
            for k, s in enumerate(ids):
                rows[k].append(out[k].copy())
                t = int(np.argmax(out[k]))
                toks[k].append(t)
                fed.append((s, [t], length[k]))
                length[k] += 1
    finally:
        for s in ids:
            model.release(s)
    return toks, [np.stack(r) for r in rows]


def cold(model, prompt, n_new: int):
    toks, rows = greedy(model, [prompt], n_new, reuse=False)
    return toks[0], rows[0]


def assert_same_bits(got, want, what: str) -> None:
    t1, r1 = got
    t0, r0 = want
    n = min(len(r0), len(r1))
    assert n > 0
    for i in range(n):
        assert np.array_equal(r1[i], r0[i]), (
            f"{what}: step {i} logits differ (max |d| {np.abs(r1[i] - r0[i]).max():.3g})")
    k = min(n, len(t0), len(t1))
    assert t1[:k] == t0[:k], what


# ---------------------------------------------------------------- cold vs warm cache

def _scenarios(model):
    a, b = chat_ids(model, A), chat_ids(model, B)
    q0 = chat_ids(model, [{"role": "user", "content": QUESTIONS[0]}])
    q1 = chat_ids(model, [{"role": "user", "content": QUESTIONS[1]}])
    turn2 = B + [{"role": "assistant", "content": "13 times 7 is 91."},
                 {"role": "user", "content": "And 14 times 7?"}]
    return {
        # the scenario: a multi-turn chat first, then A (shares the system turn)
        "prefix from a different earlier request": ([b], a),
        "shared system turn": ([q0], q1),
        "multi-turn chat resent with one more message": ([b], chat_ids(model, turn2)),
        "prompt that is a prefix of an earlier prompt": ([b], b[:len(b) - 9]),
        "prompt that extends an earlier prompt": ([a[:30]], a),
    }


@pytest.mark.parametrize("name", [
    "prefix from a different earlier request", "shared system turn",
    "multi-turn chat resent with one more message",
    "prompt that is a prefix of an earlier prompt", "prompt that extends an earlier prompt"])
def test_cold_and_warm_cache_give_the_same_logit_bits(model, name):
    history, target = _scenarios(model)[name]
    model.clear_prefix_cache()          # a fresh server: the history alone fills the cache
    for h in history:  # the earlier request: its prompt, then a few generated tokens
        greedy(model, [h], 3, reuse=True)
    mid = model.prefix_cache_stats().reused_tokens
    got = greedy(model, [target], 4, reuse=True)
    got = (got[0][0], got[1][0])
    assert model.prefix_cache_stats().reused_tokens - mid >= 20, "the cache was not used"
    assert_same_bits(got, cold(model, target, 4), name)


def test_cold_equals_llama_cpp_python_run_directly_bitwise(model):
    """The issue's prompt: tep (cold and warm) and llama-cpp-python's own context on the
    same tokens (its micro-batches kept under 64 tokens, the size where llama.cpp's flash
    attention switches kernel) see the same logit bits at every step."""
    a, b = chat_ids(model, A), chat_ids(model, B)
    n_new = 8
    ref = llama_cpp.Llama(model_path=str(model.model_path), n_ctx=CTX, n_batch=32,
                          n_ubatch=32, n_threads=THREADS, n_threads_batch=THREADS,
                          flash_attn=True, **smollm2.reference_kv(model.kv_type),
                          verbose=False)
    try:
        ref.reset()
        ref.eval(a)
        toks, rows = [], []
        for _ in range(n_new):
            ptr = llama_cpp.llama_get_logits(ref.ctx)
            row = np.ctypeslib.as_array(ptr, shape=(ref.n_vocab(),)).copy()
            rows.append(row)
            toks.append(int(np.argmax(row)))
            ref.eval([toks[-1]])
    finally:
        ref.close()
    direct = (toks, np.stack(rows))
    assert_same_bits(cold(model, a, n_new), direct, "cold vs llama-cpp-python")
    model.clear_prefix_cache()
    greedy(model, [b], 2, reuse=True)
    got = greedy(model, [a], n_new, reuse=True)
    assert_same_bits((got[0][0], got[1][0]), direct, "warm (after B) vs llama-cpp-python")


# ---------------------------------------------------------------- batch 1 vs 16 vs 64

def test_batch_of_1_16_and_64_give_the_same_logit_bits(model):
    prompts = [chat_ids(model, [{"role": "user", "content": q}]) for q in QUESTIONS[:8]]
    n_new = 2
    alone = [cold(model, p, n_new) for p in prompts]
    t16, r16 = greedy(model, prompts * 2, n_new, reuse=False)       # nothing cached
    t64, r64 = greedy(model, prompts * 8, n_new, reuse=True)        # prefixes cached
    for k in range(len(prompts)):
        for c in range(2):
            assert_same_bits((t16[8 * c + k], r16[8 * c + k]), alone[k],
                             f"batch 16, prompt {k} copy {c}")
        for c in range(8):
            assert_same_bits((t64[8 * c + k], r64[8 * c + k]), alone[k],
                             f"batch 64, prompt {k} copy {c}")


# ---------------------------------------------------------------- through the engine

class Recorder:
    """The model with every logit row it returns kept per sequence, in admission order
    (the engine admits in arrival order)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self._live: dict[int, list] = {}
        self.rows: list[list[np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def reuse_prefix(self, seq_id, prompt):
        self._live[seq_id] = []
        self.rows.append(self._live[seq_id])
        return self._inner.reuse_prefix(seq_id, prompt)

    def forward(self, batch):
        out = self._inner.forward(batch)
        for i, sid in enumerate(np.asarray(batch.seq_ids)[np.asarray(batch.logits)]):
            self._live[int(sid)].append(out[i].copy())
        return out

    def release(self, seq_id):
        self._inner.release(seq_id)


def run_engine(rec: Recorder, waves, *, max_batch_tokens: int = 48, temperature=0.0,
               seed=None):
    """Each wave's requests arrive together; the engine runs until idle between waves.
    Returns, per request in order, its token ids and logit rows."""
    eng = Engine(rec, max_num_seqs=rec.max_num_seqs, max_batch_tokens=max_batch_tokens,
                 sample_threads=1)
    out = []
    for wave in waves:
        sinks = []
        for prompt, n, *rest in wave:
            s = Sampling(max_tokens=n, temperature=temperature,
                         seed=rest[0] if rest else seed)
            sink = StreamSink(s)
            eng.add_request(prompt, s, sink, lambda exc: None)
            sinks.append((prompt, sink))
        eng.run_until_idle()
        for _, sink in sinks:
            out.append(list(sink.result().token_ids))
    return [(toks, np.stack(rows)) for toks, rows in zip(out, rec.rows)]


def _pool(model):
    qs = [chat_ids(model, [{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    a, b = chat_ids(model, A), chat_ids(model, B)
    return [a, b, a[:len(a) - 5], b + chat_ids(model, [{"role": "user", "content": "ok"}])[1:],
            *qs]


_COLD: dict = {}


def _cold_ref(model, prompt, n):
    key = (model.fingerprint(), tuple(prompt), n)
    if key not in _COLD:
        _COLD[key] = cold(model, prompt, n)
    return _COLD[key]


@pytest.mark.parametrize("order", [(3, 2, 1, 0), (2, 0, 3, 1)])
def test_arrival_order_does_not_change_logit_bits(model, order):
    pool = _pool(model)
    reqs = [(pool[i], 4) for i in (0, 1, 3, 4)]
    rec = Recorder(model)
    got = run_engine(rec, [[reqs[i] for i in order]], max_batch_tokens=40)
    for (prompt, n), i in zip([reqs[i] for i in order], order):
        toks, rows = got[order.index(i)]
        assert_same_bits((toks, rows), _cold_ref(model, prompt, n), f"request {i}")


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 3)), min_size=1,
                         max_size=3), min_size=1, max_size=3),
       st.sampled_from([24, 40, 96]))
def test_random_request_histories_never_change_logit_bits(model, waves, budget):
    """Any history of waves of requests (drawn from prompts that share prefixes, extend
    and cut each other), under any per-step token budget: every request's logits equal
    its cold run's."""
    pool = _pool(model)
    rec = Recorder(model)
    plan = [[(pool[i], n) for i, n in wave] for wave in waves]
    got = run_engine(rec, plan, max_batch_tokens=budget)
    flat = [r for wave in plan for r in wave]
    for (prompt, n), (toks, rows) in zip(flat, got):
        want = _cold_ref(model, prompt, 3)
        assert_same_bits((toks, rows), want, f"prompt of {len(prompt)} tokens")


# ---------------------------------------------------------------- seeded sampling

def test_seeded_sampling_is_the_same_alone_among_15_after_history_and_restart(model):
    pool = _pool(model)
    target = pool[0]
    n, seed = 8, 4242

    def sampled(rec, waves):
        return run_engine(rec, waves, temperature=0.8)

    alone = sampled(Recorder(model), [[(target, n, seed)]])[0]
    others = [(pool[1 + k % 7], n, 100 + k) for k in range(15)]
    among = sampled(Recorder(model), [others[:7] + [(target, n, seed)] + others[7:]])[7]
    after = sampled(Recorder(model), [[(pool[3], 5, 7), (pool[5], 4, 8)],
                                      [(pool[2], 3, 9)], [(target, n, seed)]])[-1]
    fresh = load_model(model.model_path, context_size=CTX, max_num_seqs=4,
                       n_threads=THREADS, **smollm2.way_of(model))
    try:
        assert fresh.fingerprint() == model.fingerprint()
        restarted = sampled(Recorder(fresh), [[(target, n, seed)]])[0]
    finally:
        fresh.close()
    assert len(alone[0]) == n and len(set(alone[0])) > 3   # really sampled, not one token
    for what, got in (("among 15 others", among), ("after a history", after),
                      ("after a restart", restarted)):
        assert_same_bits(got, alone, what)
    # and a different seed gives different text (the seed is really used)
    other = sampled(Recorder(model), [[(target, n, seed + 1)]])[0]
    assert other[0] != alone[0]


# ---------------------------------------------------------------- past position 255

def test_long_prompt_cache_and_neighbours_give_the_same_logit_bits(long_model):
    """Past position 255 a lone token would take llama.cpp's KV-split kernel (thread
    dependent): cached with one token left, and in a batch with another sequence (either
    order), the bits are those of the cold run."""
    m = long_model
    p = m.tokenize(LONG)[:262]
    q = m.tokenize("Tell me a story about a cat.")
    m.clear_prefix_cache()
    greedy(m, [p[:261]], 1, reuse=True)         # the cache now holds 261 tokens of p
    warm = greedy(m, [p], 2, reuse=True)
    want = cold(m, p, 2)
    assert m.prefix_cache_stats().reused_tokens >= 261   # one token fed, at position 261
    assert_same_bits((warm[0][0], warm[1][0]), want, "261 cached + 1 fed")
    both = greedy(m, [p, q], 2, reuse=True)
    assert_same_bits((both[0][0], both[1][0]), want, "next to a short prompt")
    other = greedy(m, [q, p], 2, reuse=True)
    assert_same_bits((other[0][1], other[1][1]), want, "after a short prompt in the batch")
    # all three slots busy: p's slot has a decoding neighbour (no token fed twice)
    r = m.tokenize("Name three colours.")
    three = greedy(m, [q, p, r], 2, reuse=True)
    assert_same_bits((three[0][1], three[1][1]), want, "every slot busy")


def test_reference_kernels_feed_each_token_once_and_give_the_rules_bits():
    """With llama.cpp's reference kernels a step goes to llama.cpp as it comes: a 300-token
    prompt in one call (the tiled kernel's shape) and a lone token past position 255 as
    one token (the KV-split kernel's shape), where the feeding rules make pieces of 32
    and feed the token before it again. The logits are the same bits both ways, and the
    same as feeding the prompt token by token."""
    def run(way: str, step_tokens: list[int], by_token: bool = False):
        m = load_model(smollm2.model_path(), context_size=LONG_CTX, max_num_seqs=3,
                       n_threads=LONG_THREADS, **WAYS[way])
        _check_way(m, way)
        fed: list[int] = []
        decode = m._run_decode

        def counting(n, rows):
            fed.append(n)
            return decode(n, rows)
        m._run_decode = counting
        try:
            p = m.tokenize(LONG + LONG)[:300]
            if by_token:
                m.reuse_prefix(0, [])
                for i in range(len(p) - 1):
                    m.forward(_step([(0, [p[i]], i)]))
                fed.clear()
                first = m.forward(_step([(0, [p[-1]], len(p) - 1)])).copy()
                toks, rows = [int(np.argmax(first[0]))], [first[0]]
                for k in range(2):
                    out = m.forward(_step([(0, [toks[-1]], len(p) + k)]))
                    rows.append(out[0].copy())
                    toks.append(int(np.argmax(out[0])))
                got = (toks, np.stack(rows))
            else:
                got = cold(m, p, 3)
        finally:
            m.close()
        step_tokens += fed
        return got

    ref_fed: list[int] = []
    rules_fed: list[int] = []
    ref = run("f16", ref_fed)
    assert ref_fed == [300, 1, 1], ref_fed            # as it comes: one call, one token
    rules = run("f16-rules", rules_fed)
    assert rules_fed == [32] * 9 + [12, 2, 2], rules_fed   # pieces; a lone token twice
    assert_same_bits(ref, rules, "reference kernels vs feeding rules")
    assert_same_bits(run("f16", [], by_token=True), ref, "token by token vs whole")


# ---------------------------------------------------------------- adjacent busy slots

def test_stream_copies_and_moves_never_change_logit_bits(model):
    """llama.cpp batches only adjacent slots, so the model keeps running sequences in
    adjacent slots: requests that end early leave a gap a running sequence is moved into
    (a whole-stream copy), and a prompt whose prefix sits in a slot away from the busy
    ones has that stream copied next to them. Either way the logits are the cold run's."""
    a, b = chat_ids(model, A), chat_ids(model, B)
    q = [chat_ids(model, [{"role": "user", "content": x}]) for x in QUESTIONS[:3]]
    more = b + chat_ids(model, [{"role": "user", "content": "ok"}])[1:]
    model.clear_prefix_cache()
    before = model.prefix_cache_stats()
    rec = Recorder(model)
    # wave 1: a and b end after one token and leave gaps between q0 and q1
    # wave 2: a's prefix and b's extension, placed next to each other
    plan = [[(a, 1), (q[0], 6), (b, 1), (q[1], 6)], [(a[:len(a) - 5], 4), (more, 4), (q[2], 3)]]
    got = run_engine(rec, plan, max_batch_tokens=400)   # each wave admitted in one step
    after = model.prefix_cache_stats()
    assert after.moves > before.moves and after.copies > before.copies
    assert after.reused_tokens > before.reused_tokens
    for (prompt, n), (toks, rows) in zip([r for w in plan for r in w], got):
        assert_same_bits((toks, rows), _cold_ref(model, prompt, n), f"prompt of {len(prompt)}")
