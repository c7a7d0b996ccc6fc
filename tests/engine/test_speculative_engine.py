"""Speculative decoding on the engine (n-gram drafts) with a copying, rewindable numpy
model (tests/support/engine_models.py InductionModel): a seeded sequence's tokens,
text, finish reason and logprobs are the same with and without speculation, alone and
among others, whatever the knobs; stops, max_tokens, cancellation and mixed batches keep
working, the rejected drafts are rewound, and the counters add up."""
from __future__ import annotations

import random
import threading

import pytest

from support.engine_models import EOG, HashModel, InductionModel
from tep.backend import Sampling, StreamSink
from tep.engine import Engine
from tep.engine.speculative import (Acceptance, NgramDrafter, SpecConfig, StepCost,
                                   match_kind, plan_drafts)

NGRAM = SpecConfig(mode="ngram", k=6)


def gpu_like_cost() -> StepCost:
    """A fixed cost table for the numpy models (whose measured forward times follow the
    machine's load, so a learned table would make the draft plan, and the step counts
    asserted here, depend on it): extra tokens nearly free, as on an accelerator, a
    further pass dearer."""
    return StepCost.fixed({1: 0.010, 512: 0.014}, pass_s=0.002)


def outcome(sink: StreamSink) -> tuple:
    c = sink.result()
    lps = None if c.logprobs is None else [(e.token_id, e.logprob, e.top) for e in c.logprobs]
    return c.token_ids, c.text, c.finish_reason, c.completion_tokens, lps


def generate(reqs, *, spec, slots=16, budget=512, model=None):
    model = model or InductionModel(slots)
    eng = Engine(model, max_num_seqs=slots, max_batch_tokens=budget, speculative=spec,
                 record_steps=True, step_cost=gpu_like_cost())
    sinks, errors = [], []
    for prompt, s in reqs:
        k = StreamSink(s)
        sinks.append(k)
        eng.add_request(prompt, s, k, errors.append)
    eng.run_until_idle()
    assert errors == [None] * len(reqs), errors
    return [outcome(k) for k in sinks], eng


def repetitive_prompt(rng: random.Random) -> list[int]:
    """A paragraph that repeats (the copy case): n-grams recur."""
    base = [rng.randrange(32, 127) for _ in range(rng.randint(8, 30))]
    return (base * 3)[:rng.randint(20, 80)]


def random_sampling(rng: random.Random) -> Sampling:
    rep, pres, freq = rng.choice([(1.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.2, 0.3, 0.2)])
    return Sampling(
        max_tokens=rng.randint(1, 60), temperature=rng.choice([0.0, 0.0, 0.5, 0.8, 1.2]),
        top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 0.9]),
        min_p=rng.choice([0.0, 0.05]), repetition_penalty=rep, presence_penalty=pres,
        frequency_penalty=freq, logit_bias=rng.choice([None, None, {EOG: -100.0, 65: 1.0}]),
        logprobs=rng.choice([None, None, 2]), seed=rng.randrange(2**64),
        stop=rng.choice([[], [], ["zz"], ["e"]]), stop_token_ids=rng.choice([[], [101]]),
        num_speculative_tokens=rng.choice([None, None, None, 0, 2]))


@pytest.mark.parametrize("scenario", [0, 1])
def test_seeded_outputs_equal_without_speculation_among_16(scenario):
    rng = random.Random(scenario)
    reqs = [(repetitive_prompt(rng), random_sampling(rng)) for _ in range(24)]
    plain, _ = generate(reqs, spec=None)
    spec, eng = generate(reqs, spec=NGRAM)
    assert spec == plain
    st = eng.spec_stats
    assert st.drafted["ngram"] > 0 and st.accepted["ngram"] > 0
    assert 0 < st.acceptance_rate("ngram") <= 1 and st.mean_accepted_length("ngram") > 0
    assert max(n for n, _ in eng.model.batches) > 16   # drafts did ride in the batches
    # one at a time gives the same again
    for (prompt, s), want in zip(reqs[:6], spec[:6]):
        alone, _ = generate([(prompt, s)], spec=NGRAM, slots=2)
        assert alone == [want]


