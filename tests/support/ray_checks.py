"""Checks shared by the Ray Serve routing tests (one node and a simulated cluster): chats
over HTTP that record the ``x-tep-replica`` of every turn, SSE compared with a local app,
and a replica killed under a live stream."""
from __future__ import annotations

import asyncio
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from support.http import client_for, sse_events
from support.process import ROOT, TESTS, wait_health
from tep.obs.metrics import sample_values

MODEL = "tep-toy"
HEADER = "x-tep-replica"


def chat_turns(url: str, n_conv: int, n_turns: int, *, workers: int = 4,
               max_tokens: int = 6, stream_every: int = 3) -> dict[int, list[str]]:
    """``n_conv`` conversations of ``n_turns`` turns, each turn resending the whole
    history plus one user message (every ``stream_every``-th turn streamed). Returns the
    serving replica of every turn, per conversation."""
    out: dict[int, list[str]] = {}

    def run(c: int) -> None:
        msgs = [{"role": "system", "content": "You are a terse assistant."}]
        names: list[str] = []
        with httpx.Client(base_url=url, timeout=60) as cl:
            for t in range(n_turns):
                msgs.append({"role": "user", "content": f"conversation {c} turn {t}: "
                                                        f"tell me about item {c * 7 + t}"})
                body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens,
                        "seed": c * 100 + t}
                if stream_every and t % stream_every == stream_every - 1:
                    r = cl.post("/v1/chat/completions", json={**body, "stream": True})
                    assert r.status_code == 200, r.text
                    ev = sse_events(r.content)
                    text = "".join(e["choices"][0]["delta"].get("content") or ""
                                   for e in ev[:-1] if e["choices"])
                else:
                    r = cl.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    text = r.json()["choices"][0]["message"]["content"]
                names.append(r.headers[HEADER])
                msgs.append({"role": "assistant", "content": text})
        out[c] = names

    with ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(run, c) for c in range(n_conv)]:
            f.result()
    return out


def stickiness(turns: dict[int, list[str]]) -> float:
    """Share of turns after the first served by the conversation's first replica."""
    same = total = 0
    for names in turns.values():
        for n in names[1:]:
            total += 1
            same += n == names[0]
    return same / total


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def replica_of(labels: str) -> str:
    return re.search(r'replica="([^"]+)"', labels).group(1)


def wait_replica_stats(url: str, replicas: set[str], timeout: float = 30) -> str:
    """/metrics once every replica's prefix-cache counters are there and stable."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        text = metrics(url)
        hits = sample_values(text, "tep_replica_prefix_cache_hit_tokens_total")
        got = {replica_of(k): v for k, v in hits.items()}
        if replicas <= set(got) and got == last:
            return text
        last = got if replicas <= set(got) else None
        time.sleep(1.0)
    raise AssertionError(f"replica stats missing: {last}")


def sse_payloads(body: bytes) -> list[Any]:
    """SSE payloads with the per-request fields (id, created) removed."""
    out = []
    for e in sse_events(body):
        if isinstance(e, dict):
            e = {k: v for k, v in e.items() if k not in ("id", "created")}
        out.append(e)
    return out


def local_sse(backend: Any, path: str, body: dict) -> list[Any]:
    """The same request's SSE payloads from an in-process app (the reference)."""

    async def go() -> bytes:
        async with client_for(backend) as c:
            r = await c.post(path, json=body)
            assert r.status_code == 200
            return await r.get_data()

    return sse_payloads(asyncio.run(go()))


def local_json(backend: Any, path: str, body: dict) -> Any:
    """The same request's JSON answer from an in-process app (the reference)."""

    async def go() -> Any:
        async with client_for(backend) as c:
            r = await c.post(path, json=body)
            assert r.status_code == 200
            return await r.get_json()

    return asyncio.run(go())


