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


def _post(summary: str, schema: str, *codes: int) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {
            "200": {"description": "OK (JSON, or text/event-stream when stream is true)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_error_responses(*codes)},
    }}


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
        "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
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
                 "description": "An OpenAI-compatible API served by tep."},
        "paths": {
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