def test_speculation_saves_steps_on_copy_and_rewinds_rejections():
    rng = random.Random(7)
    prompt = repetitive_prompt(rng)
    s = Sampling(max_tokens=80, temperature=0.0, logit_bias={EOG: -100.0}, seed=1)
    plain, e0 = generate([(prompt, s)], spec=None, slots=2)
    spec, e1 = generate([(prompt, s)], spec=NGRAM, slots=2)
    assert spec == plain
    assert e1.stats.steps < e0.stats.steps * 0.7, (e1.stats.steps, e0.stats.steps)
    assert e1.stats.tokens_sampled == e0.stats.tokens_sampled == 80


def test_stops_and_max_tokens_inside_an_accepted_run():
    rng = random.Random(3)
    prompt = repetitive_prompt(rng)
    base = Sampling(max_tokens=70, temperature=0.0, logit_bias={EOG: -100.0}, seed=2)
    [(ids, text, *_)], _ = generate([(prompt, base)], spec=None, slots=2)
    for s in (Sampling(max_tokens=70, temperature=0.0, logit_bias={EOG: -100.0}, seed=2,
                       stop_token_ids=[ids[33]]),
              Sampling(max_tokens=70, temperature=0.0, logit_bias={EOG: -100.0}, seed=2,
                       stop=[text[40:43]]),
              Sampling(max_tokens=13, temperature=0.0, logit_bias={EOG: -100.0}, seed=2),
              Sampling(max_tokens=70, temperature=0.0, logit_bias={ids[20]: 100.0, EOG: 50.0},
                       seed=2)):
        plain, _ = generate([(prompt, s)], spec=None, slots=2)
        spec, eng = generate([(prompt, s)], spec=NGRAM, slots=2)
        assert spec == plain
    # the EOG case: an end-of-generation token ends the run where it is
    s = Sampling(max_tokens=70, temperature=0.0, seed=2)
    assert generate([(prompt, s)], spec=NGRAM, slots=2)[0] == \
        generate([(prompt, s)], spec=None, slots=2)[0]


def test_cancel_mid_run_frees_the_slot_and_others_go_on():
    rng = random.Random(11)
    model = InductionModel(2)
    eng = Engine(model, max_num_seqs=2, max_batch_tokens=64, speculative=NGRAM,
                 step_cost=gpu_like_cost())
    cancel = threading.Event()
    s = Sampling(max_tokens=200, temperature=0.0, logit_bias={EOG: -100.0}, seed=1)
    a, b = StreamSink(s, cancel=cancel), StreamSink(s)
    done: list = []
    eng.add_request(repetitive_prompt(rng), s, a, done.append)
    eng.add_request(repetitive_prompt(rng), s, b, done.append)
    for _ in range(5):
        eng.run_until_idle(max_steps=1)
    cancel.set()
    eng.run_until_idle()
    assert done == [None, None]
    assert len(b.result().token_ids) == 200
    assert eng.stats.cancelled == 1 and eng.stats.finished == 1


def test_a_model_without_rewind_is_refused():
    with pytest.raises(ValueError, match="rewind"):
        Engine(HashModel(2), max_num_seqs=2, speculative=NGRAM)


def test_context_bound_caps_the_drafts():
    rng = random.Random(5)
    prompt = repetitive_prompt(rng)[:30]
    s = Sampling(max_tokens=40, temperature=0.0, logit_bias={EOG: -100.0}, seed=4)
    plain, _ = generate([(prompt, s)], spec=None, slots=2,
                        model=InductionModel(2, context_size=70))
    spec, _ = generate([(prompt, s)], spec=NGRAM, slots=2,
                       model=InductionModel(2, context_size=70))
    assert spec == plain