def kill_replica_mid_stream(url: str, kill: Any) -> tuple[str, list[Any]]:
    """Start a long stream, kill its replica (``kill(name)``) after the first tokens, and
    return the replica's name and the stream's payloads."""
    body = {"model": MODEL, "prompt": "a long story: ", "max_tokens": 3000, "seed": 5,
            "stream": True}
    with httpx.Client(base_url=url, timeout=60) as cl:
        with cl.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            name = r.headers[HEADER]
            buf = b""
            it = r.iter_bytes()
            while buf.count(b"\n\n") < 3:   # some tokens are through
                buf += next(it)
            kill(name)
            for chunk in it:
                buf += chunk
    return name, sse_events(buf)


def spread_requests(url: str, n: int, prefix: str = "fresh") -> list[str]:
    """``n`` new one-turn conversations; their replicas."""
    names = []
    with httpx.Client(base_url=url, timeout=60) as cl:
        for i in range(n):
            r = cl.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 4, "seed": i,
                "messages": [{"role": "user", "content": f"{prefix} question number {i}"}]})
            assert r.status_code == 200, r.text
            names.append(r.headers[HEADER])
    return names


def table_replicas(url: str) -> set[str]:
    """Replicas the ingress's router still holds prefix entries for."""
    return {replica_of(k) for k in sample_values(metrics(url), "tep_router_table_blocks")}


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


BACKEND = "support.ray_models:SlowToyEngineBackend"
OPTIONS = {"step_delay_s": 0.002, "prefix_cache": 64}


def runtime_env() -> dict:
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
                         "RAY_USAGE_STATS_ENABLED": "0"}}


