"""``/v1/messages`` through the official ``anthropic`` client against live ``tep serve``
processes (the toy model on the engine, and the script backend for failures): create,
stream (its final message equals the non-streamed one for the same seed), the raw event
sequence, stop reasons, tool_use -> tool_result round trips through the grammar-constrained
tool path, count_tokens against /apply-template + /tokenize, errors in Anthropic's envelope
(the client's exception classes, and an ``error`` event after a stream started),
``x-api-key`` auth, and hostile bodies answered with 4xx while the server keeps serving."""
from __future__ import annotations

import json
import threading
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

anthropic = pytest.importorskip("anthropic")

TOY = "tep.backends.toy:ToyEngineBackend"
SCRIPT = "support.backends:ScriptBackend"
MODEL = "tep-toy"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object",
       "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                      "b": {"type": "integer", "minimum": -99, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": WEATHER},
         {"name": "add", "input_schema": ADD}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def client(url: str, **kw) -> "anthropic.Anthropic":
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=url, max_retries=0, timeout=60, **kw)


def text_of(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def sse_blocks(body: str) -> list[tuple[str, dict]]:
    """(event name, payload) per server-sent event."""
    out = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_create(live_server):
    url = live_server(TOY)
    m = client(url).messages.create(model=MODEL, max_tokens=24, messages=ASK,
                                    system="Answer briefly.", extra_body={"seed": 1})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == MODEL
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert 0 < m.usage.output_tokens <= 24
    # the prompt: the toy template over the system prompt and the question, one token/byte
    prompt = "<|system|>\nAnswer briefly.\n<|user|>\n" + ASK[0]["content"] + "\n<|assistant|>\n"
    assert m.usage.input_tokens == len(prompt.encode())


@pytest.mark.parametrize("seed", [2, 7])
def test_stream_equals_create(live_server, seed):
    c = client(live_server(TOY))
    kw = dict(model=MODEL, max_tokens=40, messages=ASK, system=[{"type": "text", "text": "Hi"}],
              # sampling knobs through extra_body: this client version has no arguments
              # for them (the API still takes them)
              extra_body={"seed": seed, "temperature": 0.9, "top_k": 50, "top_p": 0.95})
    whole = c.messages.create(**kw)
    texts = []
    with c.messages.stream(**kw) as s:
        for ev in s:
            if ev.type == "text":
                texts.append(ev.text)
        final = s.get_final_message()
    assert text_of(final) == text_of(whole) == "".join(texts)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_event_sequence(live_server):
    url = live_server(TOY)
    r = httpx.post(url + "/v1/messages", json={"model": MODEL, "max_tokens": 12,
                                                "messages": ASK, "stream": True, "seed": 3},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = sse_blocks(r.text)
    names = [n for n, _ in evs]
    assert all(n == p["type"] for n, p in evs)
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start" and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = evs[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert evs[2][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    delta = evs[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 12
    assert delta["usage"]["input_tokens"] > 0


def test_stop_sequence_named(live_server):
    c = client(live_server(TOY))
    kw = dict(model=MODEL, max_tokens=60, messages=ASK, extra_body={"seed": 5})
    free = text_of(c.messages.create(**kw))
    stop = free[20:23]
    assert len(stop) == 3
    want = free[:free.index(stop)]
    m = c.messages.create(**kw, stop_sequences=["never-in-text", stop])
    assert (m.stop_reason, m.stop_sequence, text_of(m)) == ("stop_sequence", stop, want)
    with c.messages.stream(**kw, stop_sequences=["never-in-text", stop]) as s:
        f = s.get_final_message()
    assert (f.stop_reason, f.stop_sequence, text_of(f)) == ("stop_sequence", stop, want)


def _check_tool_uses(msg, names):
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert uses and msg.stop_reason == "tool_use"
    for b in uses:
        assert b.id.startswith("toolu_") and b.name in names
        jsonschema.validate(b.input, SCHEMAS[b.name])
    return uses


@pytest.mark.parametrize("choice,names", [
    ({"type": "any"}, {"get_weather", "add"}),
    ({"type": "tool", "name": "add"}, {"add"})])
def test_tool_use_round_trip(live_server, choice, names):
    c = client(live_server(TOY))
    # one call: the toy's random text rarely picks EOS, so with parallel calls allowed it
    # keeps calling until max_tokens
    m = c.messages.create(model=MODEL, max_tokens=300, messages=ASK, tools=TOOLS,
                          tool_choice={**choice, "disable_parallel_tool_use": True},
                          extra_body={"seed": 4})
    uses = _check_tool_uses(m, names)
    assert len(uses) == 1
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": uses[0].id,
                          "content": "21C, sunny"},
                         {"type": "text", "text": "Thanks; summarise."}]}]
    final = c.messages.create(model=MODEL, max_tokens=30, messages=history, tools=TOOLS,
                              tool_choice={"type": "none"}, extra_body={"seed": 4})
    assert [b.type for b in final.content] == ["text"]
    assert final.stop_reason in ("end_turn", "max_tokens")
    # the tool result reached the prompt: counted tokens grow by its rendering
    n1 = c.messages.count_tokens(model=MODEL, messages=history, tools=TOOLS,
                                 tool_choice={"type": "none"}).input_tokens
    assert n1 == final.usage.input_tokens


