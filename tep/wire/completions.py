"""``POST /v1/completions``: the request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tep.backend.sampling import Sampling
from tep.errors import BadRequestError, NotSupportedError
from tep.wire.fields import COMPLETION_FIELDS, F
from tep.wire.sampling import WireOptions, parse_sampling
from tep.wire.values import is_int, log_unknown, read, token_list

__all__ = ["CompletionRequest", "parse_completion_request", "parse_prompts",
           "DEFAULT_MAX_TOKENS"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class CompletionRequest:
    """A parsed ``POST /v1/completions`` body.

    Attributes:
        model: the requested model ID.
        prompts: one entry per prompt: text, or a list of token IDs.
        sampling: the knobs each choice is generated with.
        wire: ``n``, ``stream``, ``include_usage``, ``user``.
        echo: prepend the prompt to each choice's text.
        raw: the whole request body.
        structured: the request's constraint (a :class:`tep.structured.Structured`), set
            by the server; None = none.
    """

    model: str
    prompts: list[str | list[int]]
    sampling: Sampling
    wire: WireOptions
    echo: bool
    raw: dict
    structured: Any = None

    @property
    def stream(self) -> bool:
        return self.wire.stream


def parse_prompts(value: object, param: str) -> list[str | list[int]]:
    """A ``prompt`` / ``input``: a string, a list of strings, a list of token IDs or a
    list of such lists (non-empty), as a list of prompts."""
    if value is None:
        raise BadRequestError(f"'{param}' is required", param=param,
                              code="missing_required_parameter")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(is_int(t) for t in value):
            return [token_list(value, param)]
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, list) for p in value):
            return [token_list(p, param) for p in value]
    raise BadRequestError(f"'{param}' must be a list of token IDs, a list of such lists, "
                          "a string or a list of strings (non-empty)", param=param,
                          code="invalid_type")


def parse_completion_request(body: dict, request_id: str) -> CompletionRequest:
    """Validate a completions body (400 naming the offending ``param``)."""
    log_unknown(body, (f.name for f in COMPLETION_FIELDS), request_id)
    model = read(body, F.model, required=True)
    s, w = parse_sampling(body, default_max_tokens=DEFAULT_MAX_TOKENS)
    s.max_tokens = read(body, F.max_tokens, DEFAULT_MAX_TOKENS)
    echo = read(body, F.echo, False)
    s.logprobs = read(body, F.logprobs_int)
    best_of = read(body, F.best_of)
    if best_of is not None and best_of != w.n:
        raise NotSupportedError("'best_of' different from 'n' is not supported", param="best_of")
    if body.get("suffix"):
        raise NotSupportedError("'suffix' is not supported", param="suffix")
    prompts = parse_prompts(body.get("prompt"), "prompt")
    return CompletionRequest(model=model, prompts=prompts, sampling=s, wire=w, echo=echo,
                             raw=body)
