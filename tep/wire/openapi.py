"""The OpenAPI 3.1 document of tep's endpoints, served at ``/openapi.json``.

The request schemas come from the field table (:mod:`tep.wire.fields`) that the parsers
read, so a range or a limit is written once.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from tep.wire.fields import (CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS, Field,
                             schema_of)
from tep.wire.responses import request_schema as responses_request_schema

__all__ = ["openapi_document"]


def _props(fields: tuple[Field, ...]) -> dict[str, Any]:
    return {f.name: schema_of(f) for f in fields}


def _error_responses(*codes: int) -> dict[str, Any]:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    text = {400: "Invalid request", 401: "Missing or invalid API key",
            404: "Unknown model", 413: "Body too large",
            429: "Every backend slot busy and the wait queue full (see Retry-After)",
            500: "Backend failure",
            501: "Capability not supported by the backend (or metrics off)"}
    return {str(c): {"description": text[c], **ref} for c in codes}


def _post(summary: str, schema: str, *codes: int, error: str = "Error") -> dict[str, Any]:
    errors = _error_responses(*codes)
    for v in errors.values():
        v["content"]["application/json"]["schema"] = {"$ref": f"#/components/schemas/{error}"}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {
            "200": {"description": "OK (JSON, or text/event-stream when stream is true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **errors},
    }}


def _messages_schemas() -> dict[str, Any]:
    """The Messages API and text-route request bodies (checked in depth by their parsers,
    :mod:`tep.wire.messages` and :mod:`tep.wire.tokenize`)."""
    # content: a string or a list of blocks ({type: text|tool_use|tool_result, ...});
    # kept shallow here so the document stays cheap to fuzz
    text_or_blocks = {"type": ["string", "array"], "items": {"type": "object"}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["user", "assistant"]}, "content": text_or_blocks}}
    chat_message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"}, "content": {"type": ["string", "array", "null"]}}}
    common = {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": message, "minItems": 1},
        "system": text_or_blocks,
        "tools": {"type": "array", "items": {
            "type": "object", "required": ["name", "input_schema"], "properties": {
                "name": {"type": "string"}, "description": {"type": "string"},
                "input_schema": {"type": "object"}}}},
        "tool_choice": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
            "disable_parallel_tool_use": {"type": "boolean"}}},
        "output_config": {"type": "object"},
    }
    return {
        "MessagesRequest": {"type": "object", "required": ["model", "max_tokens", "messages"],
                            "properties": {
            **common, "max_tokens": {"type": "integer", "minimum": 1},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": -1},
            "stream": {"type": "boolean"}, "seed": {"type": "integer"},
            "metadata": {"type": "object"}}},
        "CountTokensRequest": {"type": "object", "required": ["model", "messages"],
                               "properties": common},
        "TokenizeRequest": {"type": "object", "properties": {
            "model": {"type": "string"}, "content": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": chat_message},
            "add_special": {"type": "boolean"}, "add_special_tokens": {"type": "boolean"},
            "with_pieces": {"type": "boolean"}}},
        "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}},
        "ApplyTemplateRequest": {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": chat_message, "minItems": 1},
            "tools": {"type": "array"}}},
        "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
            "type": {"const": "error"}, "request_id": {"type": "string"},
            "error": {"type": "object", "required": ["type", "message"], "properties": {
                "type": {"type": "string"}, "message": {"type": "string"}}}}},
    }


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document as a dict (cached)."""
    from tep import __version__

    completion = {"type": "object", "required": ["model", "prompt"],
                  "properties": _props(COMPLETION_FIELDS)}
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": _props(CHAT_FIELDS)}
    embedding = {"type": "object", "required": ["model", "input"],
                 "properties": _props(EMBEDDING_FIELDS)}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    model_card = {"type": "object", "required": ["id", "object"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"},
        "created": {"type": "integer"}, "owned_by": {"type": "string"},
        "context_length": {"type": ["integer", "null"]},
        "max_model_len": {"type": ["integer", "null"]}}}
    json_ok = lambda ref: {"description": "OK", "content": {"application/json": {  # noqa: E731
        "schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    rid = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    list_params = [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                    "maximum": 100}},
        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
        {"name": "after", "in": "query", "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "tep", "version": __version__,
                 "description": "An OpenAI-compatible API (and Anthropic's Messages API) "
                                "served by tep."},
        "paths": {
            "/": {"get": {"summary": "The chat page (HTML; absent with --no-ui)",
                          "responses": {"200": {"description": "OK", "content": {
                              "text/html": {"schema": {"type": "string"}}}},
                              "404": {**_error_responses(404)["404"],
                                      "description": "The page is off (--no-ui)"}}}},
            "/health": {"get": {"summary": "Liveness", "responses": {
                "200": {"description": "OK", "content": {"application/json": {
                    "schema": {"type": "object"}}}}}}},
            "/v1/models": {"get": {"summary": "List models", "responses": {
                "200": json_ok("ModelList"), **_error_responses(401)}}},
            "/v1/models/{model_id}": {"get": {
                "summary": "Retrieve a model",
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": json_ok("Model"), **_error_responses(401, 404)}}},
            "/v1/completions": _post("Create a completion", "CompletionRequest",
                                     400, 401, 404, 413, 429, 500, 501),
            "/v1/chat/completions": _post("Create a chat completion", "ChatCompletionRequest",
                                          400, 401, 404, 413, 429, 500, 501),
            "/v1/embeddings": _post("Create embeddings", "EmbeddingRequest",
                                    400, 401, 404, 413, 429, 500, 501),
            "/v1/messages": _post("Create a message (Anthropic's Messages API)",
                                  "MessagesRequest", 400, 401, 404, 413, 429, 500, 501,
                                  error="AnthropicError"),
            "/v1/messages/count_tokens": _post(
                "Count a message's prompt tokens", "CountTokensRequest",
                400, 401, 404, 413, 429, 500, 501, error="AnthropicError"),
            "/tokenize": _post("Text or chat messages to token IDs", "TokenizeRequest",
                               400, 401, 404, 413, 429, 500, 501),
            "/detokenize": _post("Token IDs to text", "DetokenizeRequest",
                                 400, 401, 404, 413, 429, 500, 501),
            "/apply-template": _post("The rendered chat prompt", "ApplyTemplateRequest",
                                     400, 401, 404, 413, 429, 500, 501),
            "/v1/responses": _post("Create a response (OpenAI Responses API)",
                                   "ResponseRequest", 400, 401, 404, 413, 429, 500, 501),
            "/v1/responses/{response_id}": {
                "get": {"summary": "Retrieve a stored response", "parameters": [rid],
                        "responses": {"200": json_ok("Response"), **_error_responses(401, 404)}},
                "delete": {"summary": "Delete a stored response", "parameters": [rid],
                           "responses": {"200": json_ok("Deleted"),
                                         **_error_responses(401, 404)}}},
            "/v1/responses/{response_id}/input_items": {"get": {
                "summary": "List a stored response's input items",
                "parameters": [rid, *list_params],
                "responses": {"200": json_ok("ItemList"), **_error_responses(400, 401, 404)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_error_responses(501)}}},
        },
        "components": {"schemas": {
            "CompletionRequest": completion, "ChatCompletionRequest": chat,
            "EmbeddingRequest": embedding, "Error": error, "Model": model_card,
            **_messages_schemas(),
            "ResponseRequest": responses_request_schema(),
            "Response": {"type": "object", "required": ["id", "object", "status", "output"],
                         "properties": {"id": {"type": "string"},
                                        "object": {"const": "response"},
                                        "status": {"type": "string"},
                                        "output": {"type": "array"}}},
            "Deleted": {"type": "object", "properties": {
                "id": {"type": "string"}, "object": {"const": "response.deleted"},
                "deleted": {"type": "boolean"}}},
            "ItemList": {"type": "object", "properties": {
                "object": {"const": "list"}, "data": {"type": "array"},
                "first_id": {"type": ["string", "null"]},
                "last_id": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}},
            "ModelList": {"type": "object", "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
        }},
    }