def test_streamed_tool_use_equals_create(live_server):
    c = client(live_server(TOY))
    kw = dict(model=MODEL, max_tokens=300, messages=ASK, tools=TOOLS,
              tool_choice={"type": "tool", "name": "get_weather",
                           "disable_parallel_tool_use": True},
              extra_body={"seed": 9})
    whole = c.messages.create(**kw)
    partial = []
    with c.messages.stream(**kw) as s:
        for ev in s:
            if ev.type == "input_json":
                partial.append(ev.partial_json)
        final = s.get_final_message()
    want = [(b.type, getattr(b, "name", None), getattr(b, "input", None))
            for b in whole.content]
    got = [(b.type, getattr(b, "name", None), getattr(b, "input", None))
           for b in final.content]
    assert got == want and final.stop_reason == whole.stop_reason == "tool_use"
    assert len(partial) > 1 and json.loads("".join(partial)) == final.content[-1].input


class Shirt(BaseModel):
    # enums and booleans: the client moves length and range limits into descriptions
    # (Anthropic's structured outputs do not take them), and unbounded strings from the
    # toy model's random text rarely close within max_tokens
    colour: Literal["red", "green", "blue"]
    size: Literal["s", "m", "l", "xl"]
    in_stock: bool


def test_parse_with_output_format(live_server):
    c = client(live_server(TOY))
    for seed in (1, 2):   # messages.parse sends output_config.format (a JSON schema)
        m = c.messages.parse(model=MODEL, max_tokens=300, messages=ASK, output_format=Shirt,
                             extra_body={"seed": seed})
        assert m.stop_reason == "end_turn"
        assert isinstance(m.parsed_output, Shirt)
        Shirt.model_validate_json(m.content[0].text)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, max_tokens=3, messages=ASK, output_config={
            "format": {"type": "json_schema", "schema": {"type": "strange"}}})
    assert "output_config.format.schema" in e.value.message


def test_count_tokens_equals_rendered_prompt(live_server):
    url = live_server(TOY)
    c = client(url)
    body = {"model": MODEL, "messages": ASK, "system": "Be terse.", "tools": TOOLS}
    n = c.messages.count_tokens(**body).input_tokens
    chat = {"model": MODEL, "messages": [{"role": "system", "content": "Be terse."}, *ASK],
            "tools": [{"type": "function", "function": {
                "name": t["name"], **({"description": t["description"]}
                                      if "description" in t else {}),
                "parameters": t["input_schema"]}} for t in TOOLS]}
    prompt = httpx.post(url + "/apply-template", json=chat).json()["prompt"]
    assert "get_weather" in prompt and "Be terse." in prompt   # tools are in the prompt
    toks = httpx.post(url + "/tokenize", json={"model": MODEL, "content": prompt}).json()
    assert n == toks["count"] == len(toks["tokens"]) == len(prompt.encode())
    # and it is what generation counts
    m = c.messages.create(**body, max_tokens=4, tool_choice={"type": "auto"},
                          extra_body={"seed": 1})
    assert m.usage.input_tokens == n


