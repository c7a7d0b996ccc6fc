"""End-to-end: a real ``tep serve`` process driven by the official openai client."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from support.process import free_port, start_process, stop_process, child_env

SCRIPT = "support.backends:ScriptBackend"
MSGS = [{"role": "user", "content": "hello"}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_sync_every_endpoint(live_server):
    c = client(live_server(SCRIPT))
    assert [m.id for m in c.models.list().data] == ["script", "other/model"]
    assert c.models.retrieve("script").id == "script"

    r = c.completions.create(model="script", prompt=[10, 11], max_tokens=6, seed=3, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices[0].text) == 6 and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.tokens and r.usage.total_tokens == 8
    s = c.completions.create(model="script", prompt=[10, 11], max_tokens=6, seed=3, stream=True,
                             stream_options={"include_usage": True})
    chunks = list(s)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6
    assert c.completions.create(model="script", prompt="hi", max_tokens=2).choices[0].text

    ch = c.chat.completions.create(model="script", messages=MSGS, max_tokens=4, seed=1,
                                   logprobs=True, top_logprobs=1)
    assert ch.object == "chat.completion" and ch.choices[0].message.role == "assistant"
    assert len(ch.choices[0].logprobs.content) == 4
    st = c.chat.completions.create(model="script", messages=MSGS, max_tokens=4, seed=1,
                                   stream=True)
    parts = list(st)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == \
        ch.choices[0].message.content

    e_default = c.embeddings.create(model="script", input=[[2, 3], [4, 5]])  # base64 on the wire
    e_float = c.embeddings.create(model="script", input=[[2, 3], [4, 5]], encoding_format="float")
    for a, b in zip(e_default.data, e_float.data):
        np.testing.assert_array_equal(np.float32(a.embedding), np.float32(b.embedding))
    e_dim = c.embeddings.create(model="script", input="hey", dimensions=4)
    assert len(e_dim.data[0].embedding) == 4
    assert abs(np.linalg.norm(e_dim.data[0].embedding) - 1) < 1e-5
    assert e_dim.usage.prompt_tokens == 3


def test_sync_error_classes(live_server):
    c = client(live_server(SCRIPT))
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="script", prompt=[9], temperature=5)
    assert ei.value.status_code == 400 and ei.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="script", input=[9], dimensions=100)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt=[9])
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    with pytest.raises(openai.InternalServerError) as ei:
        c.completions.create(model="script", prompt=[1])
    assert "secret" not in str(ei.value)
    with pytest.raises(openai.APIError) as ei:
        for _ in c.completions.create(model="script", prompt=[2], max_tokens=50, stream=True):
            pass
    assert "secret" not in str(ei.value)
    with pytest.raises(openai.APIError):
        for _ in c.chat.completions.create(model="script", stream=True, messages=[
                {"role": "user", "content": "boom-later"}]):
            pass
    bare = client(live_server("tep:Backend"))
    assert bare.models.list().data == []
    with pytest.raises(openai.APIStatusError) as ei:
        bare.chat.completions.create(model="x", messages=MSGS)
    assert ei.value.status_code == 501
    with pytest.raises(openai.APIStatusError) as ei:
        bare.embeddings.create(model="x", input=[1])
    assert ei.value.status_code == 501


@pytest.mark.anyio
async def test_async_client(live_server):
    c = aclient(live_server(SCRIPT))
    try:
        models = await c.models.list()
        assert models.data[0].id == "script"
        r = await c.completions.create(model="script", prompt=[[7], [8]], n=2, max_tokens=5,
                                       seed=4)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        texts: dict[int, str] = {}
        async for ch in await c.completions.create(model="script", prompt=[[7], [8]], n=2,
                                                   max_tokens=5, seed=4, stream=True):
            for x in ch.choices:
                texts[x.index] = texts.get(x.index, "") + x.text
        assert texts == {ch.index: ch.text for ch in r.choices}
        chat = await c.chat.completions.create(model="script", messages=MSGS, max_tokens=3,
                                               seed=2)
        got = ""
        async for p in await c.chat.completions.create(model="script", messages=MSGS,
                                                       max_tokens=3, seed=2, stream=True):
            got += p.choices[0].delta.content or ""
        assert got == chat.choices[0].message.content
        e = await c.embeddings.create(model="script", input=[3, 4])
        assert len(e.data[0].embedding) == 8
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="script", messages=[])
        with pytest.raises(openai.NotFoundError):
            await c.embeddings.create(model="nope", input=[1])
        with pytest.raises(openai.APIError):
            async for _ in await c.completions.create(model="script", prompt=[2], stream=True,
                                                      max_tokens=20):
                pass
    finally:
        await c.close()


def _slow_events(events_file) -> list[dict]:
    if not events_file.exists():
        return []
    return [e for e in map(json.loads, events_file.read_text().splitlines())
            if e.get("mode") == "slow"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_disconnect_cancels_backend(live_server, events_file, endpoint):
    c = client(live_server(SCRIPT))
    before = len(_slow_events(events_file))
    if endpoint == "completions":
        stream = c.completions.create(model="script", prompt=[3], max_tokens=100000, stream=True)
    else:
        stream = c.chat.completions.create(model="script", max_tokens=100000, stream=True,
                                           messages=[{"role": "user", "content": "slow"}])
    got = 0
    for _ in stream:
        got += 1
        if got == 5:
            break
    stream.close()
    closed_at = time.time()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(_slow_events(events_file)) == before:
        time.sleep(0.05)
    evs = _slow_events(events_file)[before:]
    assert evs, "the backend never noticed the client left"
    e = evs[0]
    assert e["cancelled"] and e["stopped_after"] < 1000 and e["max_tokens"] == 100000
    assert e["end"] - e["start"] < 20


def test_concurrent_streams_interleave_live(live_server, events_file):
    import threading

    url = live_server(SCRIPT)
    before = len(_slow_events(events_file))

    def one():
        c = client(url)
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model="script", prompt=[3], max_tokens=15, stream=True) if ch.choices)
        assert len(text) == 15

    ts = [threading.Thread(target=one) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    evs = _slow_events(events_file)[before:]
    assert len(evs) == 2
    assert max(e["start"] for e in evs) < min(e["end"] for e in evs)


def test_raw_http_errors(live_server):
    url = live_server(SCRIPT)
    r = httpx.post(url + "/v1/completions", content=b"{nope",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(url + "/v2/whatever")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/openapi.json")
    assert r.status_code == 200 and "/v1/embeddings" in r.json()["paths"]


def test_body_limit_live(live_server):
    url = live_server(SCRIPT, "--max-body-bytes", "2048")
    r = httpx.post(url + "/v1/completions", json={"model": "script", "prompt": [7] * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_toy_backend_default_and_workers(live_server):
    pytest.importorskip("tep.kernels")
    url = live_server("tep.backends.toy:ToyBackend", "--workers", "2")
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tep-toy"]
    a = c.completions.create(model="tep-toy", prompt="Hello", max_tokens=8, seed=1)
    b = c.completions.create(model="tep-toy", prompt="Hello", max_tokens=8, seed=1)
    assert a.choices[0].text == b.choices[0].text


def test_quart_run_serves_toy_and_tep_backend_env():
    """``quart --app tep run`` with no config serves the toy; TEP_BACKEND picks another."""
    for env_extra, model in (({}, "tep-toy"), ({"TEP_BACKEND": SCRIPT}, "script")):
        port = free_port()
        env = child_env(**env_extra)
        if not env_extra:
            env.pop("TEP_BACKEND", None)
        proc, url = start_process([sys.executable, "-m", "quart", "--app", "tep", "run",
                                   "--port", str(port)], port, env)
        try:
            r = httpx.get(url + "/v1/models")
            assert r.json()["data"][0]["id"] == model
        finally:
            stop_process(proc)


def test_cli_without_command_prints_help():
    r = subprocess.run([sys.executable, "-m", "tep"], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 2 and "serve" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tep", "serve", "--backend", "nope:Nope",
                        "--port", str(free_port())], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode != 0 and "nope" in (r.stderr + r.stdout)


def test_early_errors_keep_the_connection_usable(live_server):
    """A 501/404/400 answered before the body is read must not cost the keep-alive
    connection: with the body still arriving when the answer is ready, the next request
    on the same socket still gets its answer."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(live_server("tep:Backend"))
    body = json.dumps({"model": "x", "input": list(range(20000))}).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    f = sock.makefile("rb")

    def read_response() -> tuple[int, dict, bytes]:
        status = int(f.readline().split()[1])
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, f.read(int(headers.get("content-length", 0)))

    try:
        for path, status in [("/v1/embeddings", 501), ("/v1/chat/completions", 501),
                             ("/v1/nope", 404), ("/v1/completions", 400)]:
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            sock.sendall(head + body[:1000])
            time.sleep(0.2)            # the server may answer before the rest arrives
            sock.sendall(body[1000:])
            got, headers, payload = read_response()
            assert got == status and b"error" in payload
            assert headers.get("connection", "").lower() != "close"
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response()[0] == 200
    finally:
        f.close()
        sock.close()


