"""The slot table behind the llama.cpp backend's prefix cache (pure Python)."""
from __future__ import annotations

import random

import pytest

from tep.backends.llamacpp_slots import SlotTable, common_prefix_len, count_runs


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


def test_prompts_sharing_only_a_prefix_keep_their_own_slots():
    t = SlotTable(4, copy_min_tokens=4)
    system = list(range(30))
    a = system + [100 + i for i in range(40)]
    b = system + [200 + i for i in range(40)]
    pa = t.acquire(0, a)
    t.fed(pa.slot, 0, a)
    t.release(0)
    # b would overwrite 40 of a's cached tokens to reuse 30: it takes an empty slot and
    # copies the shared 30 in
    pb = t.acquire(1, b)
    assert pb.slot != pa.slot and pb.copy_from == pa.slot and pb.reused == 30
    t.fed(pb.slot, 30, b[30:])
    t.release(1)
    # each comes back to its own cache: all but its last token, no copy
    for seq, prompt, slot in ((2, a, pa.slot), (3, b, pb.slot), (4, a, pa.slot)):
        q = t.acquire(seq, prompt)
        assert (q.slot, q.reused, q.copy_from) == (slot, len(prompt) - 1, None)
        t.fed(q.slot, q.reused, prompt[q.reused:])
        t.release(seq)


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


# ---------------------------------------------------------------- adjacent busy slots

def test_count_runs():
    assert count_runs([]) == 0
    assert count_runs([4]) == 1
    assert count_runs([3, 0, 1]) == 2
    assert count_runs([0, 2, 4, 6]) == 4
    assert count_runs(range(5)) == 1


def test_new_sequences_fill_gaps_and_join_the_busy_run():
    t = SlotTable(8)
    for seq in range(4):
        assert t.acquire(seq, [seq]).slot == seq
    t.release(1)
    assert t.acquire(9, [7]).slot == 1              # fills the gap
    t.release(0)
    t.release(9)
    assert t.busy_slots() == [2, 3]
    assert t.acquire(10, [5]).slot in (1, 4)        # next to the run, not a new run
    assert count_runs(t.busy_slots()) == 1


def test_a_longer_prefix_elsewhere_is_copied_into_the_adjacent_slot():
    t = SlotTable(6, copy_min_tokens=3)
    prompt = list(range(20))
    s = t.acquire(0, prompt).slot
    t.fed(s, 0, prompt)
    for seq in (1, 2, 3):
        t.fed(t.acquire(seq, [100 + seq]).slot, 0, [100 + seq])
    t.release(0)                                    # slot 0 keeps the 20 tokens
    t.release(1)
    t.release(2)                                    # busy: slot 3 only
    p = t.acquire(4, prompt + [99])
    assert p.slot in (2, 4) and p.copy_from == s and p.reused == 20
    assert t.tokens(p.slot) == prompt and t.tokens(s) == prompt   # the source keeps its own
    assert t.copies == 1
    # a gain under copy_min_tokens is not worth a copy
    t.release(4)
    q = t.acquire(5, [100 + 2, 1])                  # slot 2 holds [102]: 1 token
    assert q.copy_from is None


def test_compact_moves_the_highest_running_sequence_into_the_lowest_gap_and_parks_caches():
    t = SlotTable(8)
    for seq in range(5):
        t.fed(t.acquire(seq, []).slot, 0, [10 * seq, 10 * seq + 1])
    t.release(0)
    t.release(2)                                    # busy 1, 3, 4: two runs
    moves = t.compact()
    # window [1, 4): slot 4's sequence moves into gap 2; gap 2's cache (seq 2's, more
    # recent than the never-used slots 5..7) is parked in the oldest free slot first
    assert [(m.src, m.dst, m.seq_id) for m in moves] == [(2, 5, None), (4, 2, 4)]
    assert t.busy_slots() == [1, 2, 3] and t.slot_of(4) == 2
    assert t.tokens(5) == [20, 21] and t.tokens(2) == [40, 41] and t.tokens(4) == [40, 41]
    assert t.moves == 1 and t.compact() == []


def _apply(streams, placement=None, moves=()):
    """What llama.cpp's streams hold after the copies and removals a table asked for."""
    if placement is not None:
        if placement.copy_from is not None:
            streams[placement.slot] = list(streams[placement.copy_from])
        del streams[placement.slot][placement.drop_from:]
    for m in moves:
        streams[m.dst] = list(streams[m.src])


def test_random_histories_keep_the_table_equal_to_the_streams_and_one_busy_run():
    """Against a plain model of the streams (copies and removals applied as asked): the
    table's tokens are what each stream holds, a reused prefix is really the prompt's,
    and after compact() the busy slots are one run."""
    rng = random.Random(7)
    for trial in range(40):
        n_slots = rng.randrange(1, 9)
        t = SlotTable(n_slots, copy_min_tokens=rng.randrange(1, 4))
        streams = [[] for _ in range(n_slots)]
        live: dict[int, list[int]] = {}
        next_id = 0
        for _ in range(120):
            if live and (len(live) == n_slots or rng.random() < 0.45):
                seq = rng.choice(sorted(live))
                del live[seq]
                t.release(seq)
                continue
            if rng.random() < 0.3:
                moves = t.compact()
                _apply(streams, moves=moves)
                assert count_runs(t.busy_slots()) <= 1
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
            runs_before = count_runs(t.busy_slots())
            p = t.acquire(next_id, prompt)
            _apply(streams, placement=p)
            assert streams[p.slot][:p.reused] == prompt[:p.reused] and p.reused < len(prompt)
            assert count_runs(t.busy_slots()) <= max(runs_before, 1)
            t.fed(p.slot, p.reused, prompt[p.reused:])
            streams[p.slot].extend(prompt[p.reused:])
            gen = [rng.randrange(3) for _ in range(rng.randrange(3))]
            t.fed(p.slot, len(prompt), gen)
            streams[p.slot].extend(gen)
            live[next_id] = prompt
            next_id += 1
            for s in range(n_slots):
                assert t.tokens(s) == streams[s], (trial, s)
        assert sorted(t.slot_of(q) for q in live) == t.busy_slots()
