"""The inference routes' handlers, by path (the paths come from :mod:`tep.wire.routes`).

Each handler is ``async def handler(state, rec, read_body) -> Reply | StreamReply``:
``rec`` is the request's :class:`~tep.obs.telemetry.RequestRecord` (its ``request_id``
set by the prelude; completions and chat replace it with their response ID),
``read_body()`` returns the raw body (raising 413 past the limit). A handler raises
:class:`tep.errors.APIError` for every refusal. The Quart routes and the ASGI fast path
(:mod:`tep.server`) both call these.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from tep.obs.telemetry import RequestRecord
from tep.serving.chat import chat
from tep.serving.completions import completions
from tep.serving.embeddings import embeddings
from tep.serving.messages import count_tokens, messages
from tep.serving.replies import Reply, StreamReply
from tep.serving.responses import responses
from tep.serving.state import ServerState
from tep.serving.tokenize import apply_template, detokenize, tokenize
from tep.wire.routes import INFERENCE_PATHS

__all__ = ["Handler", "HANDLERS"]

Handler = Callable[[ServerState, RequestRecord, Callable[[], Awaitable[bytes]]],
                   Awaitable["Reply | StreamReply"]]

HANDLERS: dict[str, Handler] = {"/v1/completions": completions,
                                "/v1/chat/completions": chat,
                                "/v1/embeddings": embeddings,
                                "/v1/messages": messages,
                                "/v1/messages/count_tokens": count_tokens,
                                "/tokenize": tokenize,
                                "/detokenize": detokenize,
                                "/apply-template": apply_template,
                                "/v1/responses": responses}
"""Inference path -> handler (all ``POST``)."""

assert set(HANDLERS) == INFERENCE_PATHS, "every inference route needs a handler"
