"""``PrefixRouter``: a Ray Serve request router that sends a request to the model replica
holding the longest cached prefix of its prompt.

It runs inside the ingress (in its :class:`~ray.serve.handle.DeploymentHandle`), so it sees
each call's arguments: the ingress passes a :class:`RouteTicket` (the prompt's
:class:`~tep.server.ray.prefix_table.RouteKey`) as the ``route`` keyword. Per request:

1. candidates' loads (requests this ingress has in flight on each; Ray's cached queue
   lengths when larger) — if the busiest minus the idlest is past ``imbalance`` requests,
   or the request has no key, fall back to the least-loaded candidates (*fallback*);
2. otherwise the candidates holding the longest prefix (:class:`PrefixTable`), the
   least-loaded of them first (*by prefix*), if that prefix continues a key they were
   sent (the next turn of a chat) or covers ``min_share`` of the request's key; no
   candidate holds such a prefix → the
   least-loaded candidates remembering the fewest keys (*no match*, a new
   conversation: this spreads conversations evenly).

When the request is routed, the table records that the replica now holds the key. A
replica's answer reports how much of the prompt it found cached; fewer blocks than the
table predicted means it evicted them, and the table forgets that replica's older entries
(:meth:`PrefixTable.stale`). Dead or removed replicas are dropped from the table.

Ray constructs the router (``RequestRouterConfig(request_router_class=PrefixRouter,
request_router_kwargs={...})``) from a by-value pickle of this module, so what the
ingress shares with it (the ticket class, the registry of live routers) lives in
:mod:`tep.server.ray.route_state`.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any, List, Optional

from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest,
                                      ReplicaID, ReplicaResult, RequestRouter,
                                      RunningReplica)

from tep.server.ray.prefix_table import BLOCK_BYTES, PrefixTable
from tep.server.ray.route_state import RouterCounters, RouteTicket, register, routers

__all__ = ["PrefixRouter", "ObservedPow2Router", "RouteTicket", "RouterCounters", "routers"]


class PrefixRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Longest-cached-prefix routing with a least-loaded fallback (see the module).

    ``request_router_kwargs``: ``imbalance`` (requests, default 8): the busiest minus the
    idlest candidate's load past which prefixes are ignored; ``max_blocks`` (default
    65536): key blocks remembered per replica; ``min_share`` (default 0.8): a match that
    does not continue a key the replica was sent (a new conversation sharing only a system
    turn) counts only if it covers this share of the request's key; ``patience``
    (default 4): routing attempts (Ray retries with growing backoff and probe deadlines)
    during which only the replicas holding the prefix are offered, before every other
    replica is offered as a second choice.
    """

    def initialize_state(self, imbalance: int = 8, max_blocks: int = 1 << 16,
                         min_share: float = 0.8, patience: int = 4,
                         **kwargs: Any) -> None:
        self.imbalance = int(imbalance)
        self.patience = int(patience)
        self.min_share = float(min_share)
        self.table = PrefixTable(max_blocks)
        self.counters = RouterCounters()
        self.inflight: dict[str, int] = {}
        self.lock = threading.Lock()
        self.deployment_name = getattr(getattr(self, "_deployment_id", None), "name", None)
        register(self)

    # ---- loads
    def _load(self, r: RunningReplica) -> int:
        rid = r.replica_id.unique_id
        n = self.inflight.get(rid, 0)
        cache = getattr(self, "_replica_queue_len_cache", None)
        if cache is not None:
            q = cache.get(r.replica_id)
            if q is not None and q > n:
                n = q
        return n

    def _least_loaded(self, reps: List[RunningReplica], loads: dict) -> List[RunningReplica]:
        lo = min(loads[r.replica_id.unique_id] for r in reps)
        best = [r for r in reps if loads[r.replica_id.unique_id] == lo]
        random.shuffle(best)   # ties: spread new conversations
        return best

    # ---- RequestRouter
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        t0 = time.thread_time()   # CPU time: waits for the GIL or a core are not routing
        if not candidate_replicas:
            return []
        ticket = _ticket(pending_request)
        loads = {r.replica_id.unique_id: self._load(r) for r in candidate_replicas}
        c = self.counters
        with self.lock:
            if ticket is None or ticket.key is None or not ticket.key.chain:
                ranks = [self._least_loaded(candidate_replicas, loads)]
                how = "no_key"
            elif max(loads.values()) - min(loads.values()) > self.imbalance:
                ranks = [self._least_loaded(candidate_replicas, loads)]
                how = "fallback"
            else:
                by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
                chain = ticket.key.chain
                best, depth = self.table.match(chain, by_id)
                if best and not any(self.table.ends_at(b, chain[depth - 1]) for b in best) \
                        and depth * BLOCK_BYTES < self.min_share * ticket.key.n_bytes:
                    best = []   # only a short shared head (a system turn): a new conversation
                if best:
                    first = self._least_loaded([by_id[b] for b in best], loads)
                    rest = [r for r in candidate_replicas if r not in first]
                    ranks = [first]
                    if rest and ticket.attempts >= self.patience:
                        # the cache holders did not take it in `patience` tries (full, or
                        # their queue-length probes were late): anyone will do
                        ranks.append(self._least_loaded(rest, loads))
                    how = "by_prefix"
                else:   # a new conversation: the least-loaded replica with the fewest keys
                    first = self._least_loaded(candidate_replicas, loads)
                    sizes = {r.replica_id.unique_id: self.table.n_keys(r.replica_id.unique_id)
                             for r in first}
                    lo = min(sizes.values())
                    top = [r for r in first if sizes[r.replica_id.unique_id] == lo]
                    rest = [r for r in candidate_replicas if r not in top]
                    ranks = [top] + ([self._least_loaded(rest, loads)] if rest else [])
                    how = "no_match"
            if ticket is not None:
                ticket.how = how
                ticket.attempts += 1
            c.route_s += time.thread_time() - t0
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        rid = replica_id.unique_id
        ticket = _ticket(pending_request)
        with self.lock:
            c = self.counters
            c.routed += 1
            if ticket is not None:   # generations: the ingress reports their end
                self.inflight[rid] = self.inflight.get(rid, 0) + 1
            how = ticket.how if ticket is not None and ticket.how else "no_key"
            setattr(c, how, getattr(c, how) + 1)
            per = c.per_replica.setdefault(rid, {"by_prefix": 0, "fallback": 0,
                                                 "no_match": 0, "no_key": 0})
            per[how] += 1
            if ticket is not None:
                ticket.replica = rid
                ticket.routed_at = time.perf_counter()
                if ticket.key is not None and ticket.key.chain:
                    ticket.predicted = self.table.depth(rid, ticket.key.chain)
                    self.table.insert(rid, ticket.key.chain)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self.lock:
            self.table.drop(replica_id.unique_id)
            self.inflight.pop(replica_id.unique_id, None)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        with self.lock:
            live = [r.replica_id.unique_id for r in replicas]
            for gone in self.table.keep_only(live):
                self.inflight.pop(gone, None)

    # ---- what the ingress reports back
    def finished(self, ticket: RouteTicket, cached_tokens: int | None,
                 prompt_tokens: int | None) -> None:
        """The call of ``ticket`` ended (its in-flight count drops). With the replica's
        cached/prompt token counts: fewer cached blocks than predicted → stale entries."""
        rid = ticket.replica
        if rid is None:
            return
        with self.lock:
            n = self.inflight.get(rid, 0)
            if n > 0:
                self.inflight[rid] = n - 1
            key = ticket.key
            # only a continuation's prediction rests on a finished request (a new
            # conversation's shared head may still be computing elsewhere on the replica)
            if ticket.how != "by_prefix" or key is None or not key.chain or \
                    ticket.predicted <= 0 or cached_tokens is None or not prompt_tokens:
                return
            # the key's blocks the replica really had, by the share of prompt tokens
            kept = int(len(key.chain) * min(1.0, cached_tokens / prompt_tokens))
            if 2 * kept < ticket.predicted:
                self.counters.stale += 1
                self.table.stale(rid, key.chain, kept)
                self.table.insert(rid, key.chain)   # it holds the whole prompt now

    def snapshot(self) -> dict:
        """Counters, in-flight loads, table sizes and each replica's routing stats."""
        with self.lock:
            c = self.counters
            out = {"by_prefix": c.by_prefix, "no_match": c.no_match, "fallback": c.fallback,
                   "no_key": c.no_key, "stale": c.stale, "routed": c.routed,
                   "route_s": c.route_s, "forgotten": self.table.forgotten,
                   "per_replica": {k: dict(v) for k, v in c.per_replica.items()},
                   "inflight": dict(self.inflight),
                   "table_blocks": {r: self.table.size(r) for r in self.table.replicas()}}
        stats = {}
        for rid, r in list(getattr(self, "_replicas", {}).items()):
            try:
                stats[rid.unique_id] = dict(r.routing_stats or {})
            except Exception:  # routing stats are best effort
                stats[rid.unique_id] = {}
        out["replica_stats"] = stats
        return out


