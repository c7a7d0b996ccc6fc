"""The sampling fields shared by completions and chat, parsed into a
:class:`tep.backend.Sampling` plus the wire-only options (:class:`WireOptions`)."""
from __future__ import annotations

from dataclasses import dataclass

from tep.backend.sampling import SEED_MODULUS, Sampling
from tep.errors import BadRequestError
from tep.wire.fields import LOGIT_BIAS_MAX, MAX_STOP, F
from tep.wire.values import is_num, read, token_list

__all__ = ["WireOptions", "parse_sampling"]


@dataclass
class WireOptions:
    """How the answer is shaped on the wire; the engine never sees these.

    Attributes:
        n: choices per prompt (choice ``j`` samples with ``seed + j``).
        stream: server-sent events instead of one JSON body.
        include_usage: ``stream_options.include_usage``: a final usage chunk.
        user: the OpenAI ``user`` string (recorded, unused).
    """

    n: int = 1
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def parse_sampling(body: dict, *, default_max_tokens: int) -> tuple[Sampling, WireOptions]:
    """The knobs and wire options common to completions and chat (400 naming the field)."""
    w = WireOptions(stream=read(body, F.stream, False), n=read(body, F.n, 1),
                    user=read(body, F.user))
    s = Sampling(max_tokens=default_max_tokens)
    s.temperature = read(body, F.temperature, 1.0)
    s.top_p = read(body, F.top_p, 1.0)
    s.top_k = read(body, F.top_k, 0)
    s.min_p = read(body, F.min_p, 0.0)
    s.presence_penalty = read(body, F.presence_penalty, 0.0)
    s.frequency_penalty = read(body, F.frequency_penalty, 0.0)
    s.repetition_penalty = read(body, F.repetition_penalty, 1.0)
    s.num_speculative_tokens = read(body, F.num_speculative_tokens)
    seed = read(body, F.seed)
    s.seed = None if seed is None else seed % SEED_MODULUS

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
                raise BadRequestError(f"'logit_bias' key {k[:20]!r} is not a token ID",
                                      param="logit_bias") from None
            if tid < 0:
                raise BadRequestError(f"'logit_bias' key {k[:20]!r} is negative",
                                      param="logit_bias")
            if not is_num(v) or not -LOGIT_BIAS_MAX <= v <= LOGIT_BIAS_MAX:
                raise BadRequestError(f"'logit_bias' value for {k[:20]!r} must be a number in "
                                      f"[-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]",
                                      param="logit_bias")
            out[tid] = float(v)
        s.logit_bias = out or None

    atl = body.get("allowed_token_ids")
    if atl is not None:
        s.allowed_token_ids = token_list(atl, "allowed_token_ids")
        if not s.allowed_token_ids:
            raise BadRequestError("'allowed_token_ids' must not be empty",
                                  param="allowed_token_ids")

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)
                or len(stop) > MAX_STOP):
            raise BadRequestError(f"'stop' must be a string or a list of at most {MAX_STOP} "
                                  "strings", param="stop", code="invalid_type")
        s.stop = [x for x in stop if x]
    sti = body.get("stop_token_ids")
    if sti is not None:
        s.stop_token_ids = token_list(sti, "stop_token_ids")

    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise BadRequestError("'stream_options' must be an object", param="stream_options",
                                  code="invalid_type")
        if not w.stream:
            raise BadRequestError("'stream_options' is only allowed when 'stream' is true",
                                  param="stream_options")
        w.include_usage = read(so, F.stream_options_include_usage, False)
    return s, w
