"""OpenAI-style API errors.

Every failure the server reports is one of these, rendered as the nested OpenAI envelope
``{"error": {"message", "type", "param", "code"}}`` with the class's HTTP status. A backend
may raise them too (e.g. ``BadRequestError("prompt is longer than the context", param="prompt")``)
and the client sees that status instead of a 500.
"""
from __future__ import annotations

__all__ = [
    "APIError",
    "BadRequestError",
    "NotFoundError",
    "MethodNotAllowedError",
    "PayloadTooLargeError",
    "InternalServerError",
    "NotSupportedError",
    "AuthenticationError",
    "RateLimitError",
    "ServiceUnavailableError",
    "error_body",
]


class APIError(Exception):
    """Base class: an error with an HTTP ``status`` and the OpenAI envelope fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict:
        """The JSON body: ``{"error": {...}}``."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class BadRequestError(APIError):
    """400: malformed JSON, wrong types, out-of-range values. ``param`` names the field."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class NotFoundError(APIError):
    """404: unknown model or route."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(APIError):
    """405: the route exists but not for this method."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class InternalServerError(APIError):
    """500: the backend failed. The message never carries a traceback."""

    status = 500
    type = "server_error"
    code = "internal_error"


class NotSupportedError(APIError):
    """501: the backend does not offer this capability (chat, embeddings, a parameter)."""

    status = 501
    type = "not_implemented_error"
    code = "not_implemented"


class AuthenticationError(APIError):
    """401: missing or unknown API key (the openai client raises ``AuthenticationError``)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RateLimitError(APIError):
    """429: every backend thread is busy and the wait queue is full. The response carries
    ``Retry-After: <retry_after>`` (seconds); the openai client retries after that long."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServiceUnavailableError(APIError):
    """503: the server is shutting down and no longer takes this request (a request
    still waiting for a backend slot when the graceful shutdown ran out of time, or one
    that arrived after the shutdown began)."""

    status = 503
    type = "server_error"
    code = "shutting_down"


def error_body(message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error envelope as a dict."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