def test_ngram_drafter_finds_the_latest_earlier_occurrence():
    d = NgramDrafter(2)
    d.admit(0, [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2])
    assert d.propose(0, 3) == [3, 7, 8]           # after the latest "1 2"
    d.extend(0, [3])
    assert d.propose(0, 2) == [7, 8]              # "1 2 3" -> 7 8
    d.admit(1, [4, 5, 6])
    assert d.propose(1, 4) == []                  # nothing recurs


def test_acceptance_estimate_follows_the_runs_and_recovers():
    a = Acceptance(2)
    start = a.prior(5)
    assert a.p(0, 5) == start > a.prior(1)        # a long match starts more trusted
    for _ in range(6):
        a.update(0, 5, 4, 0)                      # every such draft refused
    low = a.p(0, 5)
    assert low < 0.15
    assert a.p(0, 1) == a.prior(1)                # another kind: untouched
    assert a.p(1, 5) < start                      # a new slot starts from the engine's
    for _ in range(200):
        a.idle(0)                                 # not drafting: back toward the prior
    assert low < a.p(0, 5) <= a.prior(5)
    for _ in range(3000):
        a.idle_all()                              # nobody drafting: the prior recovers
    assert a.prior(5) > start - 0.1
    for _ in range(10):
        a.update(0, 5, 4, 4)                      # every draft accepted
    assert a.p(0, 5) > 0.9


def test_ngram_kind_is_the_match_length():
    d = NgramDrafter(2)
    run = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    d.admit(0, run + [99] + run[:9])              # the last 9 tokens repeat the run
    assert d.propose(0, 3) == [20, 99, 11] and d.kind[0] == match_kind(9)
    d.admit(1, [5, 6, 7, 1, 2, 3, 8, 6, 7])       # only "6 7" recurs
    assert d.propose(1, 2) == [1, 2] and d.kind[1] == match_kind(2)
    assert match_kind(1) < match_kind(3) < match_kind(9) < match_kind(40)


def test_step_cost_interpolates_and_extrapolates():
    c = StepCost(prior_slope=0.05)
    assert c(3) is None
    c.observe(1, 0.010)
    assert c(1) == 0.010 and abs(c(3) - 0.011) < 1e-12   # one point: the prior slope
    c.observe(2, 0.014)
    c.observe(5, 0.016)
    assert abs(c(3) - (0.014 + 0.002 / 3)) < 1e-12       # between two
    assert abs(c(7) - (0.016 + 2 * 0.002 / 3)) < 1e-12   # the last slope beyond
    c.observe(2, 0.024)                                  # an average, not the last value
    assert abs(c(2) - 0.019) < 1e-12                     # (a plain mean while young)
    model = type("M", (), {})()
    assert StepCost.of(model) is StepCost.of(model)      # one table per model


def test_a_fixed_step_cost_learns_nothing_and_checks_its_table():
    c = StepCost.fixed({1: 0.010, 3: 0.016}, pass_s=0.004)
    c.observe(1, 5.0)
    c.observe(2, 5.0, passes=2)
    assert c(1) == 0.010 and abs(c(2) - 0.013) < 1e-12 and c.pass_s == 0.004
    assert abs(c(5) - 0.022) < 1e-12                  # the last slope beyond
    assert plan_drafts(1, [(0, 0.9, 2)], c) == {0: 2}
    assert StepCost.fixed({2: 0.010}).pass_s == 0.005      # default: cost per token
    for bad in ({}, {0: 0.01}, {1: 0.0}, {1: float("nan")}, {1: float("inf")},
                {1.5: 0.01}, {"3": 0.01}, {True: 0.01}):
        with pytest.raises(ValueError):
            StepCost.fixed(bad)
    with pytest.raises(ValueError, match="pass_s"):
        StepCost.fixed({1: 0.01}, pass_s=-1.0)