def _ticket(pending: Optional[PendingRequest]) -> RouteTicket | None:
    if pending is None:
        return None
    t = pending.kwargs.get("route") if pending.kwargs else None
    return t if isinstance(t, RouteTicket) else None


try:  # Ray's default router, to compare against (same shape, prompt-blind)
    from ray.serve._private.request_router.pow_2_router import \
        PowerOfTwoChoicesRequestRouter as _Pow2
except ImportError:  # pragma: no cover - moved in another Ray version
    from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter as _Pow2


class ObservedPow2Router(_Pow2):
    """Ray's power-of-two-choices router unchanged, plus what :class:`PrefixRouter`
    exports (routing stats, counts), so an ingress can compare the two."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.counters = RouterCounters()
        self.table = PrefixTable(1)
        self.inflight: dict[str, int] = {}
        self.lock = threading.Lock()
        self.deployment_name = getattr(getattr(self, "_deployment_id", None), "name", None)
        register(self)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        ticket = _ticket(pending_request)
        with self.lock:
            c = self.counters
            c.routed += 1
            per = c.per_replica.setdefault(replica_id.unique_id, {"default": 0})
            per["default"] += 1
            if ticket is not None:
                ticket.replica = replica_id.unique_id

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        t0 = time.thread_time()
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        self.counters.route_s += time.thread_time() - t0
        return ranks

    def finished(self, ticket: RouteTicket, cached_tokens: int | None,
                 prompt_tokens: int | None) -> None:
        pass

    snapshot = PrefixRouter.snapshot
