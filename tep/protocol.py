"""Request parsing and validation, and the response/chunk shapes of the OpenAI API.

Completions and chat share one sampling-parameter model (:class:`Sampling`) and one set of
helpers; only the choice/chunk shapes differ. Parsing is hand-written (no schema library)
so that every rejection is a :class:`~tep.errors.BadRequestError` naming its ``param``.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from tep.errors import BadRequestError, NotSupportedError

__all__ = [
    "Sampling",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "parse_json_body",
    "parse_completion_request",
    "parse_chat_request",
    "parse_embedding_request",
    "MAX_LOGPROBS",
]

log = logging.getLogger("tep.protocol")

MAX_LOGPROBS = 20
SEED_MODULUS = 2**64
_MAX_N = 128
_MAX_STOP = 16

_COMMON_SAMPLING_FIELDS = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop",
    "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "top_k", "min_p", "logit_bias", "user", "allowed_token_ids",
}
COMPLETION_FIELDS = _COMMON_SAMPLING_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
# Chat fields tep does not interpret itself are still "known": they reach the backend
# through ChatRequest.raw, so they are not logged as unknown.
CHAT_FIELDS = _COMMON_SAMPLING_FIELDS | {
    "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
    "parallel_tool_calls", "response_format", "metadata", "store", "service_tier",
    "reasoning_effort", "modalities", "audio", "prediction", "functions", "function_call",
    "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


# --------------------------------------------------------------------------- value checks

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _int(body: dict, name: str, default: Any, *, lo: int | None = None,
         hi: int | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise BadRequestError(f"'{name}' must be an integer, got {json.dumps(v)[:40]}",
                              param=name, code="invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequestError(f"'{name}' must be in [{lo}, {hi if hi is not None else 'inf'}], "
                              f"got {v}", param=name)
    return v


def _float(body: dict, name: str, default: float, *, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise BadRequestError(f"'{name}' must be a finite number, got {json.dumps(v)[:40]}",
                              param=name, code="invalid_type")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise BadRequestError(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}",
                              param=name)
    if hi is not None and v > hi:
        raise BadRequestError(f"'{name}' must be <= {hi}, got {v}", param=name)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequestError(f"'{name}' must be a boolean", param=name, code="invalid_type")
    return v


def _str(body: dict, name: str, *, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequestError(f"'{name}' is required", param=name, code="missing_required_parameter")
        return None
    if not isinstance(v, str):
        raise BadRequestError(f"'{name}' must be a string", param=name, code="invalid_type")
    return v


def _token_list(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise BadRequestError(f"'{name}' must be a list of non-negative integer token IDs",
                              param=name, code="invalid_type")
    return v


# --------------------------------------------------------------------------- Sampling

@dataclass
class Sampling:
    """Every sampling knob of a completions or chat request, parsed and validated.

    A backend reads these and passes them to :func:`tep.kernels.sample`; the server itself
    enforces ``max_tokens``, ``stop`` and ``stop_token_ids`` on what the backend emits.

    Attributes:
        max_tokens: most tokens to generate (completions default 16; chat default is the
            server's ``chat_max_tokens``).
        temperature: 0 means greedy. Range [0, 2].
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 or -1 is off.
        min_p: keep tokens with p >= min_p * p_max; 0 is off.
        presence_penalty, frequency_penalty: in [-2, 2], over output tokens.
        repetition_penalty: > 0; 1 is off. Over prompt and output tokens.
        logit_bias: {token_id: bias}, bias in [-100, 100].
        allowed_token_ids: restrict sampling to these IDs (None = all).
        n: choices per prompt. Choice ``j`` is generated with ``seed + j`` (mod 2**64).
        stop: stop strings; the text ends before the first one and is not included.
        stop_token_ids: token IDs that end generation (not included in the text).
        seed: None for fresh entropy, else an int in [0, 2**64) (negative request seeds
            are taken mod 2**64). A backend uses ``step = index of the generated token``.
        logprobs: None when not requested; otherwise how many top alternatives (0..20)
            to report per token.
        echo: completions only: prepend the prompt to the text.
        user: the OpenAI ``user`` string, unused by tep.
        include_usage: ``stream_options.include_usage``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    user: str | None = None
    include_usage: bool = False

    def for_choice(self, j: int) -> "Sampling":
        """The Sampling used for choice ``j`` of a prompt: the seed shifted by ``j``."""
        if j == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=(self.seed + j) % SEED_MODULUS)