def test_plan_drafts_pays_only_when_expected_tokens_per_second_rise():
    cost = StepCost()
    cost.observe(1, 1.0)
    cost.observe(2, 1.6)      # a second token of one sequence costs 60 %...
    cost.observe(7, 1.8)      # ... the next ones little more (a CPU's matrix shapes)
    assert plan_drafts(1, [(0, 0.9, 6)], cost) == {0: 6}          # copying: worth it
    assert plan_drafts(1, [(0, 0.3, 6)], cost) == {}              # free text: never
    # p = 0.55: one draft alone loses (1.55 / 1.6 < 1); five win (2.161 / 1.76 = 1.228,
    # the cost of 6 tokens between the measured 2 and 7), a sixth adds too little
    # (2.188 / 1.8 = 1.216)
    assert plan_drafts(1, [(0, 0.55, 6)], cost) == {0: 5}
    assert plan_drafts(1, [(0, 0.55, 1)], cost) == {}
    assert plan_drafts(1, [], cost) == {}
    assert plan_drafts(4, [(0, 0.9, 2)], StepCost()) == {}        # no cost known yet
    # a batch: the best slots' drafts come first
    cost4 = StepCost()
    for n in range(4, 30):
        cost4.observe(n, 1.0 + 0.05 * (n - 4))
    got = plan_drafts(4, [(0, 0.95, 6), (1, 0.1, 6), (2, 0.8, 6)], cost4)
    assert got.get(1, 0) == 0 and got[0] >= got[2] >= 1


def test_step_cost_learns_what_a_further_pass_costs_apart_from_the_table():
    c = StepCost()
    assert c.pass_s is None
    for n in range(4, 31):
        c.observe(n, 1.0 + 0.1 * (n - 4))
    assert abs(c.pass_s - 0.25) < 1e-12      # before any: the smallest step's per token
    c.observe(16, 2.2 + 2 * 0.5, passes=3)   # two more passes than a one-pass step
    assert abs(c(16) - 2.2) < 1e-12          # the one-pass table is untouched
    assert abs(c.pass_s - 0.5) < 1e-12


def test_plan_drafts_gives_the_batch_one_length_when_passes_cost():
    def cost_with(pass_s):
        c = StepCost()
        for n in range(4, 31):
            c.observe(n, 1.0 + 0.1 * (n - 4))
        c.observe(16, 2.2 + pass_s, passes=2)
        return c
    offers = [(0, 0.97, 6), (1, 0.9, 2), (2, 0.9, 2), (3, 0.9, 2)]
    # passes free: slot 0 drafts past the others (14.53 expected tokens / 2.2 s)
    free = plan_drafts(4, offers, cost_with(0.0))
    assert free[0] > free[1] == free[2] == free[3] == 2
    # a pass costs half a second: 6 + 2 + 2 + 2 drafts take two passes (14.53 / 2.7);
    # 2 drafts each take one (11.04 / 1.8)
    assert plan_drafts(4, offers, cost_with(0.5)) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_draft_model_exact_equals_plain_and_rejection_runs():
    rng = random.Random(21)
    reqs = [(repetitive_prompt(rng), Sampling(max_tokens=40, temperature=T, seed=i,
                                              logit_bias={EOG: -100.0}))
            for i, T in enumerate([0.0, 0.7, 1.0, 0.0, 0.9, 1.3])]
    plain, _ = generate(reqs, spec=None, slots=8)
    drafter = InductionModel(8, peak=5.0)       # a weaker copier than the target
    spec, eng = generate(reqs, spec=SpecConfig(mode="draft", k=4, draft_model=drafter),
                         slots=8)
    assert spec == plain
    assert eng.spec_stats.drafted["draft"] > 0 and eng.spec_stats.accepted["draft"] > 0
    # rejection sampling: a different seeded output is allowed, the run must complete
    rej, eng = generate(reqs, spec=SpecConfig(mode="draft", k=4, acceptance="rejection",
                                              draft_model=InductionModel(8, peak=5.0)),
                        slots=8)
    assert [len(r[0]) for r in rej] == [40] * 6
    assert rej[0] == plain[0] and rej[3] == plain[3]     # greedy rows are greedy
    assert eng.spec_stats.accepted["draft"] > 0


