"""Prefix-aware routing on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster:
a head and two worker nodes as separate raylets on this machine). The model replicas need
a resource only the workers have, one each, so they run on different nodes; the ingress
runs on the head. The model deployment autoscales (min 2, max 2 replicas): Ray's
autoscaler owns the replica count and the router follows it. Same checks as on one node:
chats stick and spread, SSE unchanged, a killed replica is routed around."""
from __future__ import annotations

import os

import pytest
from support.process import free_port
from support.ray_checks import check_kill, check_routing, check_sse, deploy, runtime_env

if os.environ.get("CI"):  # a required suite: never skipped in CI
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
else:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    Cluster = pytest.importorskip("ray.cluster_utils").Cluster

pytestmark = pytest.mark.ray

MEM = 75 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster_url():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": MEM, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=MEM,
                                resources={"tep_replica": 1}) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=runtime_env())
        cluster.wait_for_nodes()
        url = deploy(free_port(), "auto",
                     autoscaling_config={"min_replicas": 2, "max_replicas": 2},
                     ray_actor_options={"num_cpus": 0, "resources": {"tep_replica": 1}})
        yield url, {w.node_id for w in workers}, cluster.head_node.node_id
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def replica_nodes() -> dict[str, str]:
    """Model replica name -> node ID (asked through a handle until both answered)."""
    h = serve.get_deployment_handle("tep-model", app_name="tep")
    seen: dict[str, str] = {}
    for _ in range(40):
        name, node = h.whoami.remote().result(timeout_s=30)
        seen[name] = node
        if len(seen) == 2:
            break
    return seen


def test_replicas_on_different_nodes_stick_and_spread(cluster_url):
    url, worker_nodes, head = cluster_url
    nodes = replica_nodes()
    assert len(nodes) == 2 and set(nodes.values()) == worker_nodes
    check_routing(url, 2)


def test_sse_through_the_cluster(cluster_url):
    check_sse(cluster_url[0])


def test_killed_replica_on_a_node_is_routed_around(cluster_url):
    check_kill(ray, cluster_url[0])
