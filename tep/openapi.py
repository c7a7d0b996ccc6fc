"""The OpenAPI 3.1 document of tep's endpoints, served at ``/openapi.json``.

Hand-written rather than generated, because requests are validated by hand in
:mod:`tep.protocol` (so that every 400 names its ``param``); keep the two in step.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["openapi_document"]

_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TOKENS_LIST = {"type": "array", "items": _TOKENS, "minItems": 1}
_STRS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_NUM = {"type": "number"}


def _sampling_props() -> dict[str, Any]:
    return {
        "model": {"type": "string"},
        "stream": {"type": ["boolean", "null"], "default": False},
        "stream_options": {"type": ["object", "null"],
                           "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        "max_tokens": {"type": ["integer", "null"], "minimum": 0},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": -1},
        "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 128},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                           {"type": "null"}]},
        "stop_token_ids": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}},
        "seed": {"type": ["integer", "null"], "minimum": -(2**63), "maximum": 2**64 - 1},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": ["number", "null"], "exclusiveMinimum": 0,
                               "maximum": 100},
        "logit_bias": {"type": ["object", "null"],
                       "patternProperties": {"^[0-9]+$": {"type": "number", "minimum": -100,
                                                          "maximum": 100}},
                       "additionalProperties": False},
        "allowed_token_ids": {"type": ["array", "null"],
                              "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "user": {"type": ["string", "null"]},
    }


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

    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        **_sampling_props(),
        "prompt": {"oneOf": [{"type": "string"}, _STRS, _TOKENS, _TOKENS_LIST]},
        "echo": {"type": ["boolean", "null"]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "best_of": {"type": ["integer", "null"], "minimum": 1},
        "suffix": {"type": ["string", "null"]},
    }}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}},
                              {"type": "null"}]},
        "name": {"type": "string"},
    }}
    chat = {"type": "object", "required": ["model", "messages"], "properties": {
        **_sampling_props(),
        "messages": {"type": "array", "items": message, "minItems": 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 0},
    }}
    embedding = {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, _STRS, _TOKENS, _TOKENS_LIST]},
        "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None]},
        "dimensions": {"type": ["integer", "null"], "minimum": 1},
        "user": {"type": ["string", "null"]},
    }}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    model_card = {"type": "object", "required": ["id", "object"], "properties": {
        "id": {"type": "string"}, "object": {"const": "model"},
        "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
    json_ok = lambda ref: {"description": "OK", "content": {"application/json": {  # noqa: E731
        "schema": {"$ref": f"#/components/schemas/{ref}"}}}}
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
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_error_responses(501)}}},
        },
        "components": {"schemas": {
            "CompletionRequest": completion, "ChatCompletionRequest": chat,
            "EmbeddingRequest": embedding, "Error": error, "Model": model_card,
            "ModelList": {"type": "object", "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
        }},
    }
