"""``POST /v1/chat/completions``: the request."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tep.backend.sampling import Sampling
from tep.errors import BadRequestError
from tep.wire.fields import CHAT_FIELDS, CHAT_PASSTHROUGH, F
from tep.wire.sampling import WireOptions, parse_sampling
from tep.wire.values import log_unknown, read

__all__ = ["ChatRequest", "parse_chat_request", "text_message"]


@dataclass
class ChatRequest:
    """A parsed ``POST /v1/chat/completions`` body, handed to the backend.

    The backend applies its own chat template to ``messages`` (a list of dicts with at
    least ``role``; ``content`` a string, a list of content parts, or None). Fields tep does
    not interpret itself are in ``raw``.

    Attributes:
        model: the requested model ID (one of ``list_models()``).
        messages: the conversation, as sent.
        sampling: parsed knobs; ``sampling.logprobs`` is ``top_logprobs`` when
            ``logprobs`` is true, else None.
        wire: ``n``, ``stream``, ``include_usage``, ``user``.
        raw: the whole request body.
        request_id: the ``chatcmpl-...`` ID of this request.
        choice_index: which of the ``n`` choices this call produces.
        structured: the request's constraint and tools (a
            :class:`tep.structured.Structured`), set by the server; None = neither.
    """

    model: str
    messages: list[dict]
    sampling: Sampling
    wire: WireOptions = field(default_factory=WireOptions)
    raw: dict = field(default_factory=dict)
    request_id: str = ""
    choice_index: int = 0
    structured: Any = None

    @property
    def stream(self) -> bool:
        """Whether the client asked for server-sent events."""
        return self.wire.stream

    def for_choice(self, j: int) -> "ChatRequest":
        """A copy for choice ``j`` (seed shifted by ``j``)."""
        return dataclasses.replace(self, sampling=self.sampling.for_choice(j), choice_index=j)


def parse_chat_request(body: dict, request_id: str, *, default_max_tokens: int) -> ChatRequest:
    """Validate a chat body (400 naming the offending ``param``)."""
    log_unknown(body, [*(f.name for f in CHAT_FIELDS), *CHAT_PASSTHROUGH], request_id)
    model = read(body, F.model, required=True)
    s, w = parse_sampling(body, default_max_tokens=default_max_tokens)
    mt = read(body, F.max_completion_tokens)
    if mt is None:
        mt = read(body, F.max_tokens)
    if mt is not None:
        s.max_tokens = mt
    want_lp = read(body, F.logprobs_bool, False)
    top = read(body, F.top_logprobs)
    if top is not None and not want_lp:
        raise BadRequestError("'top_logprobs' requires 'logprobs' to be true",
                              param="top_logprobs")
    s.logprobs = (top or 0) if want_lp else None

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list", param="messages",
                              code="invalid_type" if messages is not None
                              else "missing_required_parameter")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequestError(f"'messages[{i}]' must be an object with a string 'role'",
                                  param=f"messages[{i}]", code="invalid_type")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise BadRequestError(f"'messages[{i}].content' must be a string, a list of "
                                  "content parts or null", param=f"messages[{i}].content",
                                  code="invalid_type")
    return ChatRequest(model=model, messages=messages, sampling=s, wire=w, raw=body,
                       request_id=request_id)


def text_message(i: int, m: dict, who: str = "this model") -> dict:
    """Message ``i`` with a content list of text parts joined into one string (chat
    templates expect strings); any other part type is a 400 naming ``who``."""
    c = m.get("content")
    if not isinstance(c, list):
        return m
    parts = []
    for part in c:
        if not isinstance(part, dict) or part.get("type") != "text" or \
                not isinstance(part.get("text"), str):
            raise BadRequestError(f"{who} only takes text content parts",
                                  param=f"messages[{i}].content")
        parts.append(part["text"])
    return {**m, "content": "".join(parts)}
