"""Ray Serve adapter (tep.server.ray): a local Ray Serve application with 2 replicas, each with
its own backend, answering the official openai client over loopback."""
from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
from support.process import ROOT, TESTS, free_port, wait_health

if os.environ.get("CI"):  # a required suite: never skipped in CI
    import ray
    from ray import serve
else:
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_serve_url(tmp_path_factory):
    import tep.server.ray

    events = tmp_path_factory.mktemp("ray") / "events.{pid}.jsonl"
    port = free_port()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
                                       "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = tep.server.ray.app("support.backends:ScriptBackend", num_replicas=2,
                          ray_actor_options={"num_cpus": 0}, max_concurrency=2,
                          events_jsonl=str(events))
        serve.run(app, name="tep", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_health(url, None, timeout=60)
        yield url, events.parent
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_two_replicas_answer_openai_requests(ray_serve_url):
    url, ev_dir = ray_serve_url
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list().data] == ["script", "other/model"]
    r = c.completions.create(model="script", prompt=[10, 11], max_tokens=6, seed=3)
    assert len(r.choices[0].text) == 6 and r.usage.completion_tokens == 6
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="script", prompt=[10, 11], max_tokens=6, seed=3, stream=True) if ch.choices)
    assert text == r.choices[0].text  # same seed, either replica: same text
    chat = c.chat.completions.create(model="script", max_tokens=4, seed=1,
                                     messages=[{"role": "user", "content": "hi"}])
    parts = list(c.chat.completions.create(model="script", max_tokens=4, seed=1, stream=True,
                                           messages=[{"role": "user", "content": "hi"}]))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == \
        chat.choices[0].message.content
    assert len(c.embeddings.create(model="script", input=[3, 4]).data[0].embedding) == 8
    # every response names the replica that served it (here: one of the two whole apps)
    names = {httpx.get(url + "/health").headers["x-tep-replica"] for _ in range(12)}
    assert 1 <= len(names) <= 2 and all(names)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt=[9])
    # both replicas are up, each built its own backend and wrote its own events file
    starts = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        starts = [p for p in ev_dir.iterdir() if "run_start" in p.read_text()]
        if len(starts) == 2:
            break
        time.sleep(0.2)
    assert len(starts) == 2
