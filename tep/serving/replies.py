"""What a route answers, independent of the web layer that sends it.

The inference routes (:mod:`tep.serving.routes`) return a :class:`Reply` (a whole body) or a
:class:`StreamReply` (server-sent events); the Quart app and the ASGI fast path
(:mod:`tep.server.fastpath`) turn them into their own responses, so both send the same status,
headers and bytes. Every error becomes the OpenAI envelope (Anthropic's on the Messages routes) through
:func:`error_reply`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tep import errors as E

__all__ = ["Reply", "StreamReply", "json_bytes", "json_reply", "error_reply", "error_body",
           "unexpected_reply", "JSON", "EVENT_STREAM"]

log = logging.getLogger("tep.server")

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass
class Reply:
    """A complete response.

    Attributes:
        status: HTTP status.
        body: the body bytes.
        headers: headers besides Content-Type/Content-Length/X-Request-Id, in order.
        content_type: the Content-Type.
    """

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON


@dataclass
class StreamReply:
    """A 200 ``text/event-stream`` response whose body is ``chunks`` (SSE bytes).

    Whoever sends it must ``aclose()`` ``chunks`` when done or when the client leaves:
    its ``finally`` gives the request's slot back and closes its record."""

    chunks: AsyncIterator[bytes]
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Cache-Control",
                                                                     "no-cache")])
    status: int = 200
    content_type: str = EVENT_STREAM


def json_bytes(obj: Any) -> bytes:
    """Compact JSON (ASCII, insertion order) and a newline: Quart's ``jsonify`` bytes."""
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def json_reply(obj: Any, status: int = 200) -> Reply:
    """``obj`` as a JSON reply."""
    return Reply(status, json_bytes(obj))


def error_reply(err: E.APIError, request_id: str | None, style: str = "openai") -> Reply:
    """The error envelope of ``err`` (OpenAI's, or Anthropic's for ``style ==
    "anthropic"``: :func:`tep.wire.messages.anthropic_error_body`), with the headers its
    status calls for (``Retry-After`` on 429, ``WWW-Authenticate`` on 401,
    ``x-should-retry: false`` on 501 so the clients do not retry a capability the server
    lacks). Server errors are logged."""
    if err.status >= 500:
        log.warning("request %s: %d %s", request_id or "?", err.status, err.message)
    headers = []
    if isinstance(err, E.RateLimitError):
        headers.append(("Retry-After", str(err.retry_after)))
    elif isinstance(err, E.AuthenticationError):
        headers.append(("WWW-Authenticate", "Bearer"))
    elif err.status == 501:
        headers.append(("x-should-retry", "false"))
    return Reply(err.status, json_bytes(error_body(err, request_id, style)), headers)


def error_body(err: E.APIError, request_id: str | None, style: str = "openai") -> dict:
    """The JSON body of ``err`` in the envelope ``style`` names."""
    if style == "anthropic":
        from tep.wire.messages import anthropic_error_body

        return anthropic_error_body(err, request_id)
    return err.body()


def unexpected_reply(exc: BaseException, request_id: str | None,
                     style: str = "openai") -> Reply:
    """A 500 envelope for an exception no handler expected; the traceback goes to the
    log only."""
    log.error("request %s: unhandled error", request_id or "?", exc_info=exc)
    err = E.InternalServerError(f"Internal error while handling request {request_id or '?'}")
    return Reply(500, json_bytes(error_body(err, request_id, style)))
