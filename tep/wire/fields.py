"""The request field table: every field tep reads, its type, range and default, once.

Parsing (:mod:`tep.wire.values` and the per-endpoint modules) and the OpenAPI document
(:mod:`tep.wire.openapi`) are both built from these entries, so a limit is written in
one place. Fields with a structure of their own (``prompt``, ``messages``, ``stop``, ...)
carry their JSON Schema here and are checked by their endpoint's parser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tep.kernels.sampling import MAX_LOGPROBS
from tep.kernels.speculative import MAX_DRAFT_TOKENS

__all__ = ["Field", "F", "MAX_LOGPROBS", "MAX_N", "MAX_STOP", "MAX_TOP_K", "SEED_MIN",
           "SEED_MAX", "COMPLETION_FIELDS", "CHAT_FIELDS", "EMBEDDING_FIELDS",
           "CHAT_PASSTHROUGH", "CONSTRAINT_FIELDS", "TOOL_FIELDS", "schema_of"]

MAX_N = 128                  # choices per prompt
MAX_STOP = 16                # stop strings per request
MAX_TOP_K = 2**31 - 1        # beyond the largest vocabulary: "keep all" (the kernel's int32)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
LOGIT_BIAS_MAX = 100.0
# Below this a repetition penalty divides a large positive logit past float32's range.
REPETITION_PENALTY_MIN = 0.01


@dataclass(frozen=True)
class Field:
    """One request field.

    Attributes:
        name: the JSON key.
        kind: "integer", "number", "boolean", "string" or "object" (structured: see
            ``schema``).
        lo, hi: inclusive bounds (None = unbounded); ``lo_open`` makes ``lo`` exclusive.
        schema: the JSON Schema of a structured field (``kind == "object"``).
        enum: the allowed values of a string field.
    """

    name: str
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    schema: dict | None = None
    enum: tuple[str, ...] | None = None


_TOKEN = {"type": "integer", "minimum": 0}
_TOKENS = {"type": "array", "items": _TOKEN, "minItems": 1}
_TOKENS_LIST = {"type": "array", "items": _TOKENS, "minItems": 1}
_STRS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_PROMPT_SCHEMA = {"oneOf": [{"type": "string"}, _STRS, _TOKENS, _TOKENS_LIST]}


class F:
    """The fields, by name (``F.temperature`` ...)."""

    model = Field("model", "string")
    stream = Field("stream", "boolean")
    max_tokens = Field("max_tokens", "integer", lo=0)
    max_completion_tokens = Field("max_completion_tokens", "integer", lo=0)
    temperature = Field("temperature", "number", lo=0.0, hi=2.0)
    top_p = Field("top_p", "number", lo=0.0, hi=1.0, lo_open=True)
    top_k = Field("top_k", "integer", lo=-1, hi=MAX_TOP_K)
    min_p = Field("min_p", "number", lo=0.0, hi=1.0)
    presence_penalty = Field("presence_penalty", "number", lo=-2.0, hi=2.0)
    frequency_penalty = Field("frequency_penalty", "number", lo=-2.0, hi=2.0)
    repetition_penalty = Field("repetition_penalty", "number", lo=REPETITION_PENALTY_MIN,
                               hi=100.0)
    n = Field("n", "integer", lo=1, hi=MAX_N)
    num_speculative_tokens = Field("num_speculative_tokens", "integer", lo=0,
                                   hi=MAX_DRAFT_TOKENS)
    seed = Field("seed", "integer", lo=SEED_MIN, hi=SEED_MAX)
    user = Field("user", "string")
    echo = Field("echo", "boolean")
    logprobs_int = Field("logprobs", "integer", lo=0, hi=MAX_LOGPROBS)
    logprobs_bool = Field("logprobs", "boolean")
    top_logprobs = Field("top_logprobs", "integer", lo=0, hi=MAX_LOGPROBS)
    best_of = Field("best_of", "integer", lo=1)
    suffix = Field("suffix", "string")
    dimensions = Field("dimensions", "integer", lo=1)
    encoding_format = Field("encoding_format", "string", enum=("float", "base64"))
    stream_options = Field("stream_options", "object", schema={
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}}})
    stream_options_include_usage = Field("include_usage", "boolean")
    stop = Field("stop", "object", schema={"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        {"type": "null"}]})
    stop_token_ids = Field("stop_token_ids", "object",
                           schema={"type": ["array", "null"], "items": _TOKEN})
    logit_bias = Field("logit_bias", "object", schema={
        "type": ["object", "null"],
        "patternProperties": {"^[0-9]+$": {"type": "number", "minimum": -LOGIT_BIAS_MAX,
                                           "maximum": LOGIT_BIAS_MAX}},
        "additionalProperties": False})
    allowed_token_ids = Field("allowed_token_ids", "object",
                              schema={"type": ["array", "null"], "items": _TOKEN,
                                      "minItems": 1})
    prompt = Field("prompt", "object", schema=_PROMPT_SCHEMA)
    input = Field("input", "object", schema=_PROMPT_SCHEMA)
    messages = Field("messages", "object", schema={
        "type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"], "properties": {
                "role": {"type": "string"},
                "content": {"oneOf": [{"type": "string"},
                                      {"type": "array", "items": {"type": "object"}},
                                      {"type": "null"}]},
                "name": {"type": "string"}}}})
    # Structured outputs (tep.structured checks them in depth; docs/STRUCTURED.md).
    response_format = Field("response_format", "object", schema={
        "type": ["object", "null"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object"}}})
    guided_json = Field("guided_json", "object",
                        schema={"type": ["object", "boolean", "string", "null"]})
    guided_regex = Field("guided_regex", "string")
    guided_grammar = Field("guided_grammar", "string")
    guided_choice = Field("guided_choice", "object", schema={
        "type": ["array", "null"], "items": {"type": "string"}, "minItems": 1})
    tools = Field("tools", "object", schema={
        "type": ["array", "null"], "items": {"type": "object"}, "minItems": 1})
    tool_choice = Field("tool_choice", "object", schema={"oneOf": [
        {"enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}]})
    parallel_tool_calls = Field("parallel_tool_calls", "boolean")


# The fields that carry a constraint (at most one per request; both endpoints) and the
# tool fields (chat only).
CONSTRAINT_FIELDS: tuple[Field, ...] = (F.response_format, F.guided_json, F.guided_regex,
                                        F.guided_grammar, F.guided_choice)
TOOL_FIELDS: tuple[Field, ...] = (F.tools, F.tool_choice, F.parallel_tool_calls)

_SAMPLING = (F.model, F.stream, F.stream_options, F.max_tokens, F.temperature, F.top_p,
             F.n, F.stop, F.stop_token_ids, F.seed, F.presence_penalty, F.frequency_penalty,
             F.repetition_penalty, F.top_k, F.min_p, F.logit_bias, F.user,
             F.allowed_token_ids, F.num_speculative_tokens)
COMPLETION_FIELDS: tuple[Field, ...] = _SAMPLING + (F.prompt, F.echo, F.logprobs_int,
                                                    F.best_of, F.suffix) + CONSTRAINT_FIELDS
CHAT_FIELDS: tuple[Field, ...] = _SAMPLING + (F.messages, F.logprobs_bool, F.top_logprobs,
                                              F.max_completion_tokens) + CONSTRAINT_FIELDS \
    + TOOL_FIELDS
EMBEDDING_FIELDS: tuple[Field, ...] = (F.model, F.input, F.encoding_format, F.dimensions,
                                       F.user)
# Chat fields tep does not read itself but a backend may (through ChatRequest.raw): known,
# so they are not logged as unknown.
CHAT_PASSTHROUGH = frozenset({
    "metadata", "store",
    "service_tier", "reasoning_effort", "modalities", "audio", "prediction", "functions",
    "function_call", "web_search_options", "verbosity", "prompt_cache_key",
    "safety_identifier"})


def schema_of(f: Field) -> dict[str, Any]:
    """The JSON Schema of a field (nullable, as the OpenAI API accepts null for unset)."""
    if f.schema is not None:
        return f.schema
    s: dict[str, Any] = {"type": [f.kind, "null"]}
    if f.enum is not None:
        s["enum"] = [*f.enum, None]
    if f.lo is not None:
        s["exclusiveMinimum" if f.lo_open else "minimum"] = f.lo
    if f.hi is not None:
        s["maximum"] = f.hi
    return s
