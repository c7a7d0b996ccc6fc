"""The toy model's prefix cache (ToyModel(prefix_cache=N)): a resent chat history is not
fed again (engine stats count the hits), the answers are token for token those of the toy
without a cache, and the least recently used finished sequence is evicted past N."""
from __future__ import annotations

from tep.backend import Sampling, StreamSink
from tep.backends.toy import ToyBackend, ToyModel
from tep.engine import EngineBackend


def _run(be: EngineBackend, prompt: list[int], seed: int) -> list[int]:
    s = Sampling(max_tokens=8, seed=seed, temperature=0.8)
    sink = StreamSink(s, prompt_tokens=len(prompt))
    be.generate_stream_from_tokens("tep-toy", prompt, s, sink)
    return sink.token_ids


def test_prefix_cache_reuses_history_and_answers_the_same():
    cached = EngineBackend(ToyModel(ToyBackend(), max_num_seqs=4, prefix_cache=4),
                           max_num_seqs=4)
    plain = EngineBackend(ToyModel(ToyBackend(), max_num_seqs=4), max_num_seqs=4)
    try:
        history = list(b"<|system|>\nbe brief\n")
        fed_hits, before_turn = [], []
        for turn in range(4):
            before_turn.append(len(history))
            history += list(f"<|user|>\nquestion {turn}\n<|assistant|>\n".encode())
            before = cached.stats.prefix_hit_tokens
            a = _run(cached, history, seed=turn)
            assert a == _run(plain, history, seed=turn)
            fed_hits.append(cached.stats.prefix_hit_tokens - before)
            history += a
        assert fed_hits[0] == 0 and all(h > 0 for h in fed_hits[1:])
        # a turn reuses all it resends but the previous answer's last token (sampled,
        # never fed)
        assert fed_hits[1:] == [n - 1 for n in before_turn[1:]]
        assert plain.stats.prefix_hit_tokens == 0
    finally:
        cached.close()
        plain.close()


def test_prefix_cache_evicts_least_recently_used():
    model = ToyModel(ToyBackend(), max_num_seqs=2, prefix_cache=1)
    be = EngineBackend(model, max_num_seqs=2)
    try:
        a, b = list(b"first conversation, long enough"), list(b"second one, quite different")
        _run(be, a, 1)
        h0 = be.stats.prefix_hit_tokens
        _run(be, a + [65], 2)
        assert be.stats.prefix_hit_tokens - h0 >= len(a) - 1   # still cached
        _run(be, b, 3)                                          # evicts a's sequence
        assert model.evicted >= 1
        h1 = be.stats.prefix_hit_tokens
        _run(be, a + [66], 4)
        assert be.stats.prefix_hit_tokens - h1 == 0
    finally:
        be.close()
