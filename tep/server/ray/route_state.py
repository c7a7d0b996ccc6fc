"""What the ingress and its request routers share in one process: the route ticket of a
call, the routers' counters and the registry of live routers.

Ray ships a custom router class to the process that uses it as a by-value pickle of its
module (:mod:`tep.server.ray.router`), which gives that module its own globals; anything
the ingress must see as the same object lives here, in a module imported normally.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from tep.server.ray.prefix_table import RouteKey

__all__ = ["RouteTicket", "RouterCounters", "register", "routers"]

_ROUTERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(router: Any) -> None:
    """Called by a router when Ray initialises it."""
    _ROUTERS.add(router)


def routers() -> list[Any]:
    """The tep request routers alive in this process (one per deployment handle)."""
    return list(_ROUTERS)


class RouteTicket:
    """The route of one call: its key, and (filled by the router) the replica chosen and
    how many key blocks the table said it held. Shared between the ingress and the router
    in one process; it pickles to an empty ticket, so the replica is sent nothing."""

    __slots__ = ("key", "replica", "predicted", "how", "routed_at", "attempts")

    def __init__(self, key: RouteKey | None = None) -> None:
        self.key = key
        self.replica: str | None = None
        self.predicted = 0
        self.how = ""
        self.routed_at = 0.0
        self.attempts = 0

    def __reduce__(self) -> Any:
        return (RouteTicket, ())


@dataclass
class RouterCounters:
    """Routing decisions of one router (monotonic counts).

    Attributes:
        by_prefix: routed to a replica holding a prefix of the key.
        no_match: had a key, no replica held its first block (least-loaded).
        fallback: load imbalance past the threshold (least-loaded, prefix ignored).
        no_key: calls without a key (metadata calls, tokenize, embeddings).
        stale: answers that found less cached than the table predicted.
        per_replica: replica -> {"by_prefix": n, "fallback": n, "no_match": n}.
        route_s: seconds spent choosing (for the routing cost per request).
        routed: calls routed.
    """

    by_prefix: int = 0
    no_match: int = 0
    fallback: int = 0
    no_key: int = 0
    stale: int = 0
    routed: int = 0
    route_s: float = 0.0
    per_replica: dict = field(default_factory=dict)
