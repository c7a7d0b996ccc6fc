"""tep.wire.responses without a server: the output builder gives the same items however
the text is cut into pieces (what makes a stream equal its non-streamed answer), its
events rebuild those items, chat errors are renamed to Responses' fields, and the route
labels."""
from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tep.errors import BadRequestError
from tep.wire.responses import (OutputBuilder, ResponsesRequest, chat_body,
                                parse_responses_request, rename_chat_error)
from tep.wire.routes import endpoint_label

CALL = '<tool_call>\n{"name": "f", "arguments": {"a": [1, "x}"]}}\n</tool_call>'
TEXTS = ["", "plain answer", CALL, CALL + "\n" + CALL.replace('"f"', '"g"'),
         "before " + CALL, CALL + " after", "<tool_", "<tool_call>not json</tool_call>"]


def _ids():
    n = itertools.count()
    return lambda prefix: f"{prefix}_{next(n)}"


def _run(pieces: list[str], tools: bool, reason: str) -> tuple[list[dict], list]:
    b = OutputBuilder(tools, new_id=_ids())
    events = []
    for p in pieces:
        events += b.feed(p)
    events += b.finish(reason)
    return b.items, events


def _strip_call_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in i.items() if k != "call_id"} for i in items]


def _replay(events) -> list[dict]:
    """The output items as a client assembles them from the events alone."""
    items: dict[int, dict] = {}
    for e in events:
        d = e.data
        if e.type == "response.output_item.added":
            items[d["output_index"]] = json.loads(json.dumps(d["item"]))
        elif e.type == "response.content_part.added":
            items[d["output_index"]]["content"].append(dict(d["part"]))
        elif e.type == "response.output_text.delta":
            items[d["output_index"]]["content"][d["content_index"]]["text"] += d["delta"]
        elif e.type == "response.function_call_arguments.delta":
            items[d["output_index"]]["arguments"] += d["delta"]
        elif e.type == "response.output_item.done":
            assert {k: v for k, v in d["item"].items() if k != "status"} == \
                {k: v for k, v in items[d["output_index"]].items() if k != "status"}
            items[d["output_index"]] = d["item"]
    return [items[k] for k in sorted(items)]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(TEXTS), st.booleans(), st.sampled_from(["stop", "length"]),
       st.lists(st.integers(1, 7), max_size=40))
def test_pieces_give_the_same_items(text, tools, reason, cuts):
    whole, _ = _run([text], tools, reason)
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i:i + c])
        i += c
    pieces.append(text[i:])
    cut, events = _run(pieces, tools, reason)
    assert _strip_call_ids(cut) == _strip_call_ids(whole)
    assert _strip_call_ids(_replay(events)) == _strip_call_ids(whole)
    assert whole and whole[-1]["status"] == ("incomplete" if reason == "length"
                                             else "completed")


def test_calls_become_function_call_items():
    items, events = _run([CALL + "\n" + CALL.replace('"f"', '"g"')], True, "stop")
    assert [(i["type"], i["name"], json.loads(i["arguments"])) for i in items] == \
        [("function_call", "f", {"a": [1, "x}"]}), ("function_call", "g", {"a": [1, "x}"]})]
    types = [e.type for e in events]
    assert types.count("response.function_call_arguments.done") == 2
    items, _ = _run([CALL], False, "stop")         # without tools it is just text
    assert items[0]["type"] == "message" and items[0]["content"][0]["text"] == CALL


def test_chat_body_mapping():
    req = parse_responses_request({
        "model": "m", "instructions": "sys", "max_output_tokens": 5, "seed": 3,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
        "input": [{"role": "developer", "content": "dev"},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "r"}]})
    body = chat_body(req, [{"type": "message", "role": "user", "id": "x",
                            "content": [{"type": "input_text", "text": "old"}]}])
    assert body["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "old"},
        {"role": "system", "content": "dev"},
        {"role": "assistant", "content": "a", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}]
    assert body["max_tokens"] == 5 and body["seed"] == 3
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object"}}}
    assert isinstance(req, ResponsesRequest) and all(i["id"] for i in req.input_items)


def test_chat_errors_are_renamed():
    e = rename_chat_error(BadRequestError("'tools[0].function.parameters' must be ...",
                                          param="tools[0].function.parameters"))
    assert e.param == "tools[0].parameters" and "'tools[0].parameters'" in e.message
    assert rename_chat_error(BadRequestError("x", param="max_tokens")).param == \
        "max_output_tokens"
    assert rename_chat_error(BadRequestError("x", param="messages[3].content")).param == \
        "input"
    assert rename_chat_error(BadRequestError(
        "x", param="response_format.json_schema.schema")).param == "text.format.schema"


def test_route_labels():
    assert endpoint_label("/v1/responses") == "/v1/responses"
    assert endpoint_label("/v1/responses/resp_1") == "/v1/responses/{response_id}"
    assert endpoint_label("/v1/responses/resp_1/input_items") == \
        "/v1/responses/{response_id}/input_items"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=30), st.booleans())
def test_stream_bytes_are_the_events_json(pieces, tools):
    """The renderer's per-token byte template gives exactly ``sse_event``'s bytes, with
    sequence numbers 0, 1, 2, ... and the text as sent."""
    from tep.serving.responses import _Events
    from tep.serving.sse import sse_event

    body = {"model": "m", "input": "x"}
    if tools:
        body["tools"] = [{"type": "function", "name": "f"}]
    ev = _Events(parse_responses_request(body), "resp_1", 0, False)
    out = list(ev.opening())
    for p in pieces:
        out += ev.delta(0, p, None)
    out += ev.finish(0, "stop")
    out += ev.done(3, 4)
    out.append(ev.closing())
    objs = []
    for b in out:
        head, data = b.decode().split("\n", 1)
        obj = json.loads(data[len("data: "):])
        assert head == "event: " + obj["type"] and sse_event(obj["type"], obj) == b
        objs.append(obj)
    assert [o["sequence_number"] for o in objs] == list(range(len(objs)))
    final = objs[-1]["response"]
    assert objs[-1]["type"] == "response.completed" and final["usage"]["total_tokens"] == 7
    if not tools:
        assert final["output"][0]["content"][0]["text"] == "".join(pieces)
        assert "".join(o["delta"] for o in objs
                       if o["type"] == "response.output_text.delta") == "".join(pieces)
