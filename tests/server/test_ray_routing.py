"""Prefix-aware routing on Ray Serve (tep.server.ray.app(..., prefix_routing=True)): a local
Ray with an ingress and 3 replicas of the toy engine (prefix cache of 64 finished
sequences, 2 ms per engine step so streams last), driven over loopback HTTP.

Checked: multi-turn chats stay on their first replica (>= 95% of later turns) while new
conversations spread over every replica; the ingress's /metrics shows each replica's
prefix-cache hits and sums them; SSE through Ray is the same payloads as a local app; a
replica killed mid-stream ends that stream with an error event, later requests go to the
others and the router forgets it."""
from __future__ import annotations

import os

import pytest
from support.process import free_port
from support.ray_checks import check_kill, check_routing, check_sse, deploy, runtime_env

if os.environ.get("CI"):  # a required suite: never skipped in CI
    import ray
    from ray import serve
else:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.ray

N_REPLICAS = 3


@pytest.fixture(scope="module")
def url():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024 * 1024, runtime_env=runtime_env())
    try:
        yield deploy(free_port(), N_REPLICAS, ray_actor_options={"num_cpus": 0})
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_chats_stick_to_a_replica_and_spread(url):
    check_routing(url, N_REPLICAS)


def test_sse_streams_pass_through_unchanged(url):
    check_sse(url)


def test_killed_replica_is_routed_around(url):
    check_kill(ray, url)
