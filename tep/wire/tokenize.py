"""``POST /tokenize``, ``/detokenize`` and ``/apply-template``: request parsing and
answer shapes, in the spellings of llama-server and vLLM.

Shapes::

    /tokenize        {model?, content | prompt: str, add_special? | add_special_tokens?,
                      with_pieces?}  or  {model?, messages: [...], tools?, tool_choice?,
                      with_pieces?}
                  -> {tokens: [id] | [{id, piece}], count, max_model_len}
    /detokenize      {model?, tokens: [id]}  -> {content, prompt}   (the same text twice:
                                                llama-server reads content, vLLM prompt)
    /apply-template  {model?, messages: [...], tools?, tool_choice?} -> {prompt}

A piece is the token's text, or the list of its byte values when they are not valid
UTF-8 on their own (part of a character), as llama-server spells it. ``messages`` are
rendered exactly as a chat request would be (template, generation prompt, tools) and
tokenized as chat tokenizes them, so ``count`` is the chat request's ``prompt_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tep.errors import BadRequestError
from tep.wire.values import is_int, log_unknown

__all__ = ["TokenizeRequest", "parse_tokenize_request", "parse_detokenize_request",
           "template_model", "chat_body", "piece", "tokenize_answer", "MAX_DETOKENIZE_TOKENS"]

MAX_DETOKENIZE_TOKENS = 1 << 20
"""Most token IDs one ``/detokenize`` request may carry."""

_TOKENIZE_FIELDS = ("model", "content", "prompt", "messages", "tools", "tool_choice",
                    "parallel_tool_calls", "add_special", "add_special_tokens",
                    "with_pieces", "add_generation_prompt")
_TEMPLATE_FIELDS = ("model", "messages", "tools", "tool_choice", "parallel_tool_calls",
                    "add_generation_prompt")


@dataclass
class TokenizeRequest:
    """A parsed ``/tokenize`` body: ``text`` or ``messages`` (exactly one is set).

    Attributes:
        model: the model named, or None for the backend's first.
        text: the text to tokenize.
        messages: a chat-shaped body (``messages``, ``tools`` ...) to render and tokenize.
        add_special: add the model's special tokens (BOS); None = the backend's default
            (what a text prompt in ``/v1/completions`` gets).
        with_pieces: answer ``{id, piece}`` objects instead of bare IDs.
    """

    model: str | None
    text: str | None = None
    messages: dict | None = None
    add_special: bool | None = None
    with_pieces: bool = False


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise BadRequestError(f"'{name}' must be a boolean", param=name, code="invalid_type")
    return v


def _model(body: dict) -> str | None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise BadRequestError("'model' must be a string", param="model", code="invalid_type")
    return m


def chat_body(body: dict) -> dict:
    """The chat-shaped part of a ``messages`` body (validated further by the chat path).
    ``add_generation_prompt: false`` is refused: chat always adds it."""
    if body.get("messages") is None:
        raise BadRequestError("'messages' is required", param="messages",
                              code="missing_required_parameter")
    if _bool(body, "add_generation_prompt") is False:
        raise BadRequestError("'add_generation_prompt' false is not supported: tep renders "
                              "chat prompts as chat requests do, with the generation prompt",
                              param="add_generation_prompt", code="unsupported_value")
    return {k: body[k] for k in ("messages", "tools", "tool_choice", "parallel_tool_calls")
            if body.get(k) is not None}


def parse_tokenize_request(body: dict, request_id: str) -> TokenizeRequest:
    """Validate a ``/tokenize`` body (400 naming the field)."""
    log_unknown(body, _TOKENIZE_FIELDS, request_id)
    model = _model(body)
    a, b = _bool(body, "add_special"), _bool(body, "add_special_tokens")
    if a is not None and b is not None and a != b:
        raise BadRequestError("'add_special' and 'add_special_tokens' disagree",
                              param="add_special_tokens")
    add = a if a is not None else b
    pieces = bool(_bool(body, "with_pieces"))
    given = [k for k in ("content", "prompt", "messages") if body.get(k) is not None]
    if len(given) != 1:
        raise BadRequestError("give exactly one of 'content', 'prompt' (text) or 'messages'"
                              + (f"; got {' and '.join(given)}" if given else ""),
                              param=given[1] if len(given) > 1 else "content",
                              code="missing_required_parameter" if not given else
                              "invalid_value")
    if given[0] == "messages":
        if add is not None:
            raise BadRequestError("'add_special' applies to text; a chat prompt is tokenized "
                                  "as chat requests are", param="add_special")
        return TokenizeRequest(model, messages=chat_body(body), with_pieces=pieces)
    text = body[given[0]]
    if not isinstance(text, str):
        raise BadRequestError(f"'{given[0]}' must be a string", param=given[0],
                              code="invalid_type")
    return TokenizeRequest(model, text=text, add_special=add, with_pieces=pieces)


def parse_detokenize_request(body: dict, request_id: str) -> tuple[str | None, list[int]]:
    """Validate a ``/detokenize`` body: ``(model, token IDs)``."""
    log_unknown(body, ("model", "tokens"), request_id)
    model = _model(body)
    toks = body.get("tokens")
    if not isinstance(toks, list):
        raise BadRequestError("'tokens' must be a list of token IDs", param="tokens",
                              code="missing_required_parameter" if toks is None
                              else "invalid_type")
    if len(toks) > MAX_DETOKENIZE_TOKENS:
        raise BadRequestError(f"'tokens' holds more than {MAX_DETOKENIZE_TOKENS} IDs",
                              param="tokens")
    for i, t in enumerate(toks):
        if not is_int(t) or t < 0:
            raise BadRequestError(f"'tokens[{i}]' must be a non-negative integer",
                                  param=f"tokens[{i}]", code="invalid_type")
    return model, toks


def template_model(body: dict, request_id: str) -> str | None:
    """Validate an ``/apply-template`` body's own fields; the model named, or None."""
    log_unknown(body, _TEMPLATE_FIELDS, request_id)
    return _model(body)


def piece(b: bytes) -> str | list[int]:
    """A token's piece: its text, or its byte values when not valid UTF-8 alone."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return list(b)


def tokenize_answer(ids: list[int], pieces: list[bytes] | None,
                    max_model_len: int | None) -> dict:
    """The ``/tokenize`` answer."""
    toks: list[Any] = ids if pieces is None else [
        {"id": t, "piece": piece(p)} for t, p in zip(ids, pieces)]
    return {"tokens": toks, "count": len(ids), "max_model_len": max_model_len}
