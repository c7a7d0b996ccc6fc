"""Speculative decoding on the real GGUF (SmolLM2-135M-Instruct).

The property exact verification rests on: the logits llama.cpp gives for a position are
the same bits whether the forward fed 1 token of the sequence or K + 1 (a verify step),
alone or beside other sequences, and after a rewind. Then, end to end on the engine: 10
prompts, greedy and seeded temperature 0.8, give the same tokens with ``--speculative
ngram`` as without, alone and among 16 concurrent sequences; and with a JSON-schema
constraint (grammar-checked drafts), the same tokens as plain constrained decoding. The
overlap scheduler (next forward started before delivery) gives the same tokens and the
same logprob bits as the plain engine.
"""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from tep.backend import Sampling, StreamSink  # noqa: E402
from tep.backends.llamacpp import load_model  # noqa: E402
from tep.engine import Engine  # noqa: E402
from tep.engine.chat_template import render_chat  # noqa: E402
from tep.engine.model import StepBatch  # noqa: E402
from tep.engine.speculative import SpecConfig, StepCost  # noqa: E402
from support import smollm2  # noqa: E402

CTX = 512
PARAGRAPH = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in "
             "the salt wind. Every evening the keeper climbed the spiral stairs and watched "
             "the beam sweep across the dark water.")