def _parse_sampling(body: dict, *, default_max_tokens: int, stream: bool) -> Sampling:
    s = Sampling(max_tokens=default_max_tokens)
    s.temperature = _float(body, "temperature", 1.0, lo=0.0, hi=2.0)
    s.top_p = _float(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True)
    s.top_k = _int(body, "top_k", 0, lo=-1)
    s.min_p = _float(body, "min_p", 0.0, lo=0.0, hi=1.0)
    s.presence_penalty = _float(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0)
    s.frequency_penalty = _float(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0)
    s.repetition_penalty = _float(body, "repetition_penalty", 1.0, lo=0.0, hi=100.0, lo_open=True)
    s.n = _int(body, "n", 1, lo=1, hi=_MAX_N)
    seed = _int(body, "seed", None, lo=-(2**63), hi=SEED_MODULUS - 1)
    s.seed = None if seed is None else seed % SEED_MODULUS
    s.user = _str(body, "user")

    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise BadRequestError("'logit_bias' must be an object mapping token IDs to biases",
                                  param="logit_bias", code="invalid_type")
        out: dict[int, float] = {}
        for k, v in lb.items():
            try:
                tid = int(k)
            except ValueError:
                raise BadRequestError(f"'logit_bias' key {k!r} is not a token ID",
                                      param="logit_bias") from None
            if tid < 0:
                raise BadRequestError(f"'logit_bias' key {k!r} is negative", param="logit_bias")
            if not _is_num(v) or not -100 <= v <= 100:
                raise BadRequestError(f"'logit_bias' value for {k!r} must be a number in "
                                      "[-100, 100]", param="logit_bias")
            out[tid] = float(v)
        s.logit_bias = out or None

    atl = body.get("allowed_token_ids")
    if atl is not None:
        s.allowed_token_ids = _token_list(atl, "allowed_token_ids")
        if not s.allowed_token_ids:
            raise BadRequestError("'allowed_token_ids' must not be empty", param="allowed_token_ids")

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)
                or len(stop) > _MAX_STOP):
            raise BadRequestError(f"'stop' must be a string or a list of at most {_MAX_STOP} "
                                  "strings", param="stop", code="invalid_type")
        s.stop = [x for x in stop if x]
    sti = body.get("stop_token_ids")
    if sti is not None:
        s.stop_token_ids = _token_list(sti, "stop_token_ids")

    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise BadRequestError("'stream_options' must be an object", param="stream_options",
                                  code="invalid_type")
        if not stream:
            raise BadRequestError("'stream_options' is only allowed when 'stream' is true",
                                  param="stream_options")
        s.include_usage = _bool(so, "include_usage", False)
    return s


# --------------------------------------------------------------------------- requests

def parse_json_body(data: bytes) -> dict:
    """Decode a request body; anything but a JSON object is a 400."""
    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"The request body is not valid JSON: {e}",
                              code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object", code="invalid_json")
    return body