def test_event_loops_serve_the_same_streams():
    """``--event-loop uvloop`` and ``asyncio`` each serve (the log names the loop), and a
    seeded streamed chat from the toy engine gives the same text on both, equal to the
    unstreamed answer."""
    pytest.importorskip("tep.kernels")
    from support.process import process_log

    texts = {}
    for loop in ("uvloop", "asyncio"):
        port = free_port()
        proc, url = start_process([sys.executable, "-m", "tep", "serve", "--backend",
                                   "tep.backends.toy:ToyEngineBackend", "--port",
                                   str(port), "--event-loop", loop], port, child_env())
        try:
            c = client(url)
            kw = dict(model="tep-toy", messages=MSGS, max_tokens=24, seed=5,
                      temperature=0.9)
            streamed = "".join(ch.choices[0].delta.content or ""
                               for ch in c.chat.completions.create(stream=True, **kw)
                               if ch.choices)
            whole = c.chat.completions.create(**kw).choices[0].message.content
            assert streamed == whole and streamed
            texts[loop] = streamed
            assert f"event loop: {loop}" in process_log(proc)
        finally:
            stop_process(proc)
    assert texts["uvloop"] == texts["asyncio"]


def test_event_loop_option_is_checked():
    from tep.server import cli

    r = subprocess.run([sys.executable, "-m", "tep", "serve", "--event-loop", "libev",
                        "--port", str(free_port())], capture_output=True, text=True,
                       env=child_env(), timeout=60)
    assert r.returncode == 2 and "event_loop must be auto, uvloop or asyncio" in r.stderr
    assert cli._loop_runner("asyncio")[0] == "asyncio"
    assert cli._loop_runner("auto")[0] == "uvloop"     # installed with tep


def test_event_loop_without_uvloop(monkeypatch):
    """auto falls back to asyncio; asking for uvloop by name is a usage error."""
    from tep.server import cli

    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop -> ImportError
    assert cli._loop_runner("auto")[0] == "asyncio"
    with pytest.raises(cli._UsageError, match="uvloop is not installed"):
        cli._loop_runner("uvloop")
