"""The overlap scheduler (``Engine(overlap=True)``): the next decode step's forward runs
on a worker thread while this step's tokens are delivered. Tokens must be exactly those
of the plain engine (and of each request alone), and a slot goes back to the model only
after the forward that still writes it has returned."""
from __future__ import annotations

import random
import threading
import time

import pytest

from support.engine_models import EOG, HashModel
from tep.backend import Sampling, StreamSink
from tep.engine import Engine, EngineBackend

from test_engine_properties import (alone_outcomes, arriving_outcomes, outcome,
                                    random_requests, run)


class ProbeModel(HashModel):
    """A HashModel whose forward takes a little time and notes any ``release`` of a seq
    id that the running forward feeds (the race overlap must never have)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._feeding: frozenset = frozenset()
        self.violations: list[int] = []
        self.threads: set[str] = set()

    def forward(self, batch):
        self.threads.add(threading.current_thread().name)
        self._feeding = frozenset(batch.seq_ids.tolist())
        time.sleep(0.0005)
        try:
            return super().forward(batch)
        finally:
            self._feeding = frozenset()

    def release(self, seq_id: int) -> None:
        if seq_id in self._feeding:
            self.violations.append(seq_id)
        super().release(seq_id)


@pytest.mark.parametrize("scenario", [0, 1, 2])
def test_overlap_gives_each_request_its_tokens_alone(scenario):
    """64 requests with every knob (stops, stop ids, logprobs, penalties, bias, allowed
    sets, max_tokens 1..40) arriving at random times: the overlapped engine's outcome of
    each equals its outcome alone on the plain engine."""
    rng = random.Random(100 + scenario)
    reqs = random_requests(rng, 64, 60)
    alone = alone_outcomes(reqs, 2)
    model = ProbeModel(16)
    eng = Engine(model, max_num_seqs=16, max_batch_tokens=64, overlap=True)
    assert arriving_outcomes(eng, reqs, rng, 80) == alone
    assert eng.stats.overlapped > 0
    assert model.violations == []
    assert "tep-forward_0" in model.threads


def test_stop_string_and_stop_id_inside_an_overlapped_run():
    """Sequences ended by a stop string (found during delivery, after the next forward
    was started) end where they end without overlap; their slot is released after that
    forward, once, and reused by the next request."""
    base = Sampling(max_tokens=60, seed=3, temperature=1.5, logit_bias={EOG: -100.0})
    free = StreamSink(base)
    run(Engine(HashModel(2), max_num_seqs=2), {0: [([10, 20, 30], base, free, lambda e: None)]})
    text, ids = free.result().text, free.result().token_ids
    cases = [Sampling(max_tokens=60, seed=3, temperature=1.5, logit_bias={EOG: -100.0},
                      stop=[text[25:27]]),
             Sampling(max_tokens=60, seed=3, temperature=1.5, logit_bias={EOG: -100.0},
                      stop_token_ids=[ids[17]]),
             Sampling(max_tokens=9, seed=3, temperature=1.5, logit_bias={EOG: -100.0})]
    want = []
    for s in cases:
        k = StreamSink(s)
        run(Engine(HashModel(2), max_num_seqs=2), {0: [([10, 20, 30], s, k, lambda e: None)]})
        want.append(outcome(k))
    model = ProbeModel(2)
    eng = Engine(model, max_num_seqs=2, overlap=True)
    got = []
    for s in cases * 2:       # the second round reuses the released slots
        k = StreamSink(s)
        run(eng, {0: [([10, 20, 30], s, k, lambda e: None)]})
        got.append(outcome(k))
    assert got == want * 2
    assert model.violations == []
    assert eng.stats.overlapped > 0
    assert len(model.released) == 6 and eng.stats.finished == 6


def test_cancel_during_an_overlapped_step_drops_only_that_sequence():
    s = Sampling(max_tokens=40, seed=9, temperature=0.8, logit_bias={EOG: -100.0})
    ref = [StreamSink(s.for_choice(j)) for j in range(3)]
    run(Engine(HashModel(4), max_num_seqs=4),
        {0: [([5, 6, 7], s.for_choice(j), ref[j], lambda e: None) for j in range(3)]})
    model = ProbeModel(4)
    eng = Engine(model, max_num_seqs=4, overlap=True)
    cancel = threading.Event()
    sinks = [StreamSink(s.for_choice(0)), StreamSink(s.for_choice(1), cancel=cancel),
             StreamSink(s.for_choice(2))]
    for j, k in enumerate(sinks):
        eng.add_request([5, 6, 7], s.for_choice(j), k, lambda e: None)
    for _ in range(12):
        eng.run_until_idle(max_steps=1)
    assert eng._inflight is not None            # a forward is running for all three
    cancel.set()
    eng.run_until_idle()
    assert eng._inflight is None
    assert sinks[0].result().token_ids == ref[0].result().token_ids
    assert sinks[2].result().token_ids == ref[2].result().token_ids
    cut = sinks[1].n_tokens
    assert 0 < cut < 40 and sinks[1].token_ids == ref[1].result().token_ids[:cut]
    assert model.violations == [] and eng.stats.cancelled == 1
    assert sorted(model.released) == [0, 1, 2]


def test_engine_thread_with_overlap_serves_concurrent_requests():
    """On the engine's own thread (the server's setup): 12 concurrent seeded requests
    give what they give without overlap; stop() joins the worker."""
    prompts = [[i, i + 1, i + 2] for i in range(12)]
    s = Sampling(max_tokens=30, seed=5, temperature=0.9, logit_bias={EOG: -100.0})

    def serve(overlap: bool) -> list:
        be = EngineBackend(HashModel(16), max_num_seqs=16, overlap=overlap)
        out: list = [None] * len(prompts)

        def one(i: int) -> None:
            out[i] = be.generate_from_tokens("hash", prompts[i], s).token_ids

        ts = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        stats = be.stats
        be.close()
        assert not overlap or stats.overlapped > 0
        return out

    assert serve(True) == serve(False)


def test_overlap_is_off_with_speculation():
    from tep.engine.speculative import SpecConfig

    class Rewindable(HashModel):
        def rewind(self, seq_id, n):
            self.length[seq_id] = n

    eng = Engine(Rewindable(2), max_num_seqs=2, overlap=True,
                 speculative=SpecConfig(mode="ngram", k=4))
    assert eng.overlap is False


def test_the_server_setting(monkeypatch):
    """``--overlap on`` / ``TEP_OVERLAP=on`` reaches the engine of every engine backend;
    anything but on/off is refused at startup."""
    from tep.backends.toy import ToyEngineBackend
    from tep.serving.config import ServerConfig, _engine_backend

    assert ServerConfig.from_env().overlap == "off"
    with pytest.raises(ValueError, match="overlap"):
        ServerConfig.from_env(overlap="yes")
    monkeypatch.setenv("TEP_OVERLAP", "on")
    for be in (_engine_backend(HashModel(2)), ToyEngineBackend(max_num_seqs=2)):
        assert be.engine.overlap is True
        be.close()
    monkeypatch.setenv("TEP_OVERLAP", "off")
    be = _engine_backend(HashModel(2))
    assert be.engine.overlap is False
    be.close()
