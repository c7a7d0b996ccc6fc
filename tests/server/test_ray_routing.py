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


def test_build_app_arguments():
    """``serve run tep.server.ray:build_app ...``: routing, model options and autoscaling
    reach the model deployment; without prefix_routing the app is today's whole-app one."""
    import tep.server.ray

    a = tep.server.ray.build_app({"backend": "llamacpp", "num_replicas": "auto",
                                  "prefix_routing": "true", "model": "/m.gguf",
                                  "n_threads": "1", "max_concurrency": "4"})
    ingress = a._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert (ingress.name, model.name) == ("tep", "tep-model")
    assert model.init_args == ("llamacpp", {"model": "/m.gguf", "n_threads": 1})
    cfg = model._deployment_config
    assert cfg.request_router_config.request_router_class.endswith("router.PrefixRouter")
    assert cfg.autoscaling_config is not None and cfg.autoscaling_config.max_replicas > 1
    whole = tep.server.ray.build_app({"backend": "toy", "num_replicas": "2",
                                      "prefix_routing": "false"})._bound_deployment
    assert (whole.name, whole.num_replicas, whole.init_args) == ("tep", 2, ())
    with pytest.raises(ValueError):
        tep.server.ray.app("toy", router="round-robin")
