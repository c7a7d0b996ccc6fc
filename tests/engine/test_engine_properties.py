"""Engine properties with a row-independent numpy model (tests/engine/models.py):
batching never changes a sequence's tokens; stops end a sequence in their step; slots
and the token budget are respected; every stream gets a token at least every 2 steps;
a failing forward or row fails only its own sequences."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from support.engine_models import EOG, HashModel, V
from tep.backend import StreamSink
from tep.engine import Engine
from tep.backend import Sampling


class RecordingSink(StreamSink):
    """A collecting sink that also notes the engine step of every token."""

    def __init__(self, sampling: Sampling, engine: Engine, **kw) -> None:
        super().__init__(sampling, **kw)
        self.engine = engine
        self.token_steps: list[int] = []

    def emit_token(self, piece, token_id=None, **kw) -> bool:
        self.token_steps.append(self.engine.stats.steps)
        return super().emit_token(piece, token_id, **kw)


def random_sampling(rng: random.Random) -> Sampling:
    rep, pres, freq = rng.choice([(1.0, 0.0, 0.0), (1.3, 0.4, 0.2), (0.8, -0.5, 0.6)])
    return Sampling(
        max_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 0.6, 1.0, 1.5]),
        top_k=rng.choice([0, 1, 7, -1]), top_p=rng.choice([1.0, 0.85, 0.3]),
        min_p=rng.choice([0.0, 0.1]), repetition_penalty=rep, presence_penalty=pres,
        frequency_penalty=freq,
        logit_bias=rng.choice([None, {65: 5.0, 66: -100.0, EOG: 2.0}]),
        allowed_token_ids=rng.choice([None, list(range(40, 120)) + [EOG, 280]]),
        logprobs=rng.choice([None, 0, 4]), seed=rng.randrange(2**64),
        stop=rng.choice([[], ["e"], ["<2", "zz"]]), stop_token_ids=rng.choice([[], [101]]))


def run(engine: Engine, arrivals: dict[int, list], max_steps: int = 10_000) -> None:
    """Drive ``engine`` on this thread: ``arrivals[step]`` requests join before that step."""
    step = 0
    while step < max_steps:
        for prompt, sampling, sink, done in arrivals.get(step, []):
            engine.add_request(prompt, sampling, sink, done)
        if engine.run_until_idle(max_steps=1) == 0 and step > max(arrivals, default=0):
            return
        step += 1
    raise AssertionError("the engine did not finish")


def outcome(sink: StreamSink) -> tuple:
    c = sink.result()
    lps = None if c.logprobs is None else [(e.token_id, e.logprob, e.top) for e in c.logprobs]
    return c.token_ids, c.text, c.finish_reason, c.completion_tokens, lps


def random_requests(rng: random.Random, n: int, max_prompt: int) -> list:
    """n (prompt, Sampling) pairs with every knob drawn at random."""
    reqs = []
    for _ in range(n):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, max_prompt))]
        reqs.append((prompt, random_sampling(rng)))
    return reqs


def alone_outcomes(reqs: list, slots: int) -> list:
    """Each request's outcome on its own engine (the reference for batched runs)."""
    out = []
    for prompt, s in reqs:
        sink = StreamSink(s)
        errors: list = []
        run(Engine(HashModel(slots), max_num_seqs=slots, max_batch_tokens=4096),
            {0: [(prompt, s, sink, errors.append)]})
        assert errors == [None]
        out.append(outcome(sink))
    return out


def arriving_outcomes(eng: Engine, reqs: list, rng: random.Random, within: int) -> list:
    """The requests' outcomes on ``eng``, each joining before a random step < within."""
    sinks, errors = [], []
    arrivals: dict[int, list] = {}
    for prompt, s in reqs:
        sink = StreamSink(s)
        sinks.append(sink)
        arrivals.setdefault(rng.randrange(within), []).append((prompt, s, sink, errors.append))
    run(eng, arrivals)
    assert errors == [None] * len(reqs)
    return [outcome(k) for k in sinks]


