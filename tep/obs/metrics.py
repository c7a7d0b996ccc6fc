"""Prometheus metrics, served at ``GET /metrics`` (text exposition format).

=====================================  =========  ============================================
name                                   type       labels / meaning
=====================================  =========  ============================================
tep_requests_total                     counter    endpoint, status, outcome (see tep.obs.events)
tep_request_duration_seconds           histogram  endpoint; arrival to last byte (streams too)
tep_time_to_first_token_seconds        histogram  endpoint; arrival to first streamed text
tep_inter_token_latency_seconds        histogram  endpoint; gap between streamed deltas of a
                                                  choice (one delta is usually one token);
                                                  a stream's gaps land when it ends
tep_prompt_tokens_total                counter    endpoint
tep_completion_tokens_total            counter    endpoint
tep_requests_in_flight                 gauge      requests being handled (all routes but
                                                  /metrics), queued ones included
tep_queue_depth                        gauge      requests waiting for a backend slot
tep_generation_timeouts_total          counter    endpoint
=====================================  =========  ============================================

``endpoint`` is the route template (``/v1/completions``, ``/v1/models/{model_id}``, ...)
or ``other`` for unknown paths, so fuzzed URLs cannot blow up the label set. ``status``
499 means the client left before a response started.

Several worker processes (``tep serve --workers N``): the CLI sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, every worker writes its values to
files there (prometheus-client's multiprocess mode) and ``/metrics`` on any worker
aggregates all of them: counters and histograms are summed over workers (dead ones
included, so totals never go backwards), the two gauges are summed over live workers.

Without prometheus-client installed the server still runs and ``/metrics`` is a 501.
"""
from __future__ import annotations

import os
import re
from bisect import bisect_left
from typing import Any

try:
    import prometheus_client as _prom
except ImportError:  # pragma: no cover - it is a dependency; stay servable without it
    _prom = None

from tep.wire.routes import endpoint_label

__all__ = ["Metrics", "multiprocess_dir", "endpoint_label", "sample_values"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            120.0, 300.0)
_TTFT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)



