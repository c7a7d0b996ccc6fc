"""An ASGI layer in front of Quart that answers ``POST`` on the inference routes itself.

Quart builds request and response objects, contexts, and runs hooks and two tasks per
request; for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` that is
most of the server's time when the model is fast. :class:`FastPath` calls the same route
functions (:mod:`tep.serving.routes`) straight from ASGI and sends their
:class:`~tep.serving.replies.Reply` itself, doing what the Quart hooks do for these routes:

- ``X-Request-Id``: taken from the request or made up, echoed on every answer;
- API keys (``Authorization: Bearer`` or ``x-api-key``; 401 + ``WWW-Authenticate``);
- the body: read with the ``max_body_bytes`` limit (413 with ``Connection: close``) and
  Quart's 60 s body timeout (408); a body left unread by an early answer is read before
  answering, so the keep-alive connection stays usable;
- every error in the route's envelope (:func:`~tep.serving.replies.error_reply`);
- a client that disconnects cancels the request (its backend job sees the cancel flag,
  a queued request leaves the queue), as Quart's receiver task does.

Everything else (other paths and methods, a mounted app with a ``root_path``) goes to
the wrapped Quart app unchanged. The telemetry middleware wraps this layer, so metrics
and events are recorded the same way for both.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from werkzeug.exceptions import RequestTimeout

from tep import errors as E
from tep.obs.telemetry import SCOPE_KEY, RequestRecord
from tep.server import prelude
from tep.server.prelude import begin, body_too_large, http_error
from tep.serving.replies import Reply, StreamReply, error_reply, unexpected_reply
from tep.serving.routes import Handler
from tep.serving.state import ServerState
from tep.wire.routes import endpoint_label, error_style

__all__ = ["FastPath"]



class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class _Body:
    """The request body from ASGI ``receive``, read once, within the size limit."""

    __slots__ = ("receive", "limit", "declared", "read_done", "on_complete")

    def __init__(self, receive: Callable, limit: int, declared: int | None,
                 on_complete: Callable[[], None]) -> None:
        self.receive = receive
        self.limit = limit
        self.declared = declared
        self.read_done = False
        self.on_complete = on_complete

    async def read(self, state: ServerState) -> bytes:
        """The whole body; raises 413 past the limit (without reading further), 408
        when it takes longer than ``prelude.BODY_TIMEOUT_S``, :class:`_ClientGone`."""
        self.read_done = True
        if self.declared is not None and self.declared > self.limit:
            raise body_too_large(state)
        msg = await self.receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        body = msg.get("body", b"")
        if msg.get("more_body"):
            body = await self._rest(state, body)
        elif len(body) > self.limit:
            raise body_too_large(state)
        self.on_complete()
        return body

    async def _rest(self, state: ServerState, first: bytes) -> bytes:
        # hypercorn always ends a body with a separate empty message, usually already
        # queued: a plain await per message, and one timer (not wait_for, which makes a
        # task per call) for the body timeout
        parts, size = [first], len(first)
        task = asyncio.current_task()
        expired = []
        timer = asyncio.get_running_loop().call_later(
            prelude.BODY_TIMEOUT_S, lambda: (expired.append(True), task.cancel()))  # type: ignore[union-attr]
        try:
            while True:
                msg = await self.receive()
                if msg["type"] == "http.disconnect":
                    raise _ClientGone()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    raise body_too_large(state)
                parts.append(chunk)
                if not msg.get("more_body"):
                    return b"".join(parts)
        except asyncio.CancelledError:
            if not expired:
                raise
            if hasattr(task, "uncancel"):
                task.uncancel()  # type: ignore[union-attr]
            raise http_error(state, RequestTimeout(), "POST", "") from None
        finally:
            timer.cancel()


class FastPath:
    """ASGI app: ``POST`` to a path in ``routes`` is served here, the rest by ``app``.

    Args:
        state: the app's shared state (backend, config, keys, ...).
        routes: path -> route function (:data:`tep.serving.routes.HANDLERS`).
        app: the ASGI app for everything else (Quart's ``asgi_app``).
    """

    def __init__(self, state: ServerState, routes: dict[str, Handler], app: Any) -> None:
        self.state = state
        self.routes = routes
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        await self._serve(route, scope, receive, send)

    async def _serve(self, route: Handler, scope: dict, receive: Callable,
                     send: Callable) -> None:
        state = self.state
        rec = scope.get(SCOPE_KEY)
        if rec is None:  # served without the telemetry middleware
            rec = RequestRecord(endpoint_label(scope["path"]))
        rid = auth = api_key = length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = rid or value.decode("latin1")
            elif name == b"authorization":
                auth = auth or value.decode("latin1")
            elif name == b"x-api-key":
                api_key = api_key or value.decode("latin1")
            elif name == b"content-length" and length is None:
                try:
                    length = int(value)
                except ValueError:
                    pass

        task = asyncio.current_task()
        gone = False
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            # after the body, the next message is the disconnect (if the client leaves)
            while (await receive())["type"] != "http.disconnect":
                pass
            nonlocal gone
            gone = True
            task.cancel()

        def body_complete() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(watch())

        body = _Body(receive, state.config.max_body_bytes, length, body_complete)

        async def read_body() -> bytes:
            return await body.read(state)

        try:
            try:
                begin(state, rec, scope["path"], rid, auth, api_key)
                reply: Reply | StreamReply = await route(state, rec, read_body)
            except E.APIError as err:
                reply = error_reply(err, rec.request_id, error_style(scope["path"]))
            except (_ClientGone, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a 500 envelope
                reply = unexpected_reply(exc, rec.request_id, error_style(scope["path"]))
            close = False
            if not body.read_done:
                # an early answer: read the body first so keep-alive stays usable
                try:
                    await body.read(state)
                except _ClientGone:
                    raise
                except Exception:  # too large or too slow: do not reuse the connection
                    close = True
            elif reply.status in (408, 413):  # the rest of the body was never read
                close = True
            await self._send(reply, rec.request_id or "", close, send)
        except _ClientGone:
            return
        except asyncio.CancelledError:
            if not gone:
                raise
            # the client left and the watcher cancelled us: the request is over
            if hasattr(task, "uncancel"):
                task.uncancel()
        finally:
            if watcher is not None:
                watcher.cancel()

    @staticmethod
    async def _send(reply: Reply | StreamReply, rid: str, close: bool, send: Callable
                    ) -> None:
        headers = [(b"content-type", reply.content_type.encode())]
        if isinstance(reply, Reply):
            headers.append((b"content-length", str(len(reply.body)).encode()))
        for k, v in reply.headers:
            headers.append((k.lower().encode("latin1"), v.encode("latin1")))
        headers.append((b"x-request-id", rid.encode("latin1")))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": headers})
        if isinstance(reply, Reply):
            await send({"type": "http.response.body", "body": reply.body})
            return
        chunks = reply.chunks
        try:
            async for data in chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # releases the request
