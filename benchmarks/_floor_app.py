"""The floor for the server benchmark: a bare ASGI app on hypercorn, no framework.

    python benchmarks/_floor_app.py PORT

POST /v1/chat/completions parses the JSON body (like any server must), then answers with
``max_tokens`` characters of fixed text: one JSON body, or with ``"stream": true`` one
server-sent event per character (the OpenAI chunk shape) and ``data: [DONE]``.
GET /health answers 200. Served by hypercorn with the same defaults tep uses, so the gap
to tep is tep's own cost (Quart, validation, the worker-pool hop, its JSON).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

_TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. ")


async def _body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send):  # noqa: ANN001 - ASGI
    """The ASGI callable."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    req = json.loads(await _body(receive))
    n = int(req.get("max_tokens") or 16)
    created = int(time.time())
    if not req.get("stream"):
        text = (_TEXT * (n // len(_TEXT) + 1))[:n]
        body = json.dumps({
            "id": "chatcmpl-floor", "object": "chat.completion", "created": created,
            "model": req.get("model", "floor"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}},
            separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    head = ('data: {"id":"chatcmpl-floor","object":"chat.completion.chunk","created":%d,'
            '"model":"floor","choices":[{"index":0,"delta":{"content":' % created)
    for i in range(n):
        ev = head + json.dumps(_TEXT[i % len(_TEXT)]) + '},"finish_reason":null}]}\n\n'
        await send({"type": "http.response.body", "body": ev.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    cfg = Config()
    cfg.bind = [f"127.0.0.1:{int(sys.argv[1])}"]
    cfg.accesslog = None
    cfg.loglevel = "WARNING"
    asyncio.run(serve(app, cfg))


if __name__ == "__main__":
    main()