def multiprocess_dir() -> str | None:
    """The multiprocess directory in force, if any."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir") or None


class Metrics:
    """The metrics of one app. Each app gets its own registry, so several apps in one
    process (tests) never collide; in multiprocess mode values go to the shared files.

    Args:
        enabled: False gives a no-op object (and ``/metrics`` answers 501).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and _prom is not None
        if not self.enabled:
            return
        P = _prom
        self.multiprocess = multiprocess_dir() is not None
        self.registry = P.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = P.Counter("tep_requests", "Requests by endpoint, HTTP status and "
                                  "outcome", ["endpoint", "status", "outcome"], registry=r)
        self.duration = P.Histogram("tep_request_duration_seconds", "Request latency, "
                                    "arrival to last byte", ["endpoint"], buckets=_LATENCY,
                                    registry=r)
        self.ttft = P.Histogram("tep_time_to_first_token_seconds", "Time to first streamed "
                                "token", ["endpoint"], buckets=_TTFT, registry=r)
        self.itl = P.Histogram("tep_inter_token_latency_seconds", "Gap between streamed "
                               "tokens of one choice", ["endpoint"], buckets=_ITL, registry=r)
        self.prompt_tokens = P.Counter("tep_prompt_tokens", "Prompt tokens processed",
                                       ["endpoint"], registry=r)
        self.completion_tokens = P.Counter("tep_completion_tokens", "Tokens generated",
                                           ["endpoint"], registry=r)
        self.in_flight = P.Gauge("tep_requests_in_flight", "Requests being handled",
                                 registry=r, multiprocess_mode="livesum")
        self.queue_depth = P.Gauge("tep_queue_depth", "Requests waiting for a backend slot",
                                   registry=r, multiprocess_mode="livesum")
        self.timeouts = P.Counter("tep_generation_timeouts", "Requests ended by the "
                                  "generation timeout", ["endpoint"], registry=r)
        # labelled children by label values: ``labels()`` costs a few microseconds a
        # call (validation, a lock), and it would be called several times per request
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        """Record a time to first token."""
        if self.enabled:
            self._child(self.ttft, endpoint).observe(seconds)

    def observe_itl_many(self, endpoint: str, gaps: list[float]) -> None:
        """Record a stream's gaps between deltas at once, when it ends: one lock per
        bucket that got any instead of a full ``observe`` per token on the event loop
        (the histogram's buckets, sum and counts come out the same)."""
        if not self.enabled or not gaps:
            return
        child = self._child(self.itl, endpoint)
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            for g in gaps:   # prometheus_client changed its layout: the public way
                child.observe(g)
            return
        counts = [0] * len(bounds)
        for g in gaps:
            counts[bisect_left(bounds, g)] += 1   # the first bound >= g, as observe
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        total.inc(sum(gaps))

    def attach_engine(self, stats: Any, kv_stats: Any = None) -> None:
        """Export an engine's counters (``stats()`` returns a
        :class:`tep.engine.EngineStats`; ``kv_stats()``, when given, the model's
        ``prefix_cache_stats()``), read at scrape time: ``tep_engine_steps_total``,
        ``tep_engine_tokens_fed_total``, ``tep_engine_tokens_sampled_total``,
        ``tep_engine_overlapped_steps_total`` (steps whose forward ran during the previous
        step's delivery), ``tep_prefix_cache_hit_tokens_total`` / ``..._miss_tokens_total`` and the hit rate
        ``tep_prefix_cache_hit_rate`` (hit / (hit + miss) prompt tokens); with speculative
        decoding, per draft ``source``: ``tep_spec_drafted_tokens_total``,
        ``tep_spec_accepted_tokens_total``, ``tep_spec_runs_total`` (verifications),
        ``tep_spec_acceptance_rate`` and ``tep_spec_mean_accepted_length``; with
        ``kv_stats``, ``tep_kv_stream_copies_total`` (a slot's KV copied so a new sequence
        sits next to the busy ones) and ``tep_kv_stream_moves_total`` (a running
        sequence's stream moved to close a gap left by ended ones). Per process."""
        if not self.enabled:
            return
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class _EngineCollector:
            def collect(self) -> Any:
                s = stats()
                for name, doc, v in (
                        ("tep_engine_steps", "Engine steps (one forward each)", s.steps),
                        ("tep_engine_tokens_fed", "Tokens fed to forward", s.tokens_fed),
                        ("tep_engine_tokens_sampled", "Tokens sampled", s.tokens_sampled),
                        ("tep_engine_overlapped_steps", "Steps whose forward ran while the "
                         "previous step's tokens were delivered",
                         getattr(s, "overlapped", 0)),
                        ("tep_prefix_cache_hit_tokens", "Prompt tokens found in the cache",
                         s.prefix_hit_tokens),
                        ("tep_prefix_cache_miss_tokens", "Prompt tokens evaluated",
                         s.prefix_miss_tokens)):
                    yield CounterMetricFamily(name, doc, value=v)
                total = s.prefix_hit_tokens + s.prefix_miss_tokens
                yield GaugeMetricFamily("tep_prefix_cache_hit_rate", "Share of prompt "
                                        "tokens found in the prefix cache",
                                        value=s.prefix_hit_tokens / total if total else 0.0)
                kv = kv_stats() if kv_stats is not None else None
                for attr, doc in (("copies", "KV streams copied to place a sequence next "
                                   "to the busy slots"),
                                  ("moves", "Running sequences' KV streams moved to close "
                                   "a gap left by ended sequences")):
                    if getattr(kv, attr, None) is not None:
                        yield CounterMetricFamily(f"tep_kv_stream_{attr}", doc,
                                                  value=getattr(kv, attr))
                sp = getattr(s, "spec", None)
                if sp is not None and sp.runs:
                    fams = [CounterMetricFamily(n, d, labels=["source"]) for n, d in (
                        ("tep_spec_drafted_tokens", "Draft tokens verified"),
                        ("tep_spec_accepted_tokens", "Draft tokens accepted"),
                        ("tep_spec_runs", "Verifications (sequence-steps with drafts)"))]
                    gauges = [GaugeMetricFamily(n, d, labels=["source"]) for n, d in (
                        ("tep_spec_acceptance_rate", "Accepted / drafted tokens"),
                        ("tep_spec_mean_accepted_length", "Accepted drafts per verification"))]
                    for src in sorted(sp.runs):
                        fams[0].add_metric([src], sp.drafted.get(src, 0))
                        fams[1].add_metric([src], sp.accepted.get(src, 0))
                        fams[2].add_metric([src], sp.runs.get(src, 0))
                        gauges[0].add_metric([src], sp.acceptance_rate(src))
                        gauges[1].add_metric([src], sp.mean_accepted_length(src))
                    yield from fams
                    yield from gauges

        self.registry.register(_EngineCollector())
        self._engine_collector = _EngineCollector()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        P = _prom
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = P.CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            if getattr(self, "_engine_collector", None) is not None:
                reg.register(self._engine_collector)  # this worker's engine
            return P.generate_latest(reg), P.CONTENT_TYPE_LATEST
        return P.generate_latest(self.registry), P.CONTENT_TYPE_LATEST

    def request_done(self, endpoint: str, status: int, outcome: str, seconds: float,
                     prompt_tokens: int, completion_tokens: int, timed_out: bool) -> None:
        """Record one finished request."""
        if not self.enabled:
            return
        child = self._child
        child(self.requests, endpoint, str(status), outcome).inc()
        child(self.duration, endpoint).observe(seconds)
        if prompt_tokens:
            child(self.prompt_tokens, endpoint).inc(prompt_tokens)
        if completion_tokens:
            child(self.completion_tokens, endpoint).inc(completion_tokens)
        if timed_out:
            child(self.timeouts, endpoint).inc()

    def mark_process_dead(self) -> None:
        """Drop this process's live gauges (multiprocess mode; at worker exit)."""
        if self.enabled and self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


def sample_values(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric's samples in an exposition text such as
    ``GET /metrics`` answers (labels as written, e.g. ``'{source="ngram"}'``; ``""`` for a
    sample without labels). For scripts and tests that read a running server's metrics."""
    out = {}
    line = rf"^{re.escape(name)}(\{{{_LABELS}\}})?[ \t]+(\S+)(?:[ \t]+-?\d+)?[ \t]*$"
    for m in re.finditer(line, text, re.M):   # (an optional timestamp after the value)
        out[m.group(1) or ""] = float(m.group(2))
    return out


# label pairs, comma-separated (a trailing comma allowed): a quoted value may hold "}",
# "," and escaped characters, never a raw newline; the commas keep the match linear
_PAIR = r'[ \t]*\w+[ \t]*=[ \t]*"(?:[^"\\\n]|\\.)*"[ \t]*'
_LABELS = rf'(?:{_PAIR}(?:,{_PAIR})*,?)?[ \t]*'
