"""The Messages translation (tep.wire.messages) on its own, and the Messages / text routes
in-process on both server paths (the ASGI fast path and Quart's routes): Anthropic's
envelope for 401/404/405/413/501 there and OpenAI's elsewhere, x-api-key next to Bearer."""
from __future__ import annotations

import json

import pytest
from support.backends import ScriptBackend
from support.http import client_for

from tep.backends.toy import ToyEngineBackend
from tep.errors import BadRequestError
from tep.serving.messages import text_delta_event
from tep.serving.sse import sse_event
from tep.wire.messages import (error_type, parse_messages_request, rename_param,
                               stop_reason)

ASK = [{"role": "user", "content": "hi"}]


def test_translation_of_a_tool_round_trip():
    body = {"model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "A"},
                                                      {"type": "text", "text": "B"}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                        {"type": "text", "text": "sunny"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "x",
                     "is_error": True},
                    {"type": "text", "text": "and "}, {"type": "text", "text": "then?"}]}],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "stop_sequences": ["END"], "top_k": 5, "metadata": {"user_id": "u"}}
    r = parse_messages_request(body, "rid")
    assert r.chat == {
        "model": "m", "max_tokens": 9, "stop": ["END"], "top_k": 5, "user": "u",
        "messages": [
            {"role": "system", "content": "AB"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "w", "arguments": '{"c":"P"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: x"},
            {"role": "user", "content": "and then?"}],
        "tools": [{"type": "function", "function": {"name": "w",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": False}
    assert r.paths == ["system", "messages[0]", "messages[1]", "messages[2].content[0]",
                       "messages[2].content[1]", "messages[2]"]
    assert r.stop_sequences == ["END"] and not r.stream
    # chat-path errors come back named for the Messages field
    e = rename_param(BadRequestError("'messages[4].content' is bad", param="messages[4].content"), r)
    assert e.param == "messages[2].content[1].content" and "'messages[2].content[1]" in e.message
    e = rename_param(BadRequestError("'tools[0].function.parameters' x",
                                     param="tools[0].function.parameters"), r)
    assert e.param == "tools[0].input_schema"
    e = rename_param(BadRequestError("'stop' must be short", param="stop"), r)
    assert (e.param, e.message) == ("stop_sequences", "'stop_sequences' must be short")


@pytest.mark.parametrize("text", ["plain", "", 'quote " back \\ slash', "naïve 東京 🚀",
                                  "\n\t\u2028 ctrl \x00"])
def test_text_delta_bytes_equal_the_generic_event(text):
    want = sse_event("content_block_delta", {"type": "content_block_delta", "index": 3,
                                             "delta": {"type": "text_delta", "text": text}})
    assert text_delta_event(3, text) == want


def test_stop_reasons_and_error_types():
    assert stop_reason("length", True, "x") == "max_tokens"
    assert stop_reason("stop", True, None) == "tool_use"
    assert stop_reason("stop", False, "END") == "stop_sequence"
    assert stop_reason("stop", False, None) == "end_turn"
    assert [error_type(s) for s in (400, 401, 404, 405, 413, 429, 500, 501, 503)] == [
        "invalid_request_error", "authentication_error", "not_found_error",
        "invalid_request_error", "request_too_large", "rate_limit_error", "api_error",
        "api_error", "overloaded_error"]


def _anthropic(body: dict, etype: str) -> None:
    assert body["type"] == "error" and body["error"]["type"] == etype, body
    assert body["error"]["message"] and body["request_id"]


@pytest.mark.anyio
@pytest.mark.parametrize("fast_path", [True, False])
async def test_envelopes_and_keys_on_both_paths(fast_path):
    async with client_for(ScriptBackend(), fast_path=fast_path, api_keys=["sekrit"],
                          max_body_bytes=4096) as c:
        good = {"x-api-key": "sekrit"}
        body = {"model": "script", "max_tokens": 3, "messages": ASK}
        r = await c.post("/v1/messages", json=body)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        _anthropic(await r.get_json(), "authentication_error")
        r = await c.post("/v1/messages", json=body, headers={"x-api-key": "nope"})
        _anthropic(await r.get_json(), "authentication_error")
        for h in (good, {"Authorization": "Bearer sekrit"},
                  {"Authorization": "Bearer wrong", "x-api-key": "sekrit"}):
            r = await c.post("/v1/messages", json=body, headers=h)
            assert r.status_code == 200, await r.get_data()
            got = await r.get_json()
            assert got["type"] == "message" and got["usage"]["output_tokens"] == 3
        r = await c.post("/v1/messages", json={**body, "model": "nope"}, headers=good)
        assert r.status_code == 404
        _anthropic(await r.get_json(), "not_found_error")
        r = await c.post("/v1/messages", json={**body, "messages": ASK * 1000}, headers=good)
        assert r.status_code == 413
        _anthropic(await r.get_json(), "request_too_large")
        r = await c.get("/v1/messages", headers=good)
        assert r.status_code == 405
        _anthropic(await r.get_json(), "invalid_request_error")
        # the script backend has no chat template: count_tokens cannot count (501)
        r = await c.post("/v1/messages/count_tokens", json=body, headers=good)
        assert r.status_code == 501 and r.headers["x-should-retry"] == "false"
        _anthropic(await r.get_json(), "api_error")
        # OpenAI's envelope everywhere else, x-api-key accepted there too
        r = await c.post("/v1/chat/completions", json={"model": "script", "messages": ASK,
                                                       "max_tokens": 2})
        assert r.status_code == 401 and set(await r.get_json()) == {"error"}
        r = await c.post("/v1/chat/completions", headers=good, json={
            "model": "script", "messages": ASK, "max_tokens": 2})
        assert r.status_code == 200
        r = await c.post("/detokenize", json={"tokens": [104, 105]})
        assert r.status_code == 401
        r = await c.post("/detokenize", json={"tokens": [104, 105]}, headers=good)
        assert (await r.get_json())["content"] == "hi"


@pytest.mark.anyio
@pytest.mark.parametrize("fast_path", [True, False])
async def test_stream_events_in_process(fast_path):
    async with client_for(ToyEngineBackend(), fast_path=fast_path) as c:
        r = await c.post("/v1/messages", json={"model": "tep-toy", "max_tokens": 5,
                                               "messages": ASK, "stream": True, "seed": 1})
        assert r.status_code == 200
        text = (await r.get_data()).decode()
        events = [b.split("\n", 1) for b in text.split("\n\n") if b]
        names = [e[0].removeprefix("event: ") for e in events]
        payloads = [json.loads(e[1].removeprefix("data: ")) for e in events]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        assert payloads[0]["message"]["usage"]["input_tokens"] == len(
            "<|user|>\nhi\n<|assistant|>\n")
        assert payloads[-2]["usage"] == {"input_tokens": payloads[0]["message"]["usage"][
            "input_tokens"], "output_tokens": 5}