@pytest.mark.parametrize("scenario", [0, 1, 2])
def test_alone_equals_among_63_others_arriving_at_random_times(scenario):
    rng = random.Random(scenario)
    reqs = random_requests(rng, 64, 100)
    alone = alone_outcomes(reqs, 4)
    eng = Engine(HashModel(16), max_num_seqs=16, max_batch_tokens=48, record_steps=True)
    assert arriving_outcomes(eng, reqs, rng, 60) == alone
    assert all(r.n_seqs <= 16 and r.n_tokens <= 48 for r in eng.steps)
    assert max(r.n_seqs for r in eng.steps) >= 12     # the batch did fill up
    assert max(r.n_tokens for r in eng.steps) == 48   # and the budget was reached
    assert eng.stats.finished == 64


def test_long_prompt_is_chunked_while_others_decode():
    eng = Engine(HashModel(8), max_num_seqs=8, max_batch_tokens=32, record_steps=True)
    s = Sampling(max_tokens=30, seed=1)
    short = [RecordingSink(s, eng) for _ in range(4)]
    arrivals = {0: [([1, 2, 3], s, k, lambda e: None) for k in short]}
    long_sink = RecordingSink(Sampling(max_tokens=3, seed=2), eng)
    arrivals[3] = [(list(range(256)) * 2, Sampling(max_tokens=3, seed=2), long_sink,
                    lambda e: None)]
    run(eng, arrivals)
    # 512 prompt tokens at <= 28 per step (4 decodes take 4 of 32): >= 19 steps of
    # prefill, during which the short sequences got one token every step
    first_long = long_sink.token_steps[0]
    assert first_long - 3 >= 512 // 28
    for k in short:
        gaps = np.diff(k.token_steps)
        assert gaps.max() == 1, k.token_steps
    assert all(r.n_tokens <= 32 for r in eng.steps)


def test_fairness_64_streams_never_wait_more_than_2_steps():
    eng = Engine(HashModel(64), max_num_seqs=64, max_batch_tokens=256)
    rng = random.Random(5)
    sinks = []
    arrivals: dict[int, list] = {}
    for i in range(64):
        s = Sampling(max_tokens=rng.randint(20, 60), seed=i, temperature=0.9)
        k = RecordingSink(s, eng)
        sinks.append(k)
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 60))]
        arrivals.setdefault(rng.randrange(10), []).append((prompt, s, k, lambda e: None))
    run(eng, arrivals)
    for k in sinks:
        assert len(k.token_steps) >= 1
        assert int(np.diff(k.token_steps).max(initial=1)) <= 2


def test_n_choices_are_separate_sequences_with_shifted_seeds():
    s = Sampling(max_tokens=12, seed=100, temperature=1.0)  # n=3: choices 0..2
    eng = Engine(HashModel(8), max_num_seqs=8, max_batch_tokens=64)
    sinks = [StreamSink(s.for_choice(j)) for j in range(3)]
    run(eng, {0: [([7, 8], s.for_choice(j), sinks[j], lambda e: None) for j in range(3)]})
    texts = [k.result().token_ids for k in sinks]
    assert len({tuple(t) for t in texts}) == 3       # different seeds, different choices
    for j in range(3):
        alone = StreamSink(Sampling(max_tokens=12, seed=100 + j, temperature=1.0))
        run(Engine(HashModel(2), max_num_seqs=2), {0: [([7, 8], alone.sampling, alone,
                                                         lambda e: None)]})
        assert alone.result().token_ids == texts[j]


def _alone_tokens(prompt, s, steps_out: list | None = None):
    eng = Engine(HashModel(2), max_num_seqs=2, max_batch_tokens=512)
    sink = RecordingSink(s, eng)
    run(eng, {0: [(prompt, s, sink, lambda e: None)]})
    if steps_out is not None:
        steps_out.append(eng.stats.steps)
    return sink


