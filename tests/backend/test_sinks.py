"""StreamSink rules: stop strings (with hold-back), stop tokens, max_tokens, cancel."""
from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from tep import ChatStreamSink, Completion, Sampling, StreamSink


def run(pieces, sampling, cancel=None):
    deltas = []
    sink = StreamSink(sampling, cancel=cancel, on_delta=lambda t, lp: deltas.append(t))
    results = []
    for i, p in enumerate(pieces):
        ok = sink.emit_token(p, token_id=i)
        results.append(ok)
        if not ok:
            break
    c = sink.result()
    return c, deltas, results


def test_stop_string_across_pieces_is_held_back_and_cut():
    c, deltas, res = run(["ab", "c<", "|e", "nd|>", "zz"], Sampling(max_tokens=99,
                                                                  stop=["<|end|>"]))
    assert c.text == "abc" and c.finish_reason == "stop" and res[-1] is False
    assert "".join(deltas) == "abc"
    assert all("<" not in d for d in deltas)


def test_false_prefix_is_released():
    c, deltas, _ = run(["a<", "|x", "y"], Sampling(max_tokens=3, stop=["<|end|>"]))
    assert c.text == "a<|xy" and c.finish_reason == "length"
    assert "".join(deltas) == "a<|xy"


def test_stop_token_and_max_tokens_and_explicit_finish():
    c, _, res = run(["a", "b", "c"], Sampling(max_tokens=9, stop_token_ids=[1]))
    assert c.text == "a" and c.finish_reason == "stop" and c.completion_tokens == 2
    c, _, res = run(["a"] * 5, Sampling(max_tokens=3))
    assert c.text == "aaa" and c.finish_reason == "length" and res == [True, True, False]
    sink = StreamSink(Sampling(max_tokens=2))
    sink.emit_token("a", 1)
    assert sink.emit_token("b", 2) is False
    sink.emit_finish("stop")  # the backend saw EOS on its last allowed token
    assert sink.result().finish_reason == "stop"


def test_cancel_flag():
    ev = threading.Event()
    sink = StreamSink(Sampling(max_tokens=100), cancel=ev)
    assert sink.emit_token("a") and not sink.cancelled
    ev.set()
    assert sink.cancelled and sink.emit_token("b") is False
    assert sink.result().text == "a"


def test_role_prelude_once():
    roles = []
    sink = ChatStreamSink(Sampling(), on_role=roles.append)
    sink.emit_role_prelude()
    sink.emit_role_prelude()
    assert roles == ["assistant"]


def test_emit_completion_applies_stops():
    sink = StreamSink(Sampling(max_tokens=50, stop=["STOP"]))
    sink.emit_completion(Completion(text="hi STOP there", token_ids=list(range(13))))
    c = sink.result()
    assert c.text == "hi " and c.finish_reason == "stop"


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab<|>", max_size=4), max_size=12),
       stops=st.lists(st.text(alphabet="ab<|>", min_size=1, max_size=4), max_size=3))
def test_stream_deltas_equal_final_text_and_match_reference(pieces, stops):
    c, deltas, _ = run(pieces, Sampling(max_tokens=1000, stop=stops))
    assert "".join(deltas) == c.text
    full = "".join(pieces)
    # reference: the earliest-ending stop occurrence wins; text is everything before it
    ends = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
    if ends:
        # the sink scans as text grows, so the first stop to *complete* wins
        completes = []
        for s in stops:
            i = full.find(s)
            if i != -1:
                completes.append((i + len(s), i))
        end, start = min(completes)
        prefix_len = 0
        for p in pieces:
            prefix_len += len(p)
            if prefix_len >= end:
                break
        starts = [full.find(s) for s in stops if 0 <= full.find(s) and
                  full.find(s) + len(s) <= prefix_len]
        assert c.text == full[:min(starts)] and c.finish_reason == "stop"
    else:
        assert c.text == full
