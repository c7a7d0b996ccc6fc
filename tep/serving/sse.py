"""Server-sent events: one ``data:`` line per event, and a byte template for the
per-token chunk that every stream sends most."""
from __future__ import annotations

import json
from typing import Any, Callable

__all__ = ["sse", "sse_event", "sse_text_template", "DONE"]


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or the literal ``[DONE]``)."""
    if isinstance(obj, str):
        return f"data: {obj}\n\n".encode()
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """One named server-sent event: ``event: <name>\ndata: <json>\n\n`` (the Responses
    and Messages APIs name every event; OpenAI's chat streams do not)."""
    return (f"event: {name}\ndata: ".encode()
            + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n")


_INDEX_MARK, _TEXT_MARK = 918273645, "\u2063tep-text\u2063"
_encode_str = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) gives


def sse_text_template(make: Callable[[int, str], Any], event: str | None = None
                      ) -> Callable[[int, str], bytes] | None:
    """A fast ``lambda index, text: sse(make(index, text))`` for per-token chunks
    (``sse_event(event, ...)`` when ``event`` is given; the integer may be any number
    in the payload, e.g. a Responses ``sequence_number``).

    Renders ``make`` once with marker values and splits the bytes around them, so each
    token costs two joins and one string encode instead of a dict and a JSON encode; the
    bytes are the same. None when the markers do not appear exactly once (say, a model
    named like a marker): the caller then keeps rendering dicts."""
    obj = make(_INDEX_MARK, _TEXT_MARK)
    b = sse(obj) if event is None else sse_event(event, obj)
    idx, txt = str(_INDEX_MARK).encode(), _encode_str(_TEXT_MARK).encode()
    if b.count(idx) != 1 or b.count(txt) != 1 or b.index(idx) > b.index(txt):
        return None
    pre, rest = b.split(idx)
    mid, post = rest.split(txt)

    def render(index: int, text: str) -> bytes:
        return b"".join((pre, str(index).encode(), mid, _encode_str(text).encode(), post))

    return render


DONE = sse("[DONE]")