def test_stops_end_the_sequence_in_their_step():
    prompt = [10, 20, 30]
    free = _alone_tokens(prompt, Sampling(max_tokens=60, seed=3, temperature=1.5,
                                          logit_bias={EOG: -100.0}))
    ids = free.result().token_ids
    assert len(ids) == 60
    # a stop token at output index k: k + 1 steps, k tokens kept, reason stop
    k = 17
    steps: list = []
    sink = _alone_tokens(prompt, Sampling(max_tokens=60, seed=3, temperature=1.5,
                                          logit_bias={EOG: -100.0},
                                          stop_token_ids=[ids[k]]), steps)
    first = ids.index(ids[k])
    assert steps == [first + 1]
    assert sink.result().token_ids == ids[:first] and sink.result().finish_reason == "stop"
    # a stop string completed by token j: j + 1 steps
    text = free.result().text
    stop = text[30:32]
    steps = []
    sink = _alone_tokens(prompt, Sampling(max_tokens=60, seed=3, temperature=1.5,
                                          logit_bias={EOG: -100.0}, stop=[stop]), steps)
    cut = text.index(stop)
    assert sink.result().text == text[:cut]
    model = HashModel(1)
    j = next(j for j in range(len(ids))
             if stop in model.detokenize(ids[:j + 1]).decode("utf-8", "replace"))
    assert steps == [j + 1] and sink.n_tokens == j + 1
    # max_tokens: exactly that many steps
    steps = []
    sink = _alone_tokens(prompt, Sampling(max_tokens=9, seed=3, logit_bias={EOG: -100.0}),
                         steps)
    assert steps == [9] and sink.result().finish_reason == "length"
    # end of generation: the EOG token's step is the last
    steps = []
    sink = _alone_tokens(prompt, Sampling(max_tokens=60, seed=3, logit_bias={EOG: 100.0}),
                         steps)
    assert steps == [1] and sink.result().finish_reason == "stop" and sink.result().text == ""


def test_cancelled_sequence_frees_its_slot_for_the_next_step():
    model = HashModel(2)
    eng = Engine(model, max_num_seqs=2, max_batch_tokens=64, record_steps=True)
    cancels = [threading.Event() for _ in range(3)]
    s = Sampling(max_tokens=50, seed=1, logit_bias={EOG: -100.0})
    sinks = [StreamSink(s, cancel=c) for c in cancels]
    for k in sinks:
        eng.add_request([1, 2], s, k, lambda e: None)
    for _ in range(5):
        eng.run_until_idle(max_steps=1)
    assert len(eng.sched.running) == 2 and len(eng.sched.waiting) == 1
    slot0 = next(x.slot for x in eng.sched.running if x.sink is sinks[0])
    cancels[0].set()
    eng.run_until_idle(max_steps=1)
    assert model.released == [slot0]
    assert {x.sink for x in eng.sched.running} == {sinks[1], sinks[2]}
    assert next(x.slot for x in eng.sched.running if x.sink is sinks[2]) == slot0
    assert slot0 in eng.steps[-1].sampled_slots    # the newcomer sampled in that step
    assert sinks[0].n_tokens == 5 and eng.stats.cancelled == 1


def test_forward_failure_fails_only_that_steps_sequences():
    model = HashModel(8, poison=255)
    eng = Engine(model, max_num_seqs=8, max_batch_tokens=64)
    s = Sampling(max_tokens=10, seed=1, logit_bias={EOG: -100.0})
    results: dict[str, list] = {"a": [], "b": [], "bad": [], "after": []}
    a = StreamSink(s)
    b = StreamSink(s)
    after = StreamSink(s)
    bad = StreamSink(s)
    run(eng, {0: [([1], s, a, results["a"].append)],
              3: [([255], s, bad, results["bad"].append), ([2], s, b, results["b"].append)],
              6: [([3], s, after, results["after"].append)]})
    # a was decoding in the poisoned step: it fails too; b shared the step; after is fine
    assert isinstance(results["bad"][0], RuntimeError)
    assert isinstance(results["a"][0], RuntimeError)
    assert isinstance(results["b"][0], RuntimeError)
    assert results["after"] == [None] and after.n_tokens == 10
    assert eng.stats.failed == 3 and eng.stats.finished == 1


