"""Reading one field of a request body, by its :class:`~tep.wire.fields.Field` entry.

Every rejection is a :class:`~tep.errors.BadRequestError` naming its ``param``. Numbers
are checked in the precision they are used in: a float knob must stay inside its range
after rounding to float32 (the kernels' type), so ``top_p = 1e-300`` is refused rather
than reaching the sampler as 0.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable

import numpy as np

from tep.errors import BadRequestError
from tep.wire.fields import Field

__all__ = ["read", "token_list", "is_int", "is_num", "parse_json_body", "log_unknown",
           "safe_for_log"]

log = logging.getLogger("tep.wire")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _snippet(v: Any) -> str:
    try:
        return json.dumps(v)[:40]
    except (TypeError, ValueError, RecursionError):
        return type(v).__name__


def read(body: dict, f: Field, default: Any = None, *, required: bool = False) -> Any:
    """The value of field ``f`` in ``body`` (``default`` when absent or null), checked
    against the field's type and range."""
    v = body.get(f.name)
    if v is None:
        if required:
            raise BadRequestError(f"'{f.name}' is required", param=f.name,
                                  code="missing_required_parameter")
        return default
    name = f.name
    if f.kind == "integer":
        if not is_int(v):
            raise BadRequestError(f"'{name}' must be an integer, got {_snippet(v)}",
                                  param=name, code="invalid_type")
        if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
            raise BadRequestError(f"'{name}' must be in [{_fmt(f.lo)}, "
                                  f"{_fmt(f.hi) if f.hi is not None else 'inf'}], got {v}",
                                  param=name)
        return v
    if f.kind == "number":
        if not is_num(v):
            raise BadRequestError(f"'{name}' must be a finite number, got {_snippet(v)}",
                                  param=name, code="invalid_type")
        v = float(v)
        v32 = float(np.float32(v))  # what the kernels see
        if f.lo is not None and (v < f.lo or v32 < f.lo or (f.lo_open and v32 <= f.lo)):
            raise BadRequestError(f"'{name}' must be {'>' if f.lo_open else '>='} {_fmt(f.lo)}"
                                  f" (as a float32), got {v!r}", param=name)
        if f.hi is not None and (v > f.hi or v32 > f.hi):
            raise BadRequestError(f"'{name}' must be <= {_fmt(f.hi)}, got {v!r}", param=name)
        return v
    if f.kind == "boolean":
        if not isinstance(v, bool):
            raise BadRequestError(f"'{name}' must be a boolean", param=name,
                                  code="invalid_type")
        return v
    if f.kind == "string":
        if not isinstance(v, str):
            raise BadRequestError(f"'{name}' must be a string", param=name, code="invalid_type")
        if f.enum is not None and v not in f.enum:
            raise BadRequestError(f"'{name}' must be one of {', '.join(map(repr, f.enum))}",
                                  param=name)
        return v
    raise TypeError(f"field {name!r} of kind {f.kind!r} has its own parser")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-inf"
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**70 else str(x)


def token_list(v: Any, name: str) -> list[int]:
    """A list of non-negative integer token IDs (400 otherwise)."""
    if not isinstance(v, list) or not all(is_int(t) and t >= 0 for t in v):
        raise BadRequestError(f"'{name}' must be a list of non-negative integer token IDs",
                              param=name, code="invalid_type")
    return v


def parse_json_body(data: bytes) -> dict:
    """Decode a request body; anything but a JSON object is a 400 (including nesting
    too deep for the decoder)."""
    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"The request body is not valid JSON: {e}",
                              code="invalid_json") from None
    except RecursionError:
        raise BadRequestError("The request body is nested too deeply",
                              code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object", code="invalid_json")
    return body


def safe_for_log(s: str, limit: int = 64) -> str:
    """Client-controlled text made safe for a log line: non-printable characters
    escaped (no forged lines), cut to ``limit`` characters."""
    r = repr(s[:limit])[1:-1]
    return r + ("..." if len(s) > limit else "")


def log_unknown(body: dict, known: Iterable[str], request_id: str) -> None:
    """Log the body's field names tep does not know (they are ignored)."""
    known = set(known)
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        shown = ", ".join(safe_for_log(k) for k in unknown[:16])
        more = f" (+{len(unknown) - 16} more)" if len(unknown) > 16 else ""
        log.info("request %s: ignoring unknown field(s) %s%s", request_id, shown, more)
