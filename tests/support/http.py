"""Helpers for the Quart test-client tests."""
from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

import tep


@contextlib.asynccontextmanager
async def client_for(backend: Any, **config: Any) -> AsyncIterator[Any]:
    """A Quart test client for ``create_app(backend, **config)``, with startup/shutdown."""
    app = tep.create_app(backend, **config)
    async with app.test_app() as test_app:
        yield test_app.test_client()


def sse_events(body: bytes) -> list[Any]:
    """Parse an SSE body into a list of payloads (dicts, or the string "[DONE]")."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return out


async def post_json(client: Any, path: str, body: Any) -> tuple[int, Any]:
    r = await client.post(path, json=body)
    return r.status_code, await r.get_json()


async def post_stream(client: Any, path: str, body: dict) -> tuple[int, list[Any], Any]:
    r = await client.post(path, json={**body, "stream": True})
    data = await r.get_data()
    if r.status_code != 200:
        return r.status_code, [json.loads(data)], r
    assert r.headers["Content-Type"].startswith("text/event-stream")
    return r.status_code, sse_events(data), r


def check_stream_rules(events: list[Any], n_choices: int, *, chat: bool,
                       include_usage: bool) -> None:
    """The stream rules of docs/WIRE.md: same id/created/model, role once first (chat), one finish per
    choice, usage chunk only when asked (and usage null elsewhere), one [DONE] last."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert chunks
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    obj = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == obj for c in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-" if chat else "cmpl-")
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] >= 0
        assert all(c["usage"] is None for c in chunks[:-1])
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c or c["usage"] is None for c in chunks)
    finishes = {}
    for c in chunks:
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        if ch["finish_reason"] is not None:
            assert ch["index"] not in finishes
            assert ch["finish_reason"] in ("stop", "length")
            finishes[ch["index"]] = ch["finish_reason"]
        else:
            assert ch["index"] not in finishes, "chunk after the finish chunk"
    assert sorted(finishes) == list(range(n_choices))
    if chat:
        for i in range(n_choices):
            mine = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == i]
            assert mine[0].get("role") == "assistant"
            assert all("role" not in d for d in mine[1:])


def stream_text(events: list[Any], *, chat: bool) -> dict[int, str]:
    """Concatenated text per choice index."""
    out: dict[int, str] = {}
    for c in events:
        if c == "[DONE]" or not c["choices"]:
            continue
        ch = c["choices"][0]
        piece = (ch["delta"].get("content") or "") if chat else ch["text"]
        out[ch["index"]] = out.get(ch["index"], "") + piece
    return out