def deploy(port: int, n_replicas: int | str, **kw: Any) -> str:
    """Serve the routed app on ``port`` (Ray already initialised); its URL."""
    from ray import serve

    import tep.server.ray

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    app = tep.server.ray.app(BACKEND, prefix_routing=True, num_replicas=n_replicas,
                             backend_options=OPTIONS, routing_stats_period_s=0.5, **kw)
    serve.run(app, name="tep", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_health(url, None, timeout=120)
    # the ingress's router learns the replica set (and their stats) asynchronously
    n = n_replicas if isinstance(n_replicas, int) else kw["autoscaling_config"]["min_replicas"]
    wait_until(lambda: len(sample_values(metrics(url),
                                         "tep_replica_prefix_cache_hit_tokens_total")) >= n,
               60, f"the router to see {n} replicas")
    return url


def check_routing(url: str, n_replicas: int) -> None:
    """4 conversations per replica, 5 turns each: they spread over every replica, stay
    on their first one, and the replicas' prefix caches are hit (ingress /metrics)."""
    turns = chat_turns(url, n_conv=4 * n_replicas, n_turns=5)
    firsts = {names[0] for names in turns.values()}
    why = (turns, sample_values(metrics(url), "tep_router_routed_total"))
    assert len(firsts) == n_replicas, why             # conversations spread over all
    assert stickiness(turns) >= 0.95, why             # and stay where their cache is
    text = wait_replica_stats(url, firsts)
    hits = {replica_of(k): v for k, v in
            sample_values(text, "tep_replica_prefix_cache_hit_tokens_total").items()}
    misses = {replica_of(k): v for k, v in
              sample_values(text, "tep_replica_prefix_cache_miss_tokens_total").items()}
    assert all(hits[r] > 0 for r in firsts), hits      # every replica reused prefixes
    # the aggregate sums the replicas; later turns reuse most of their history
    assert sample_values(text, "tep_prefix_cache_hit_tokens_total")[""] == sum(hits.values())
    assert sum(hits.values()) / (sum(hits.values()) + sum(misses.values())) > 0.5
    routed = sample_values(text, "tep_router_routed_total")
    by_prefix = sum(v for k, v in routed.items() if 'how="by_prefix"' in k)
    later = sum(len(t) - 1 for t in turns.values())
    hows = {h: sum(v for k, v in routed.items() if f'how="{h}"' in k)
            for h in ("by_prefix", "no_match", "fallback", "no_key")}
    # (a few later turns may go by the least-loaded rule after a false eviction signal)
    assert by_prefix >= 0.9 * later, (hows, sample_values(text, "tep_router_stale_total"))


def check_sse(url: str) -> None:
    """Streams through Ray carry the payloads a local app sends for the same request."""
    from support.ray_models import SlowToyEngineBackend

    local = SlowToyEngineBackend(step_delay_s=0.0, **{k: v for k, v in OPTIONS.items()
                                                      if k != "step_delay_s"})
    try:
        for path, body in [
            ("/v1/chat/completions", {"model": "tep-toy", "max_tokens": 12, "seed": 9,
                                      "stream": True, "logprobs": True, "top_logprobs": 2,
                                      "stream_options": {"include_usage": True},
                                      "messages": [{"role": "user", "content": "hello"}]}),
            ("/v1/completions", {"model": "tep-toy", "max_tokens": 10, "seed": 4,
                                 "stream": True, "prompt": [72, 105, 33], "stop": ["e"],
                                 "stream_options": {"include_usage": True}}),
        ]:
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == 200 and r.headers[HEADER]
            assert r.headers["content-type"].startswith("text/event-stream")
            assert sse_payloads(r.content) == local_sse(local, path, body)
        # embeddings (batched on the replica) and a non-streamed chat: the same JSON
        for emb in ({"model": "tep-toy", "input": ["hello there", "again"]},
                    {"model": "tep-toy", "input": [[104, 105], [33]]}):
            r = httpx.post(url + "/v1/embeddings", json=emb, timeout=60)
            assert r.status_code == 200 and r.headers[HEADER]
            assert [d["embedding"] for d in r.json()["data"]] == \
                [d["embedding"] for d in local_json(local, "/v1/embeddings", emb)["data"]]
        chat = {"model": "tep-toy", "max_tokens": 7, "seed": 2,
                "messages": [{"role": "user", "content": "once more"}]}
        got = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
        want = local_json(local, "/v1/chat/completions", chat)
        assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
        # the text routes that need the replica's chat template and token bytes
        msgs = [{"role": "user", "content": "count me"}]
        for path, body in [
            ("/apply-template", {"model": "tep-toy", "messages": msgs}),
            ("/tokenize", {"model": "tep-toy", "messages": msgs, "with_pieces": True}),
            ("/v1/messages/count_tokens", {"model": "tep-toy", "messages": msgs}),
        ]:
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == 200, (path, r.text[:300])
            assert r.json() == local_json(local, path, body), path
    finally:
        local.close()
    # answers that need no model name the ingress; errors keep their envelope
    r = httpx.post(url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code in (400, 404) and r.headers[HEADER] and "error" in r.json()
    assert httpx.get(url + "/health").headers[HEADER]


def check_kill(ray: Any, url: str) -> None:
    """Kill a replica under a live stream: the stream ends with an error event naming it,
    new requests go elsewhere, and the router's table forgets it."""
    def kill(name: str) -> None:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].endswith("#" + name)]
        assert len(actors) == 1, actors
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]),
                 no_restart=True)

    dead, events = kill_replica_mid_stream(url, kill)
    assert events[-1] == "[DONE]"
    err = events[-2]
    assert "error" in err and err["error"]["type"] and dead in err["error"]["message"]
    assert any(isinstance(e, dict) and e.get("choices") for e in events[:-2])  # tokens came
    later = spread_requests(url, 8, prefix="after the kill")
    assert dead not in later
    wait_until(lambda: dead not in table_replicas(url), 30, "the router to drop " + dead)


__all__ = ["chat_turns", "stickiness", "metrics", "replica_of",
           "wait_replica_stats", "sse_payloads", "local_sse", "kill_replica_mid_stream",
           "spread_requests", "table_replicas", "wait_until", "deploy", "runtime_env",
           "check_routing", "check_sse", "check_kill"]
