"""``POST /tokenize``, ``/detokenize`` and ``/apply-template`` (llama-server's and vLLM's
text routes; shapes in :mod:`tep.wire.tokenize`).

Each takes an admission slot and runs the backend's tokenizer or chat template in the
worker pool, like every other route that computes. A chat prompt (``messages``) goes
through the chat request parser and :meth:`tep.Backend.apply_chat_template`, so it is the
prompt a chat request with the same messages and tools would generate from.
"""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from tep import errors as E
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving.replies import Reply, json_reply
from tep.serving.state import ServerState
from tep.wire.tokenize import (chat_body, parse_detokenize_request, parse_tokenize_request,
                               template_model, tokenize_answer)
from tep.wire.values import parse_json_body

__all__ = ["tokenize", "detokenize", "apply_template", "default_model", "run_text_job",
           "chat_prompt_ids"]


def default_model(state: ServerState, name: str | None) -> str:
    """The model a text route works with: the one named (404 when unknown), else the
    backend's first."""
    if name is not None:
        C.check_model(state, name)
        return name
    models = state.backend.list_models()
    if not models:
        raise E.NotFoundError("This server serves no model", param="model",
                              code="model_not_found")
    return models[0]


async def run_text_job(state: ServerState, rec: RequestRecord, what: str,
                       fn: Callable[[], Any]) -> Any:
    """``fn()`` in the worker pool under an admission slot (429 when the queue is full)."""
    cancel = await C.admit(state, rec)
    try:
        return await C.call(state, rec.request_id, cancel, what, fn)
    finally:
        C.release(state, cancel)


def _takes(fn: Any, name: str) -> bool:
    """Whether a backend method has the optional parameter ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _need(ok: bool, what: str, code: str) -> None:
    if not ok:
        raise E.NotSupportedError(f"This backend has no {what}", code=code)


def chat_prompt_ids(backend: Any, req: Any) -> list[int]:
    """The token IDs of a chat request's prompt: its rendered template, tokenized as
    the chat path tokenizes it (in the worker pool)."""
    return [int(t) for t in backend.tokenize(req.model, backend.apply_chat_template(req))]


async def prepare_template_request(state: ServerState, rec: RequestRecord, body: dict,
                             model: str) -> Any:
    """A chat request for rendering only (``messages``, ``tools`` ... of ``body``)."""
    from tep.serving.chat import prepare_chat

    _need(state.backend.supports_chat() and state.backend.supports_chat_template(),
          "chat template", "chat_template_not_supported")
    return await prepare_chat(state, rec, {**chat_body(body), "model": model}, rec.request_id or "")


async def tokenize(state: ServerState, rec: RequestRecord,
                   read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /tokenize``."""
    body = parse_json_body(await read_body())
    req = parse_tokenize_request(body, rec.request_id or "")
    backend = state.backend
    model = rec.model = default_model(state, req.model)
    _need(backend.supports_tokenize(), "tokenizer", "tokenize_not_supported")
    if req.with_pieces:
        _need(backend.supports_detokenize(), "detokenizer (for pieces)",
              "detokenize_not_supported")
    if req.messages is not None:
        chat = await prepare_template_request(state, rec, req.messages, model)
        ids_of: Callable[[], list[int]] = lambda: chat_prompt_ids(backend, chat)  # noqa: E731
    elif req.add_special is None:
        ids_of = lambda: backend.tokenize(model, req.text)  # noqa: E731
    else:
        if not _takes(backend.tokenize, "add_special"):
            raise E.BadRequestError("this backend's tokenizer takes no 'add_special'",
                                    param="add_special", code="unsupported_parameter")
        ids_of = lambda: backend.tokenize(model, req.text,  # noqa: E731
                                          add_special=req.add_special)

    def job() -> tuple[list[int], list[bytes] | None]:
        ids = [int(t) for t in ids_of()]
        return ids, (list(backend.token_bytes(model, ids)) if req.with_pieces else None)

    ids, pieces = await run_text_job(state, rec, "tokenize", job)
    rec.prompt_tokens = len(ids)
    return json_reply(tokenize_answer(ids, pieces, backend.context_size(model)))


async def detokenize(state: ServerState, rec: RequestRecord,
                     read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /detokenize``."""
    body = parse_json_body(await read_body())
    name, ids = parse_detokenize_request(body, rec.request_id or "")
    backend = state.backend
    model = rec.model = default_model(state, name)
    _need(backend.supports_detokenize(), "detokenizer", "detokenize_not_supported")
    # special tokens spelled out where the backend can (text with <|im_start|> round-trips)
    kw = {"special": True} if _takes(backend.detokenize, "special") else {}
    try:
        text = await run_text_job(state, rec, "detokenize",
                                  lambda: backend.detokenize(model, ids, **kw))
    except E.BadRequestError as e:  # e.g. an ID outside the vocabulary
        raise E.BadRequestError(e.message, param="tokens", code=e.code) from None
    return json_reply({"content": text, "prompt": text})


async def apply_template(state: ServerState, rec: RequestRecord,
                         read_body: Callable[[], Awaitable[bytes]]) -> Reply:
    """``POST /apply-template``."""
    body = parse_json_body(await read_body())
    model = rec.model = default_model(state, template_model(body, rec.request_id or ""))
    chat = await prepare_template_request(state, rec, body, model)
    text = await run_text_job(state, rec, "apply-template",
                              lambda: state.backend.apply_chat_template(chat))
    return json_reply({"prompt": text})
