"""The slot table behind the llama.cpp backend's prefix cache (pure Python)."""
from __future__ import annotations

import random

import pytest

from tep.backends.llamacpp_slots import SlotTable, common_prefix_len


def test_common_prefix_len_matches_a_plain_loop():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(8))]
        b = [rng.randrange(3) for _ in range(rng.randrange(8))]
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        assert common_prefix_len(a, b) == n


def test_released_slot_is_reused_for_a_shared_prefix():
    t = SlotTable(2)
    p = t.acquire(0, [1, 2, 3, 4])
    assert p.reused == 0
    t.fed(p.slot, 0, [1, 2, 3, 4])
    t.fed(p.slot, 4, [9])            # a decoded token
    t.release(0)
    q = t.acquire(5, [1, 2, 3, 7, 8])
    assert q.slot == p.slot and q.reused == 3 and q.drop_from == 3
    assert t.tokens(q.slot) == [1, 2, 3]
    assert t.prompt_tokens == 9 and t.reused_tokens == 3


def test_the_last_prompt_token_is_always_fed():
    t = SlotTable(1)
    s = t.acquire(0, [1, 2, 3]).slot
    t.fed(s, 0, [1, 2, 3])
    t.release(0)
    p = t.acquire(0, [1, 2, 3])
    assert p.reused == 2 and t.tokens(s) == [1, 2]


def test_longest_match_wins_then_least_recently_used():
    t = SlotTable(3)
    for seq, prompt in enumerate(([1, 2], [1, 2, 3, 4], [5])):
        s = t.acquire(seq, prompt).slot
        t.fed(s, 0, prompt)
    slot_of = {seq: t.slot_of(seq) for seq in range(3)}
    for seq in (2, 0, 1):
        t.release(seq)
    assert t.acquire(7, [1, 2, 3, 4, 5]).slot == slot_of[1]
    # no match anywhere: the least recently released free slot (seq 2's)
    assert t.acquire(8, [9, 9]).slot == slot_of[2]


def test_busy_and_double_acquire_are_errors_and_double_release_is_harmless():
    t = SlotTable(1)
    t.acquire(0, [1])
    with pytest.raises(ValueError, match="already running"):
        t.acquire(0, [1])
    with pytest.raises(ValueError, match="busy"):
        t.acquire(1, [1])
    assert t.release(0) == 0 and t.release(0) is None


def test_fed_rewinds_and_rejects_gaps():
    t = SlotTable(1)
    s = t.acquire(0, []).slot
    assert t.fed(s, 0, [1, 2, 3]) == -1
    assert t.fed(s, 1, [7]) == 1 and t.tokens(s) == [1, 7]
    with pytest.raises(ValueError, match="contiguous"):
        t.fed(s, 5, [1])