ASKS = ["Repeat this paragraph exactly: " + PARAGRAPH,
        "Rewrite this paragraph in the past tense: " + PARAGRAPH,
        "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
        "List three prime numbers.", "Who wrote Hamlet?",
        "Copy this list: apples, pears, plums, apples, pears, plums, apples.",
        "Describe a cat to someone who has never seen one.",
        "Repeat after me: one two three four five one two three four five.",
        "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model():
    path = smollm2.model_path()
    m = load_model(path, context_size=CTX, max_num_seqs=16, n_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts(model):
    return [model.tokenize(render_chat(model.chat_template, [{"role": "user", "content": q}],
                                       bos_token=model.bos_token, eos_token=model.eos_token),
                           add_special=False) for q in ASKS]


def _batch(seqs, all_logits=False) -> StepBatch:
    tok, pos, sid, want = [], [], [], []
    for s, toks, p0 in seqs:
        tok += toks
        pos += range(p0, p0 + len(toks))
        sid += [s] * len(toks)
        want += [all_logits] * (len(toks) - 1) + [True]
    return StepBatch(np.array(tok, np.int32), np.array(pos, np.int32),
                     np.array(sid, np.int32), np.array(want, bool))


def test_verify_rows_are_the_same_bits_as_one_token_decodes(model, prompts):
    p = prompts[0]
    n = 9
    # reference: one token per forward (greedy), alone
    toks, rows = [], []
    out = model.forward(_batch([(0, p, 0)])).copy()
    t = int(np.argmax(out[0]))
    for j in range(n):
        toks.append(t)
        r = model.forward(_batch([(0, [t], len(p) + j)]))[0].copy()
        rows.append(r)
        t = int(np.argmax(r))
    model.release(0)
    # the same positions as one K + 1 = 9 token verify forward, beside other sequences
    # feeding 1 and 2 tokens (each prompt prefilled in its own forward: a prefill batch
    # that mixes prompts is a different question - the engine does not speculate in it)
    for s, q in ((1, p), (2, prompts[1]), (3, prompts[2])):
        model.forward(_batch([(s, q, 0)]))
    v = model.forward(_batch([(2, [1], len(prompts[1])), (1, toks, len(p)),
                              (3, [2, 3], len(prompts[2]))], all_logits=True)).copy()
    got = v[1:1 + n]
    for j in range(n):
        assert np.array_equal(got[j], rows[j]), (j, float(np.abs(got[j] - rows[j]).max()))
    # rewind past position 4, feed a different token there, then the original again
    model.rewind(1, len(p) + 4)
    model.forward(_batch([(1, [toks[4] + 1], len(p) + 4)]))
    model.rewind(1, len(p) + 4)
    again = model.forward(_batch([(1, toks[4:], len(p) + 4)], all_logits=True)).copy()
    for j in range(4, n):
        assert np.array_equal(again[j - 4], rows[j]), j
    for s in (1, 2, 3):
        model.release(s)


def _engine(model, slots, spec, overlap=False):
    # Every forward costs the same, so the planner verifies every draft it is offered:
    # what these tests check is verification (tokens equal without speculation), not
    # the planner, whose learned choices follow load-dependent forward times.
    return Engine(model, max_num_seqs=slots, max_batch_tokens=512, speculative=spec,
                  overlap=overlap, step_cost=StepCost.fixed({1: 0.01, 512: 0.01}, pass_s=0.0))


def _run(model, prompts, samplings, spec, slots=16, overlap=False, result=False):
    eng = _engine(model, slots, spec, overlap)
    sinks, errs = [], []
    for p, s in zip(prompts, samplings):
        k = StreamSink(s)
        sinks.append(k)
        eng.add_request(p, s, k, errs.append)
    eng.run_until_idle()
    assert errs == [None] * len(sinks)
    if result:
        return [k.result() for k in sinks], eng
    return [k.result().token_ids for k in sinks], eng


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_tokens_with_ngram_equal_without(model, prompts, temperature):
    spec = SpecConfig(mode="ngram", k=6)
    ss = [Sampling(max_tokens=32, temperature=temperature, seed=100 + i)
          for i in range(len(prompts))]
    alone_plain = [_run(model, [p], [s], None, slots=1)[0][0] for p, s in zip(prompts, ss)]
    alone_spec = []
    drafted = 0
    for p, s in zip(prompts, ss):
        toks, eng = _run(model, [p], [s], spec, slots=1)
        alone_spec.append(toks[0])
        drafted += eng.spec_stats.drafted.get("ngram", 0)
    assert alone_spec == alone_plain
    assert drafted > 0
    # 16 concurrent (the 10 prompts plus 6 repeats with other seeds): the same tokens as
    # the same 16 without speculation (same admissions, so the same prefill batches)
    ps = prompts + prompts[:6]
    ss16 = ss + [Sampling(max_tokens=32, temperature=temperature, seed=500 + i)
                 for i in range(6)]
    many, eng = _run(model, ps, ss16, spec)
    plain16, _ = _run(model, ps, ss16, None)
    assert many == plain16
    assert eng.spec_stats.accepted.get("ngram", 0) > 0


def test_json_schema_outputs_with_ngram_equal_without(model):
    """Structured outputs with speculation on the real model: the drafts are checked
    against the grammar, every verify row samples under its mask, and the tokens (which
    parse as the schema's JSON) are those of plain constrained decoding."""
    import json

    from tep.structured import make_constraint, parse_constraint

    schema = {"type": "object", "properties": {
        "fruits": {"type": "array", "items": {"type": "string", "enum":
                                              ["apple", "pear", "plum"]},
                   "minItems": 6, "maxItems": 9}}, "required": ["fruits"],
        "additionalProperties": False}
    spec = parse_constraint({"response_format": {"type": "json_schema", "json_schema": {
        "name": "fruits", "schema": schema}}}, "chat")
    ask = ("Copy this list as JSON: apple, pear, plum, apple, pear, plum, apple, pear.")
    p = model.tokenize(render_chat(model.chat_template, [{"role": "user", "content": ask}],
                                   bos_token=model.bos_token, eos_token=model.eos_token),
                       add_special=False)
    ss = [Sampling(max_tokens=60, temperature=t, seed=7 + i)
          for i, t in enumerate([0.0, 0.0, 0.8, 0.8])]

    def run(spec_cfg):
        eng = _engine(model, 4, spec_cfg)
        sinks, errs = [], []
        for s in ss:
            k = StreamSink(s)
            sinks.append(k)
            eng.add_request(p, s, k, errs.append,
                            constraint=make_constraint(spec, model.structured_tokenizer()))
        eng.run_until_idle()
        assert errs == [None] * len(sinks)
        return [k.result() for k in sinks], eng

    plain, _ = run(None)
    fast, eng = run(SpecConfig(mode="ngram", k=6))
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    for c in fast:
        if c.finish_reason == "stop":
            assert set(json.loads(c.text)) == {"fruits"}
    assert eng.spec_stats.accepted.get("ngram", 0) > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_with_overlap_gives_the_same_tokens_and_logprob_bits(model, prompts,
                                                                    temperature):
    """16 concurrent sequences (stop strings and logprobs on some, different lengths):
    overlap on == off, tokens and the raw logprobs of every token bit for bit (they are
    read from the logits of the forward that ran on the worker)."""
    ps = prompts + prompts[:6]
    ss = [Sampling(max_tokens=8 + 3 * i, temperature=temperature, seed=700 + i,
                   stop=[" the"] if i % 3 == 0 else [], logprobs=2 if i % 2 else None)
          for i in range(len(ps))]
    on, eng = _run(model, ps, ss, None, overlap=True, result=True)
    off, _ = _run(model, ps, ss, None, result=True)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert [r.text for r in on] == [r.text for r in off]
    for a, b in zip(on, off):
        if a.logprobs is not None:
            la = np.array([e.logprob for e in a.logprobs], np.float32)
            lb = np.array([e.logprob for e in b.logprobs], np.float32)
            assert la.tobytes() == lb.tobytes()
    assert eng.stats.overlapped > 0
