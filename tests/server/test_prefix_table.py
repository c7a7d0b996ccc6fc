"""The router's prefix table (tep.server.ray.prefix_table), without Ray: route keys keep the
prefix order of prompts and chats, and ``match`` agrees with a brute-force reference
(longest common whole-block prefix with anything a candidate was given) under LRU bounds,
eviction reports and dropped replicas."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tep.server.ray.prefix_table import (BLOCK_BYTES, PrefixTable, RouteKey, chat_key_bytes,
                                         prompt_key_bytes)


def test_keys_of_extended_prompts_extend_their_chains():
    a = RouteKey.of(prompt_key_bytes("m", list(range(40))))
    b = RouteKey.of(prompt_key_bytes("m", list(range(40)) + [7, 8, 9, 10, 11]))
    assert b.chain[:len(a.chain)] == a.chain and len(b.chain) > len(a.chain)
    assert RouteKey.of(prompt_key_bytes("other", list(range(40)))).chain[0] != a.chain[0]
    t1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    t2 = t1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "why"}]
    k1, k2 = RouteKey.of(chat_key_bytes("m", t1)), RouteKey.of(chat_key_bytes("m", t2))
    assert k2.chain[:len(k1.chain)] == k1.chain and len(k1.chain) >= 2
    # the same history with the keys in another order is the same route
    t1b = [{"content": "be brief", "role": "system"}, {"content": "hi there", "role": "user"}]
    assert RouteKey.of(chat_key_bytes("m", t1b)) == k1
    # text prompts: the trailing partial block is not hashed
    assert len(RouteKey.of(b"x" * (3 * BLOCK_BYTES + 5)).chain) == 3


def test_lru_bound_stale_and_drop():
    t = PrefixTable(max_blocks=6)
    a = RouteKey.of(bytes(range(4 * BLOCK_BYTES))).chain
    b = RouteKey.of(bytes(range(100, 100 + 4 * BLOCK_BYTES))).chain
    t.insert("r1", a)
    t.insert("r2", a[:2])
    assert t.match(a, ["r1", "r2"]) == (["r1"], 4)
    assert t.match(a[:2], ["r1", "r2"]) == (["r1", "r2"], 2)
    assert t.match(a, ["r2"]) == (["r2"], 2)
    t.insert("r1", b)                      # 8 blocks > 6: a's oldest two go
    assert t.size("r1") == 6 and t.match(a, ["r1"]) == ([], 0)
    assert t.match(b, ["r1"]) == (["r1"], 4)
    # r1 answered b with one block cached: it evicted block 1 and everything older
    t2 = PrefixTable()
    t2.insert("r1", a)
    t2.insert("r1", b)
    assert t2.stale("r1", b, 1) > 0
    assert t2.match(a, ["r1"]) == ([], 0) and t2.depth("r1", b) == 0
    t.drop("r1")
    assert t.match(b, ["r1", "r2"]) == ([], 0) and t.replicas() == ["r2"]
    assert t.keep_only(["r3"]) == ["r2"] and t.replicas() == []


def _reference(given_to: dict[str, list[tuple[int, ...]]], chain: tuple[int, ...],
               cands: list[str]) -> tuple[list[str], int]:
    depth = {}
    for r in cands:
        best = 0
        for c in given_to.get(r, []):
            n = 0
            while n < min(len(c), len(chain)) and c[n] == chain[n]:
                n += 1
            best = max(best, n)
        depth[r] = best
    d = max(depth.values(), default=0)
    return (sorted(r for r in cands if depth[r] == d), d) if d else ([], 0)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]),
                              st.lists(st.sampled_from(b"ab"), min_size=0, max_size=5)),
                    min_size=1, max_size=12),
       query=st.lists(st.sampled_from(b"ab"), min_size=0, max_size=6),
       cands=st.sets(st.sampled_from(["r1", "r2", "r3"]), min_size=1))
def test_match_is_the_longest_common_block_prefix(ops, query, cands):
    t = PrefixTable()   # unbounded here: the reference keeps everything
    given_to: dict[str, list[tuple[int, ...]]] = {}
    for r, blocks in ops:
        chain = RouteKey.of(bytes(b for x in blocks for b in [x] * BLOCK_BYTES)).chain
        t.insert(r, chain)
        given_to.setdefault(r, []).append(chain)
    q = RouteKey.of(bytes(b for x in query for b in [x] * BLOCK_BYTES)).chain
    assert t.match(q, sorted(cands)) == _reference(given_to, q, sorted(cands))
