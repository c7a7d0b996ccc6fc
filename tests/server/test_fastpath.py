"""The ASGI fast path (tep.server.fastpath) answers exactly what the Quart routes answer.

Every case is sent to two apps over the same backend class: one with the fast path (the
default) and one with ``fast_path=False`` (Quart routes). Status, headers and body must
be equal once the per-request parts (IDs, ``created``) are masked. A ``before_request``
hook on each app proves which layer served the request: Quart's hooks never see what the
fast path answers."""
from __future__ import annotations

import contextlib
import re
from typing import Any, AsyncIterator

import pytest
from quart import request
from support.backends import ScriptBackend

import tep

pytestmark = pytest.mark.anyio

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"
MSGS = [{"role": "user", "content": "Hello there"}]

_IDS = re.compile(rb"(cmpl|chatcmpl|req)-[0-9a-f]{32}")
_CREATED = re.compile(rb'"created":\d+')


def _mask(b: bytes) -> bytes:
    return _CREATED.sub(b'"created":0', _IDS.sub(rb"\1-ID", b))


@contextlib.asynccontextmanager
async def _pair(make_backend: Any, **config: Any) -> AsyncIterator[dict]:
    """{True: (fast client, paths Quart saw), False: (Quart client, paths Quart saw)}."""
    out: dict = {}
    async with contextlib.AsyncExitStack() as stack:
        for fast in (True, False):
            app = tep.create_app(make_backend(), fast_path=fast, **config)
            seen: list[str] = []

            async def hook(seen: list[str] = seen) -> None:
                seen.append(request.path)

            app.before_request_funcs.setdefault(None, []).insert(0, hook)  # before tep's
            test_app = await stack.enter_async_context(app.test_app())
            out[fast] = (test_app.test_client(), seen)
        yield out


async def _call(client: Any, path: str, body: Any, headers: dict | None = None
                ) -> tuple[int, list[tuple[str, str]], bytes]:
    kw: dict = {"headers": {"Content-Type": "application/json", **(headers or {})}}
    if isinstance(body, bytes):
        kw["data"] = body
    else:
        kw["json"] = body
    r = await client.post(path, **kw)
    data = await r.get_data()
    headers_out = [(k.lower(), _mask(v.encode()).decode()) for k, v in r.headers.items()]
    return r.status_code, headers_out, _mask(data)


async def _same(pair: dict, path: str, body: Any, headers: dict | None = None) -> tuple:
    fast_client, fast_seen = pair[True]
    quart_client, quart_seen = pair[False]
    n_fast, n_quart = len(fast_seen), len(quart_seen)
    got_fast = await _call(fast_client, path, body, headers)
    got_quart = await _call(quart_client, path, body, headers)
    assert got_fast == got_quart
    assert len(fast_seen) == n_fast, "the fast path did not serve this request"
    assert quart_seen[n_quart:] == [path], "the Quart route did not serve this request"
    return got_fast


def _toy() -> Any:
    pytest.importorskip("tep.kernels")
    from tep.backends.toy import ToyBackend

    return ToyBackend()


async def test_same_answers_toy_seeded():
    async with _pair(_toy) as pair:
        for path, body in [
            (CMPL, {"model": "tep-toy", "prompt": "Hello", "max_tokens": 12, "seed": 7}),
            (CMPL, {"model": "tep-toy", "prompt": ["Hi", "Hey"], "n": 2, "seed": 3,
                    "temperature": 0.7, "logprobs": 2, "echo": True, "max_tokens": 5}),
            (CHAT, {"model": "tep-toy", "messages": MSGS, "max_tokens": 16, "seed": 1,
                    "logprobs": True, "top_logprobs": 2}),
            (CHAT, {"model": "tep-toy", "messages": MSGS, "max_tokens": 9, "seed": 2,
                    "stream": True, "stream_options": {"include_usage": True}}),
            (CMPL, {"model": "tep-toy", "prompt": [1, 2, 3], "max_tokens": 9, "seed": 2,
                    "stream": True}),
            (EMB, {"model": "tep-toy", "input": [[72, 105], [1, 2, 3]], "dimensions": 8}),
            (EMB, {"model": "tep-toy", "input": "Hi", "encoding_format": "base64"}),
        ]:
            st, headers, data = await _same(pair, path, body)
            assert st == 200, data
            assert ("x-request-id", "cmpl-ID" if path == CMPL else
                    "chatcmpl-ID" if path == CHAT else "req-ID") in headers