def test_settings_and_the_request_field():
    from tep.errors import BadRequestError
    from tep.serving.config import ServerConfig
    from tep.wire.sampling import parse_sampling

    cfg = ServerConfig.from_env(speculative="ngram", num_speculative_tokens=5)
    sc = cfg.speculative_config()
    assert sc.mode == "ngram" and sc.k == 5 and sc.acceptance == "exact"
    assert ServerConfig.from_env().speculative_config() is None
    for bad in (dict(speculative="lookahead"), dict(num_speculative_tokens=0),
                dict(speculative="draft"), dict(speculative="ngram",
                                                speculative_acceptance="rejection")):
        with pytest.raises(ValueError):
            ServerConfig.from_env(**bad)
    s, _ = parse_sampling({"num_speculative_tokens": 3}, default_max_tokens=16)
    assert s.num_speculative_tokens == 3
    assert parse_sampling({}, default_max_tokens=16)[0].num_speculative_tokens is None
    for v in (-1, 65, "x"):
        with pytest.raises(BadRequestError):
            parse_sampling({"num_speculative_tokens": v}, default_max_tokens=16)


def _grammar_constraint(pattern: str):
    """A real llguidance constraint for a regex over the test models' byte vocabulary
    (ids >= 257 spelled ``<n>``, as the models detokenize them)."""
    pytest.importorskip("llguidance")
    from support.engine_models import V
    from tep.structured import grammar as G
    from tep.structured.matcher import Constraint
    from tep.structured.tokenizer import byte_tokenizer

    tok = byte_tokenizer(V, EOG, lambda t: f"<{t}>")
    return Constraint(G.regex_grammar(pattern), tok, "response_format")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_grammar_checked_drafts_equal_plain_constrained_decoding(temperature):
    """Structured outputs with speculation: drafts are walked through the grammar (a
    refused draft ends the run), every verify row samples under its grammar mask, and the
    tokens are the plain constrained run's, among unconstrained sequences too."""
    rng = random.Random(3)
    # the prompt repeats "abcab": the n-gram drafter proposes "c" after "ab", which the
    # first grammar refuses, and copies runs the second accepts
    patterns = ["(ab[dx ]){4,12}", "(abcab|abc){3,9}z?", "[a-c]{5,40}"]
    reqs, grammars = [], []
    for i in range(9):
        prompt = list(b"abcab" * 6)
        s = Sampling(max_tokens=rng.randint(10, 40), temperature=temperature,
                     seed=rng.randrange(2**32), num_speculative_tokens=None)
        reqs.append((prompt, s))
        grammars.append(patterns[i % 3] if i % 4 != 3 else None)   # some unconstrained

    def run(spec):
        model = InductionModel(16)
        eng = Engine(model, max_num_seqs=16, max_batch_tokens=512, speculative=spec,
                     step_cost=gpu_like_cost())
        sinks, errors = [], []
        for (prompt, s), g in zip(reqs, grammars):
            k = StreamSink(s)
            sinks.append(k)
            eng.add_request(prompt, s, k, errors.append,
                            constraint=_grammar_constraint(g) if g else None)
        eng.run_until_idle()
        assert errors == [None] * len(reqs), errors
        return [outcome(k) for k in sinks], eng

    plain, _ = run(None)
    spec, eng = run(NGRAM)
    assert spec == plain
    for (ids, *_), g in zip(spec, grammars):
        if g is not None:   # every token is one the grammar allows, in order
            body = [t for t in ids if t != EOG]
            assert _grammar_constraint(g).valid_prefix(body) == len(body), (g, ids)
    st = eng.spec_stats
    assert st.drafted["ngram"] > 0 and st.accepted["ngram"] > 0
    # constrained sequences alone draft too (their drafts are not just dropped)
    grammars[:] = [patterns[i % 3] for i in range(len(reqs))]
    plain, _ = run(None)
    spec, eng = run(NGRAM)
    assert spec == plain
    assert eng.spec_stats.accepted["ngram"] > 0
