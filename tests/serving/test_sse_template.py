"""The per-token SSE template renders the same bytes as sse(dict)."""
from __future__ import annotations

import pytest

from tep.serving.sse import sse, sse_text_template


def _chunk(model: str):
    return lambda j, text: {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                            "created": 1700000000, "model": model,
                            "choices": [{"index": j, "delta": {"content": text},
                                         "logprobs": None, "finish_reason": None}]}


@pytest.mark.parametrize("text", ["a", "", " ", 'quote " and \\ backslash', "new\nline\t",
                                  "\x00\x1f control", "é ü 中文 😀", "\u2028\u2029",
                                  "\u2063tep-text\u2063"])
@pytest.mark.parametrize("index", [0, 7, 123])
def test_template_bytes_equal_sse_of_the_dict(index, text):
    make = _chunk("tep-toy")
    render = sse_text_template(make)
    assert render is not None
    assert render(index, text) == sse(make(index, text))


def test_marker_lookalike_fields_fall_back_to_dicts():
    assert sse_text_template(_chunk("918273645")) is None
    assert sse_text_template(_chunk("\u2063tep-text\u2063")) is None