async def test_same_errors_in_the_envelope():
    async with _pair(ScriptBackend) as pair:
        for path, body, status in [
            (CMPL, b"{nope", 400),                                       # bad JSON
            (CMPL, b"[1, 2]", 400),                                      # not an object
            (CMPL, {"model": "script", "prompt": [1], "temperature": 5}, 400),
            (CHAT, {"model": "script", "messages": []}, 400),
            (CMPL, {"model": "gpt-9", "prompt": [1]}, 404),
            (CMPL, {"model": "script", "prompt": [1]}, 500),             # backend failure
            (CMPL, {"model": "script", "prompt": [5]}, 400),             # backend's own 400
            (CMPL, {"model": "script", "prompt": [1], "suffix": "x"}, 501),
            (CHAT, {"model": "script", "stream": True,                   # fails at once
                    "messages": [{"role": "user", "content": "boom"}]}, 500),
            (CHAT, {"model": "script", "stream": True, "seed": 4,        # fails mid-stream
                    "messages": [{"role": "user", "content": "boom-later"}]}, 200),
            (EMB, {"model": "script", "input": [1], "dimensions": 99}, 400),
        ]:
            st, headers, data = await _same(pair, path, body)
            assert st == status, (path, body, data)
            if status >= 400:
                assert data.startswith(b'{"error":{"message":') and data.endswith(b"}\n")
                assert ("content-type", "application/json") in headers
        # a client's own X-Request-Id names the request (and is echoed) on both
        st, headers, _ = await _same(pair, EMB, {"model": "gpt-9", "input": [1]},
                                     {"X-Request-Id": "mine-42"})
        assert st == 404 and ("x-request-id", "mine-42") in headers


async def test_same_capability_auth_and_size_errors():
    async with _pair(tep.Backend) as pair:  # a bare backend: no chat, no embeddings
        for path in (CHAT, EMB):
            st, _, data = await _same(pair, path, {"model": "m", "messages": MSGS})
            assert st == 501 and b"not_implemented_error" in data
    async with _pair(ScriptBackend, api_keys=["k1"], max_body_bytes=2048) as pair:
        st, headers, data = await _same(pair, CHAT, {"model": "script", "messages": MSGS})
        assert st == 401 and ("www-authenticate", "Bearer") in headers
        assert b'"code":"invalid_api_key"' in data
        ok = {"Authorization": "Bearer k1"}
        st, headers, data = await _same(pair, CMPL, {"model": "script",
                                                     "prompt": [7] * 2000}, ok)
        assert st == 413 and b"request_too_large" in data
        assert ("connection", "close") in headers
        st, _, _ = await _same(pair, CMPL, {"model": "script", "prompt": [7], "seed": 1}, ok)
        assert st == 200


async def test_other_methods_and_paths_go_to_quart():
    async with _pair(ScriptBackend) as pair:
        client, seen = pair[True]
        r = await client.get(CHAT)
        assert r.status_code == 405 and r.headers["Allow"] == "POST"
        r = await client.post("/v1/chat/completions/", json={})
        assert r.status_code == 404
        assert seen == [CHAT, "/v1/chat/completions/"]


async def test_a_body_that_stalls_gets_408_in_the_envelope(monkeypatch):
    import asyncio
    import json

    from tep.server import prelude

    monkeypatch.setattr(prelude, "BODY_TIMEOUT_S", 0.2)
    app = tep.create_app(_toy())
    async with app.test_app():
        parts = [{"type": "http.request", "body": b'{"model": "tep-toy", ', "more_body": True}]
        stalled = asyncio.Event()

        async def receive() -> dict:
            if parts:
                return parts.pop(0)
            await stalled.wait()          # the rest of the body never comes
            return {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(msg: dict) -> None:
            sent.append(msg)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", b"1000")]}
        await asyncio.wait_for(app(scope, receive, send), 5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408
    err = json.loads(body)["error"]
    assert err["type"] and err["message"]