def test_errors_in_anthropic_envelope(live_server):
    url = live_server(TOY)
    c = client(url)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, messages=ASK, max_tokens=None)  # type: ignore[arg-type]
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="no-such-model", messages=ASK, max_tokens=4)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, messages=ASK, max_tokens=4, tools=TOOLS,
                          tool_choice={"type": "tool", "name": "nope"})
    assert "tool_choice.name" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model=MODEL, messages=ASK, max_tokens=4, stop_sequences=[""] * 99)
    assert "stop_sequences" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:  # count_tokens too
        c.messages.count_tokens(model=MODEL, messages=[{"role": "system", "content": "x"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/messages", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    # other routes keep OpenAI's envelope
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and "error" in r.json() and "type" not in r.json()


def test_error_after_stream_started(live_server):
    c = client(live_server(SCRIPT))
    with pytest.raises(anthropic.APIStatusError) as e:
        with c.messages.stream(model="script", max_tokens=20,
                               messages=[{"role": "user", "content": "boom-later"}]) as s:
            for _ in s:
                pass
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "api_error"
    assert "secret" not in json.dumps(e.value.body)
    # a failure before the first token is a real status
    with pytest.raises(anthropic.InternalServerError):
        c.messages.create(model="script", max_tokens=20,
                          messages=[{"role": "user", "content": "boom"}])


def test_rate_limit_and_too_large_in_envelope(live_server):
    url = live_server(SCRIPT, "--max-concurrency", "1", "--max-queue", "0",
                      "--max-body-bytes", "4096")
    c = client(url)
    with pytest.raises(anthropic.APIStatusError) as e:   # the class's name varies by version
        c.messages.create(model="script", max_tokens=4,
                          messages=[{"role": "user", "content": "x" * 8000}])
    assert e.value.status_code == 413
    assert e.value.body["error"]["type"] == "request_too_large"
    holding = threading.Event()
    done = threading.Event()

    def hold():   # a slow stream keeps the one slot busy
        with httpx.stream("POST", url + "/v1/messages", timeout=30, json={
                "model": "script", "max_tokens": 60, "stream": True,
                "messages": [{"role": "user", "content": "slow"}]}) as r:
            for _ in r.iter_bytes():
                holding.set()
                if done.is_set():
                    break

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(20)
        with pytest.raises(anthropic.RateLimitError) as e:
            c.messages.create(model="script", max_tokens=2, messages=ASK)
        assert e.value.body["error"]["type"] == "rate_limit_error"
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        done.set()
        t.join(30)


def test_api_keys_x_api_key_and_bearer(live_server):
    url = live_server(TOY, "--api-key", "k-one", "--api-key", "k-two")
    ok = client(url, api_key="k-one").messages.create(model=MODEL, max_tokens=3, messages=ASK)
    assert ok.usage.output_tokens == 3
    ok = client(url, api_key=None, auth_token="k-two").messages.create(
        model=MODEL, max_tokens=3, messages=ASK)
    assert ok.usage.output_tokens == 3
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(url, api_key="wrong").messages.create(model=MODEL, max_tokens=3, messages=ASK)
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        client(url, api_key="wrong").messages.count_tokens(model=MODEL, messages=ASK)
    # x-api-key on the other routes too, and the text routes need a key
    h = {"x-api-key": "k-two"}
    assert httpx.get(url + "/v1/models", headers=h).status_code == 200
    assert httpx.post(url + "/tokenize", json={"content": "hi"}).status_code == 401
    assert httpx.post(url + "/tokenize", json={"content": "hi"}, headers=h).json()["count"] == 2
    r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": "nope"},
                   json={"model": MODEL, "messages": ASK, "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200


HOSTILE = [
    {"messages": "hello"},
    {"messages": []},
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": 7}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "nope"}]}]},
    {"messages": [{"role": "user", "content": ["just a string"]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                                                "input": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a",
                                                     "name": "b", "input": []}]},
                  *ASK]},
    {"messages": ASK + [{"role": "assistant", "content": "prefill"}]},
    {"max_tokens": "10"},
    {"max_tokens": 0},
    {"max_tokens": 10**12},
    {"temperature": "hot"},
    {"temperature": 5},
    {"top_k": 1.5},
    {"stop_sequences": "stop"},
    {"system": 5},
    {"system": [{"type": "image"}]},
    {"tools": {"name": "x"}},
    {"tools": [{"name": "x"}]},
    {"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
    {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "unknown_tool"}},
    {"tools": TOOLS, "tool_choice": {"type": "sometimes"}},
    {"tools": TOOLS, "tool_choice": "auto"},
    {"tool_choice": {"type": "any"}},
    {"tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
    {"messages": [{"role": "user", "content": "hi"}] * 10_000},
    {"model": 5},
    {"stream": "yes"},
    {"output_config": {"format": {"type": "json_object"}}},
    {"output_config": {"format": {"type": "json_schema", "schema": []}}},
    {"output_config": "json"},
]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_hostile_bodies_are_4xx_and_server_keeps_serving(live_server, path):
    url = live_server(TOY)
    base = {"model": MODEL, "max_tokens": 8, "messages": ASK}
    with httpx.Client(base_url=url, timeout=60) as h:
        for extra in HOSTILE:
            r = h.post(path, json={**base, **extra})
            if path.endswith("count_tokens") and set(extra) <= {"max_tokens", "temperature",
                                                                  "top_k", "stop_sequences",
                                                                  "stream"}:
                assert r.status_code in (200, 400), (extra, r.text)   # unused by counting
                continue
            assert r.status_code == 400, (str(extra)[:200], r.status_code, r.text[:300])
            body = r.json()
            assert body["type"] == "error", body
            assert body["error"]["type"] == "invalid_request_error"
            assert body["error"]["message"]
        for raw in (b"[]", b"null", b'"x"', b"{"):
            r = h.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["type"] == "error"
        ok = h.post("/v1/messages", json={**base, "seed": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] > 0
