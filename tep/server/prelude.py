"""What happens to every request before its route runs, written once for the ASGI fast
path and the Quart hooks: the request ID, the API key (``/v1`` and the text routes), and
the body limits (size: 413, time: 408)."""
from __future__ import annotations

import re

from werkzeug.exceptions import HTTPException

from tep import errors as E
from tep.obs.telemetry import RequestRecord
from tep.serving.state import ServerState
from tep.wire.routes import needs_key
from tep.wire.shapes import new_id

__all__ = ["BODY_TIMEOUT_S", "begin", "authenticate", "body_too_large", "http_error",
           "request_id"]

BODY_TIMEOUT_S = 60.0
"""Longest a request body may take to arrive (408 after), on both paths."""

# A client's X-Request-Id is echoed and logged: accept it only when it is short and
# plain, so it can neither forge log lines nor bloat every log record.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(header: str | None) -> str:
    """The request's ID: the client's ``X-Request-Id`` when it is a short plain token,
    else a new ``req-...``."""
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return new_id("req")


def authenticate(state: ServerState, authorization: str | None,
                 api_key: str | None = None) -> str:
    """The principal ID of the request's key (``Authorization: Bearer``, else
    ``x-api-key``); 401 when keys are on and it has none."""
    principal = state.keys.check(authorization)
    if principal is None and api_key is not None:
        principal = state.keys.check_key(api_key.strip())
    if principal is None:
        raise E.AuthenticationError("Missing or invalid API key: send "
                                    "'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    return principal


def begin(state: ServerState, rec: RequestRecord, path: str, rid_header: str | None,
          authorization: str | None, api_key: str | None = None) -> None:
    """Name the request and check its key (routes that need one, when keys are on)."""
    rec.request_id = request_id(rid_header)
    if state.keys.enabled and needs_key(path):
        rec.principal_id = authenticate(state, authorization, api_key)


def body_too_large(state: ServerState) -> E.PayloadTooLargeError:
    """The 413 for a body over ``max_body_bytes``."""
    return E.PayloadTooLargeError(f"The request body is larger than "
                                  f"{state.config.max_body_bytes} bytes")


def http_error(state: ServerState, err: HTTPException, method: str, path: str) -> E.APIError:
    """The OpenAI error for a werkzeug HTTP exception (no route, wrong method, body too
    large or too slow, ...)."""
    code = err.code or 500
    if code == 404:
        return E.NotFoundError(f"No route {method} {path[:200]!r}")
    if code == 405:
        return E.MethodNotAllowedError(f"Method {method} is not allowed for {path[:200]!r}")
    if code == 413:
        return body_too_large(state)
    if code < 500:
        return E.APIError(err.description or err.name, status=code,
                          type="invalid_request_error", code=None)
    return E.InternalServerError(err.description or err.name)