def test_a_bad_row_fails_alone():
    model = HashModel(8, nan_token=254)
    eng = Engine(model, max_num_seqs=8, max_batch_tokens=64)
    s = Sampling(max_tokens=6, seed=4, logit_bias={EOG: -100.0}, logprobs=2)
    ok_sink, bad_sink = StreamSink(s), StreamSink(s)
    res: dict = {}
    run(eng, {0: [([1, 2], s, ok_sink, lambda e: res.__setitem__("ok", e)),
                  ([254], s, bad_sink, lambda e: res.__setitem__("bad", e))]})
    assert res["ok"] is None and isinstance(res["bad"], ValueError)
    assert "no finite value" in str(res["bad"])
    alone = _alone_tokens([1, 2], s)
    assert outcome(ok_sink) == outcome(alone)


def test_constraint_seam_restricts_rows():
    class OnlyDigits:
        def __init__(self):
            self.seen = []

        def fill_bitmask(self, row):  # int32 words: bit j of the row allows token j
            row[:] = 0
            for t in range(ord("0"), ord("9") + 1):
                row[t >> 5] |= np.int32(1 << (t & 31))

        def accept(self, tok):
            self.seen.append(tok)
            return True

    c = OnlyDigits()
    eng = Engine(HashModel(2), max_num_seqs=2)
    s = Sampling(max_tokens=15, seed=8)
    sink = StreamSink(s)
    eng.add_request([1], s, sink, lambda e: None, constraint=c)
    eng.run_until_idle()
    assert sink.result().text.isdigit() and len(c.seen) == 15


def test_prompt_positions_and_vocabulary():
    eng = Engine(HashModel(2), max_num_seqs=2, max_batch_tokens=2)
    with pytest.raises(ValueError):
        eng.add_request([], Sampling(), StreamSink(Sampling()), lambda e: None)
    # a budget of 2 feeds a 9-token prompt in 5 steps (the model checks the positions)
    steps: list = []
    e2 = Engine(HashModel(2), max_num_seqs=2, max_batch_tokens=2)
    sink = StreamSink(Sampling(max_tokens=3, seed=0, logit_bias={EOG: -100.0}))
    e2.add_request(list(range(9)), sink.sampling, sink, steps.append)
    assert e2.run_until_idle() == 5 + 2 and steps == [None]
    assert sink.result().token_ids == _alone_tokens(list(range(9)), sink.sampling).result().token_ids
    assert V == 300


def test_histories_reach_the_kernel_as_spans_not_lists(monkeypatch):
    """Penalty histories are views of the engine's buffer (TokenSpans), never lists
    rebuilt per step; their contents are the prompt and the tokens so far."""
    import tep.engine.rows as rows_mod
    from tep.kernels import TokenSpans

    seen = []
    real = rows_mod.sample_prepared

    def spy(logits, batch, steps, **kw):
        if kw.get("output_token_ids") is not None:
            p, o = kw["prompt_token_ids"], kw["output_token_ids"]
            assert isinstance(p, TokenSpans) and isinstance(o, TokenSpans)
            seen.append([(p.ids[a:b].tolist(), o.ids[c:d].tolist())
                         for a, b, c, d in zip(p.starts, p.ends, o.starts, o.ends)])
        return real(logits, batch, steps, **kw)

    monkeypatch.setattr(rows_mod, "sample_prepared", spy)
    eng = Engine(HashModel(4), max_num_seqs=4, max_batch_tokens=64)
    s = Sampling(max_tokens=5, seed=1, frequency_penalty=1.0, logit_bias={EOG: -100.0})
    plain = Sampling(max_tokens=5, seed=2, logit_bias={EOG: -100.0})
    a, b = StreamSink(s), StreamSink(plain)
    run(eng, {0: [([5, 6, 7], s, a, lambda e: None), ([8], plain, b, lambda e: None)]})
    out = a.result().token_ids
    assert len(seen) == 5
    for k, step in enumerate(seen):
        assert step[0] == ([5, 6, 7], out[:k])
        assert step[1] == ([], [])          # the row without penalties: empty spans