def _log_unknown(body: dict, known: set[str], request_id: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        log.info("request %s: ignoring unknown field(s) %s", request_id, ", ".join(unknown))


@dataclass
class CompletionRequest:
    """A parsed ``POST /v1/completions`` body. ``prompts`` holds text or token-ID lists."""

    model: str
    prompts: list[str | list[int]]
    sampling: Sampling
    stream: bool
    raw: dict


def parse_completion_request(body: dict, request_id: str) -> CompletionRequest:
    """Validate a completions body (400 naming the offending ``param``)."""
    _log_unknown(body, COMPLETION_FIELDS, request_id)
    model = _str(body, "model", required=True)
    stream = _bool(body, "stream", False)
    s = _parse_sampling(body, default_max_tokens=16, stream=stream)
    s.max_tokens = _int(body, "max_tokens", 16, lo=0)
    s.echo = _bool(body, "echo", False)
    s.logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    best_of = _int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != s.n:
        raise NotSupportedError("'best_of' different from 'n' is not supported", param="best_of")
    if body.get("suffix"):
        raise NotSupportedError("'suffix' is not supported", param="suffix")

    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if prompt is None:
        raise BadRequestError("'prompt' is required", param="prompt",
                              code="missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [_token_list(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_list(p, "prompt") for p in prompt]
    else:
        raise BadRequestError("'prompt' must be a list of token IDs, a list of such lists, "
                              "a string or a list of strings (non-empty)", param="prompt",
                              code="invalid_type")
    return CompletionRequest(model=model, prompts=prompts, sampling=s, stream=stream, raw=body)


@dataclass
class ChatRequest:
    """A parsed ``POST /v1/chat/completions`` body, handed to the backend.

    The backend applies its own chat template to ``messages`` (a list of dicts with at
    least ``role``; ``content`` a string, a list of content parts, or None). Fields tep does
    not interpret (tools, response_format, ...) are in ``raw``.

    Attributes:
        model: the requested model ID (one of ``list_models()``).
        messages: the conversation, as sent.
        sampling: parsed knobs; ``sampling.logprobs`` is ``top_logprobs`` when
            ``logprobs`` is true, else None.
        stream: whether the client asked for SSE.
        raw: the whole request body.
        request_id: the ``chatcmpl-...`` ID of this request.
        choice_index: which of the ``n`` choices this call produces.
    """

    model: str
    messages: list[dict]
    sampling: Sampling
    stream: bool = False
    raw: dict = field(default_factory=dict)
    request_id: str = ""
    choice_index: int = 0

    def for_choice(self, j: int) -> "ChatRequest":
        """A copy for choice ``j`` (seed shifted by ``j``)."""
        return dataclasses.replace(self, sampling=self.sampling.for_choice(j), choice_index=j)


def parse_chat_request(body: dict, request_id: str, *, default_max_tokens: int) -> ChatRequest:
    """Validate a chat body (400 naming the offending ``param``)."""
    _log_unknown(body, CHAT_FIELDS, request_id)
    model = _str(body, "model", required=True)
    stream = _bool(body, "stream", False)
    s = _parse_sampling(body, default_max_tokens=default_max_tokens, stream=stream)
    mt = _int(body, "max_completion_tokens", None, lo=0)
    if mt is None:
        mt = _int(body, "max_tokens", None, lo=0)
    if mt is not None:
        s.max_tokens = mt
    want_lp = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want_lp:
        raise BadRequestError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    s.logprobs = (top or 0) if want_lp else None

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list", param="messages",
                              code="invalid_type" if messages is not None else "missing_required_parameter")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequestError(f"'messages[{i}]' must be an object with a string 'role'",
                                  param=f"messages[{i}]", code="invalid_type")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise BadRequestError(f"'messages[{i}].content' must be a string, a list of "
                                  "content parts or null", param=f"messages[{i}].content",
                                  code="invalid_type")
    return ChatRequest(model=model, messages=messages, sampling=s, stream=stream, raw=body,
                       request_id=request_id)


@dataclass
class EmbeddingRequest:
    """A parsed ``POST /v1/embeddings`` body."""

    model: str
    inputs: list[str | list[int]]
    encoding_format: str
    dimensions: int | None
    raw: dict


def parse_embedding_request(body: dict, request_id: str) -> EmbeddingRequest:
    """Validate an embeddings body (400 naming the offending ``param``)."""
    _log_unknown(body, EMBEDDING_FIELDS, request_id)
    model = _str(body, "model", required=True)
    fmt = _str(body, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequestError("'encoding_format' must be 'float' or 'base64'",
                              param="encoding_format")
    dims = _int(body, "dimensions", None, lo=1)
    _str(body, "user")
    inp = body.get("input")
    if isinstance(inp, str):
        inputs: list[str | list[int]] = [inp]
    elif isinstance(inp, list) and inp and all(_is_int(t) for t in inp):
        inputs = [_token_list(inp, "input")]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        inputs = list(inp)
    elif isinstance(inp, list) and inp and all(isinstance(x, list) for x in inp):
        inputs = [_token_list(x, "input") for x in inp]
    elif inp is None:
        raise BadRequestError("'input' is required", param="input",
                              code="missing_required_parameter")
    else:
        raise BadRequestError("'input' must be a list of token IDs, a list of such lists, "
                              "a string or a list of strings (non-empty)", param="input",
                              code="invalid_type")
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=fmt, dimensions=dims,
                            raw=body)


# --------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    """``prefix-<32 hex>``, e.g. ``cmpl-...``, ``chatcmpl-...``. Unique, not secret: the
    ids name requests in logs, so a fast non-cryptographic generator does (uuid4 reads
    the OS entropy pool on every call)."""
    return f"{prefix}-{_ids.getrandbits(128):032x}"


_ids = random.Random()


def now() -> int:
    """Unix time in seconds, the ``created`` field."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finite_logprob(x: float | None) -> float | None:
    """JSON has no -inf; OpenAI reports impossible tokens as -9999.0."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(entries: Iterable, start_offset: int) -> dict:
    """Completions-shape logprobs for a run of tokens.

    ``entries`` are :class:`tep.backend.TokenLogprob`; an entry's ``text_offset`` is
    relative to its part of the text (prompt echo or generation), which starts at
    ``start_offset`` characters into the choice's text.
    """
    tokens: list[str] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    off = start_offset
    for e in entries:
        tokens.append(e.token)
        lps.append(finite_logprob(e.logprob))
        tops.append(None if e.top is None else
                    {t: finite_logprob(lp) for t, lp in e.top})
        if e.text_offset is not None:
            off = start_offset + e.text_offset
        offsets.append(off)
        off += len(e.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Iterable) -> dict:
    """Chat-shape logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for e in entries:
        b = e.bytes if e.bytes is not None else e.token.encode("utf-8")
        content.append({
            "token": e.token,
            "logprob": finite_logprob(e.logprob) if e.logprob is not None else -9999.0,
            "bytes": list(b),
            "top_logprobs": [{"token": t, "logprob": finite_logprob(lp),
                              "bytes": list(t.encode("utf-8"))} for t, lp in (e.top or [])],
        })
    return {"content": content, "refusal": None}


def embedding_item(vec: Any, index: int, encoding_format: str) -> dict:
    """One ``data`` item of an embeddings response; ``vec`` float32 [D]."""
    import numpy as np

    v = np.asarray(vec, dtype=np.float32)
    if encoding_format == "base64":
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    else:
        emb = v.tolist()
    return {"object": "embedding", "index": index, "embedding": emb}
