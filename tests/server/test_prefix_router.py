"""PrefixRouter's decisions in-process (no Ray cluster; stand-in replicas): a conversation
follows its prefix, new ones go to the least-filled replica, an imbalance past the
threshold falls back to the least-loaded replica, an answer that found less cached than
predicted forgets the replica's older entries, and a dead replica leaves the table."""
from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import pytest

if os.environ.get("CI"):  # a required suite: never skipped in CI
    import ray  # noqa: F401
else:
    pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402

from tep.server.ray.prefix_table import RouteKey, chat_key_bytes  # noqa: E402
from tep.server.ray.route_state import RouteTicket  # noqa: E402
from tep.server.ray.router import PrefixRouter  # noqa: E402

pytestmark = pytest.mark.ray

DEP = DeploymentID(name="m", app_name="a")


def _router(n: int, imbalance: int = 2) -> tuple[PrefixRouter, list]:
    reps = [SimpleNamespace(replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=DEP))
            for i in range(n)]
    r = object.__new__(PrefixRouter)   # the routing logic alone
    r.initialize_state(imbalance=imbalance)
    # what Ray's base class keeps about replicas (used by on_replica_actor_died)
    r._replicas = {x.replica_id: x for x in reps}
    r._replicas_list = list(reps)
    r._replica_id_set = set(r._replicas)
    r._queue_len_gauge_last_update = {}
    r._colocated_replica_ids = {}
    r._multiplexed_model_id_to_replica_ids = {}
    return r, reps


def _route(r: PrefixRouter, reps: list, msgs: list) -> tuple[RouteTicket, str]:
    t = RouteTicket(RouteKey.of(chat_key_bytes("m", msgs)))
    pr = SimpleNamespace(kwargs={"route": t})
    ranks = asyncio.run(r.choose_replicas(reps, pr))
    chosen = ranks[0][0]
    r.on_request_routed(pr, chosen.replica_id, None)
    return t, chosen.replica_id.unique_id


def _conv(c: int, turns: int) -> list:
    msgs = [{"role": "system", "content": "shared system turn"}]
    for t in range(turns):
        msgs = msgs + [{"role": "user", "content": f"{c * 7919 + t}: which number is this, "
                                                   "and what is it plus one?"},
                       {"role": "assistant", "content": f"answer {t}"}]
    return msgs[:-1]


def test_a_shared_system_turn_alone_does_not_pull_new_conversations():
    r, reps = _router(3)
    t, name = _route(r, reps, _conv(0, 1))
    r.finished(t, 0, 10)
    t, other = _route(r, reps, _conv(1, 1))     # shares the system turn only
    assert other != name and t.how == "no_match"
    # a long shared head (a document) does: most of the key is cached there
    doc = [{"role": "user", "content": "a long shared document " * 20 + "question A"}]
    t, home = _route(r, reps, doc)
    r.finished(t, 0, 10)
    doc_b = [{"role": "user", "content": "a long shared document " * 20 + "question B"}]
    t, name = _route(r, reps, doc_b)
    assert name == home and t.how == "by_prefix"


def test_conversations_follow_their_prefix_and_spread():
    r, reps = _router(3)
    first = {}
    for c in range(6):
        t, name = _route(r, reps, _conv(c, 1))
        r.finished(t, None, None)   # (no cache report: nothing to learn)
        first[c] = name
    assert sorted(first.values()) == ["r0", "r0", "r1", "r1", "r2", "r2"]   # even spread
    for turn in range(2, 5):
        for c in range(6):
            t, name = _route(r, reps, _conv(c, turn))
            assert name == first[c] and t.how == "by_prefix" and t.predicted > 0
            r.finished(t, 40, 50)
    assert r.counters.by_prefix == 18 and r.counters.stale == 0


def test_imbalance_falls_back_to_least_loaded():
    r, reps = _router(3, imbalance=2)
    t, home = _route(r, reps, _conv(0, 1))
    r.finished(t, 0, 10)
    # three unfinished calls pile up on the conversation's replica
    for _ in range(3):
        _, name = _route(r, reps, _conv(0, 2))
        assert name == home
    t, name = _route(r, reps, _conv(0, 3))
    assert name != home and t.how == "fallback" and r.counters.fallback == 1


def test_stale_answer_and_dead_replica_are_forgotten():
    r, reps = _router(2)
    homes = {}
    for c in range(4):                     # two conversations per replica
        t, homes[c] = _route(r, reps, _conv(c, 1))
        r.finished(t, None, None)
    home = homes[0]
    (mate,) = [c for c in (1, 2, 3) if homes[c] == home]
    (away,) = [c for c in (1, 2, 3) if homes[c] != home][:1]
    chain2 = RouteKey.of(chat_key_bytes("m", _conv(mate, 1))).chain
    assert r.table.depth(home, chain2) == len(chain2)
    t, name = _route(r, reps, _conv(0, 3))
    assert name == home and t.predicted > 0
    r.finished(t, 0, 200)                  # nothing was cached: the replica evicted it,
    assert r.counters.stale == 1           # and in an LRU everything older went too
    shared = next(i for i, (a, b) in enumerate(zip(chain2, t.key.chain)) if a != b)
    assert r.table.depth(home, chain2) == shared   # only the system turn it just fed again
    assert r.table.depth(home, t.key.chain) == len(t.key.chain)   # it just computed this
    assert r.table.depth(homes[away], RouteKey.of(chat_key_bytes("m", _conv(away, 1))).chain) > 0
    dead = next(x for x in reps if x.replica_id.unique_id == home)
    r.on_replica_actor_died(dead.replica_id)
    assert home not in r.table.replicas()
    live = [x for x in reps if x is not dead]
    t, name = _route(r, live, _conv(0, 4))
    assert name != home
