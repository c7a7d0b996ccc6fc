"""``/v1/responses`` end to end: the official openai client against live ``tep serve``
processes of the toy model, each with its own SQLite store file.

References: chat completions on the same server (the same messages and seed must give the
same text and token counts), the non-streamed answer (a stream's final response must equal
it), jsonschema / pydantic for constrained output, and the store file read with plain
``sqlite3``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import sqlite3
import subprocess
import sys
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from support.process import (child_env, free_port, obey_file_modes, start_process,
                             stop_process)

TOY = "tep.backends.toy:ToyEngineBackend"
MODEL = "tep-toy"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "weather",
          "parameters": WEATHER, "strict": True}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)


def _serve(store: Any, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "tep", "serve", "--backend", TOY, "--port", str(port),
            "--responses-store", str(store), "--graceful-timeout", "2",
            "--log-level", "warning", *extra]
    return start_process(args, port, env or child_env())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("responses") / "responses.sqlite3"
    proc, url = _serve(store)
    yield url, store
    stop_process(proc)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _without_ids(obj: Any) -> Any:
    """A response dump with what differs between two runs removed (ids, times, and the
    client's own ``parsed`` fields, which only its stream helper adds)."""
    if isinstance(obj, dict):
        return {k: _without_ids(v) for k, v in obj.items()
                if k not in ("id", "created_at", "call_id", "item_id", "parsed",
                             "parsed_arguments")}
    if isinstance(obj, list):
        return [_without_ids(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- create

def test_create_string_and_items_match_chat(server):
    url, _ = server
    c = client(url)
    knobs = dict(temperature=0.9, top_p=0.95)
    r = c.responses.create(model=MODEL, input="Hello there", instructions="Be brief.",
                           max_output_tokens=24, extra_body={"seed": 7}, **knobs)
    ref = c.chat.completions.create(model=MODEL, seed=7, max_tokens=24, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        **knobs)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == ref.choices[0].message.content
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.usage.output_tokens == ref.usage.completion_tokens
    assert r.status == ("incomplete" if ref.choices[0].finish_reason == "length"
                        else "completed")
    assert r.instructions == "Be brief." and r.max_output_tokens == 24 and r.store is True
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "output_text"

    # the same turn as items: a developer message is a system turn
    items = [{"type": "message", "role": "developer",
              "content": [{"type": "input_text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}]
    r2 = c.responses.create(model=MODEL, input=items, max_output_tokens=24,
                            extra_body={"seed": 7}, **knobs)
    assert r2.output_text == r.output_text

    # an assistant turn in the input (output_text parts)
    hist = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": "And now?"}]
    r3 = c.responses.create(model=MODEL, input=hist, max_output_tokens=16,
                            extra_body={"seed": 3})
    ref3 = c.chat.completions.create(model=MODEL, seed=3, max_tokens=16, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"}])
    assert r3.output_text == ref3.choices[0].message.content


def test_stream_final_response_equals_create(server):
    url, _ = server
    c = client(url)
    # a stop string (tep's extension) ends the answer on its own: response.completed (the
    # client's get_final_response() wants that event; at max_output_tokens it is
    # response.incomplete, tested below)
    kw = dict(model=MODEL, input="Tell me a story", max_output_tokens=400, temperature=1.0,
              extra_body={"seed": 11, "stop": ["z", "q"]})
    r = c.responses.create(**kw)
    assert r.status == "completed" and len(r.output_text) > 3, r.output_text
    with c.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    assert _without_ids(final.model_dump()) == _without_ids(r.model_dump())
    assert final.output_text == r.output_text
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text
    for t in ("response.output_item.added", "response.content_part.added",
              "response.output_text.done", "response.content_part.done",
              "response.output_item.done"):
        assert types.count(t) == 1, t
    # the stored one (written before the closing event) is the same answer
    assert _without_ids(c.responses.retrieve(final.id).model_dump()) == \
        _without_ids(r.model_dump())


def test_sse_framing_names_each_event(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/responses", timeout=60, json={
            "model": MODEL, "input": "x", "stream": True, "max_output_tokens": 3,
            "seed": 1, "temperature": 2.0}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    blocks = [b for b in body.split("\n\n") if b]
    assert "[DONE]" not in body
    for b in blocks:
        ev, data = b.split("\n", 1)
        assert ev.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == ev[7:]
    last = json.loads(blocks[-1].split("\n", 1)[1][6:])
    # 3 tokens at temperature 2 end at the limit: response.incomplete
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"


def test_incomplete_at_max_output_tokens(server):
    url, _ = server
    r = client(url).responses.create(model=MODEL, input="x", max_output_tokens=3,
                                     temperature=2.0, extra_body={"seed": 1})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


# --------------------------------------------------------------------------- structured

def test_parse_with_pydantic_text_format(server):
    url, _ = server
    c = client(url)
    kw = dict(model=MODEL, input="Make up a person", text_format=Person,
              max_output_tokens=200, extra_body={"seed": 5})
    r = c.responses.parse(**kw)
    assert isinstance(r.output_parsed, Person), r.output_text
    jsonschema.validate(json.loads(r.output_text), Person.model_json_schema())
    with c.responses.stream(**kw) as s:
        final = s.get_final_response()
    assert final.output_parsed == r.output_parsed
    # json_object: any object; the toy model's random objects may run past the limit, so
    # every answer that completed must parse, and some must complete
    done = 0
    for seed in range(6):
        j = c.responses.create(model=MODEL, input="json please", max_output_tokens=120,
                               text={"format": {"type": "json_object"}},
                               extra_body={"seed": seed})
        assert j.text.format.type == "json_object"
        if j.status == "completed":
            assert isinstance(json.loads(j.output_text), dict)
            done += 1
    assert done


def test_function_tool_round_trip(server):
    url, _ = server
    c = client(url)
    first = c.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                               tool_choice="required", extra_body={"seed": 4},
                               max_output_tokens=200, parallel_tool_calls=False)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and first.status == "completed", first.output
    for call in calls:
        assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    outputs = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
               for call in calls]
    # continued from the store ...
    second = c.responses.create(model=MODEL, previous_response_id=first.id, input=outputs,
                                tools=TOOLS, tool_choice="none", max_output_tokens=30,
                                extra_body={"seed": 9})
    assert second.output[0].type == "message" and second.output_text
    # ... equals the same conversation sent whole, without the store
    whole = [{"role": "user", "content": "Weather in Paris?"},
             *[o.model_dump(exclude_none=True) for o in first.output], *outputs]
    again = c.responses.create(model=MODEL, input=whole, tools=TOOLS, tool_choice="none",
                               max_output_tokens=30, store=False, extra_body={"seed": 9})
    assert again.output_text == second.output_text and again.store is False
    # streamed calls: argument deltas, then the same call as non-streamed
    with c.responses.stream(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                            tool_choice="required", extra_body={"seed": 4},
                            max_output_tokens=200, parallel_tool_calls=False) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    assert types.count("response.function_call_arguments.done") == len(calls)
    assert [(o.name, o.arguments) for o in final.output] == \
        [(o.name, o.arguments) for o in calls]


# --------------------------------------------------------------------------- the store

def test_retrieve_delete_and_input_items(server):
    url, store = server
    c = client(url)
    items = [{"role": "user", "content": f"turn {k}"} for k in range(5)]
    r = c.responses.create(model=MODEL, input=items, max_output_tokens=8,
                           extra_body={"seed": 1})
    got = c.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    page = c.responses.input_items.list(r.id, limit=2)   # newest first by default
    assert [i.content[0].text for i in page.data] == ["turn 4", "turn 3"]
    assert page.has_more and page.first_id == page.data[0].id
    raw = httpx.get(f"{url}/v1/responses/{r.id}/input_items",
                    params={"limit": 2, "after": page.last_id}).json()
    assert raw["object"] == "list" and raw["has_more"] is True
    assert [i["content"][0]["text"] for i in raw["data"]] == ["turn 2", "turn 1"]
    asc = list(c.responses.input_items.list(r.id, order="asc", limit=2))  # auto-paged
    assert [i.content[0].text for i in asc] == [f"turn {k}" for k in range(5)]
    # the rows in the file, read with sqlite3
    con = sqlite3.connect(store)
    [(seq,)] = con.execute("SELECT seq FROM responses WHERE id=?", (r.id,)).fetchall()
    rows = con.execute("SELECT kind, position FROM items WHERE response_seq=? "
                       "ORDER BY kind, position", (seq,)).fetchall()
    con.close()
    assert rows == [(0, k) for k in range(5)] + [(1, 0)]
    child = c.responses.create(model=MODEL, input="next", previous_response_id=r.id,
                               max_output_tokens=4)
    deleted = c.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    for call in (lambda: c.responses.retrieve(r.id), lambda: c.responses.delete(r.id),
                 lambda: c.responses.input_items.list(r.id),
                 lambda: c.responses.create(model=MODEL, input="x",
                                            previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    # the child is still there, but its conversation lost a turn: 404 naming that turn
    assert c.responses.retrieve(child.id).id == child.id
    with pytest.raises(openai.NotFoundError, match=r.id):
        c.responses.create(model=MODEL, input="x", previous_response_id=child.id)


def test_unknown_ids_are_404_in_the_envelope(server):
    url, _ = server
    for method, path in (("GET", "/v1/responses/resp_nope"),
                         ("DELETE", "/v1/responses/resp_nope"),
                         ("GET", "/v1/responses/resp_nope/input_items")):
        r = httpx.request(method, url + path)
        assert r.status_code == 404, (method, path)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and "resp_nope" in err["message"]
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": "x",
                                                "previous_response_id": "resp_nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    r = httpx.get(url + "/v1/responses/x/input_items", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_store_false_is_not_kept(server):
    url, _ = server
    c = client(url)
    r = c.responses.create(model=MODEL, input="x", store=False, max_output_tokens=4)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_concurrent_turns_on_one_conversation(server):
    """16 clients continue the same response at once: every turn is stored whole, its
    own items only, in order."""
    url, store = server
    c = client(url)
    root = c.responses.create(model=MODEL, input="root", max_output_tokens=4)

    def turn(k: int) -> str:
        r = client(url).responses.create(
            model=MODEL, previous_response_id=root.id, max_output_tokens=4,
            input=[{"role": "user", "content": f"branch {k} item {j}"} for j in range(k % 4 + 1)])
        return r.id

    with cf.ThreadPoolExecutor(16) as ex:
        ids = list(ex.map(turn, range(16)))
    assert len(set(ids)) == 16
    for k, rid in enumerate(ids):
        got = [i.content[0].text for i in c.responses.input_items.list(rid, order="asc")]
        assert got == [f"branch {k} item {j}" for j in range(k % 4 + 1)]
    con = sqlite3.connect(store)
    for rid in ids:
        [(seq,)] = con.execute("SELECT seq FROM responses WHERE id=?", (rid,)).fetchall()
        pos = [p for (p,) in con.execute("SELECT position FROM items WHERE response_seq=? "
                                         "AND kind=0 ORDER BY position", (seq,))]
        assert pos == list(range(len(pos)))
    con.close()


# --------------------------------------------------------------------------- hostile

BAD = [
    ({"input": [{"type": "banana"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [5]}, "input[0]"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]},
     "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "y"}]},
     "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0]"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": 3}}},
     "text.format.schema"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 9}, "temperature"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    url, _ = server
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_unknown_model_and_junk_bodies(server):
    url, _ = server
    r = httpx.post(url + "/v1/responses", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    for junk in (b"not json", b"[1,2]", b"{\"model\": 5}"):
        r = httpx.post(url + "/v1/responses", content=junk,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, junk
    assert httpx.get(url + "/health").status_code == 200


def test_ten_thousand_items(server):
    url, store = server
    items = [{"role": "user", "content": "a"} for _ in range(10_000)]
    r = httpx.post(url + "/v1/responses", timeout=120,
                   json={"model": MODEL, "input": items, "max_output_tokens": 2})
    assert r.status_code == 200, r.text[:500]
    rid = r.json()["id"]
    con = sqlite3.connect(store)
    n = con.execute("SELECT count(*) FROM items i JOIN responses r ON r.seq = i.response_seq "
                    "WHERE r.id=? AND i.kind=0", (rid,)).fetchone()[0]
    con.close()
    assert n == 10_000
    page = httpx.get(f"{url}/v1/responses/{rid}/input_items", params={"limit": 100}).json()
    assert len(page["data"]) == 100 and page["has_more"] is True


# --------------------------------------------------------------------------- keys, restarts

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-0123456789"


def test_keys_isolate_and_conversations_survive_a_restart(tmp_path):
    """Per-key stores, and previous_response_id answered by a new process from the same
    file (the rows, not process memory)."""
    store = tmp_path / "r.sqlite3"
    env = child_env(TEP_API_KEYS=f"{KEY_A},{KEY_B}")
    proc, url = _serve(store, env=env)
    try:
        a, b = client(url, KEY_A), client(url, KEY_B)
        first = a.responses.create(model=MODEL, input="Remember: blue", max_output_tokens=12,
                                   extra_body={"seed": 1})
        assert a.responses.retrieve(first.id).id == first.id
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").responses.retrieve(first.id)
    finally:
        stop_process(proc)
    proc, url = _serve(store, env=env)          # a new process, the same file
    try:
        a, b = client(url, KEY_A), client(url, KEY_B)
        for call in (lambda: b.responses.retrieve(first.id),
                     lambda: b.responses.delete(first.id),
                     lambda: b.responses.input_items.list(first.id),
                     lambda: b.responses.create(model=MODEL, input="x",
                                                previous_response_id=first.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        second = a.responses.create(model=MODEL, input="What colour?",
                                    previous_response_id=first.id, max_output_tokens=12,
                                    extra_body={"seed": 2})
        ref = a.chat.completions.create(model=MODEL, seed=2, max_tokens=12, messages=[
            {"role": "user", "content": "Remember: blue"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What colour?"}])
        assert second.output_text == ref.choices[0].message.content
        assert second.usage.input_tokens == ref.usage.prompt_tokens
        assert second.previous_response_id == first.id
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- failures

SCRIPT = "support.backends:ScriptBackend"   # a plain tep.Backend (no engine), no store


def test_failure_mid_stream_is_response_failed(live_server):
    url = live_server(SCRIPT)
    with httpx.stream("POST", url + "/v1/responses", timeout=60, json={
            "model": "script", "input": "boom-later", "stream": True}) as r:
        assert r.status_code == 200
        body = r.read().decode()
    events = [json.loads(b.split("\n", 1)[1][6:]) for b in body.split("\n\n") if b]
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types.count("response.output_text.delta") == 3
    assert types[-1] == "response.failed" and "response.completed" not in types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert "secret" not in body                     # no internal detail leaks
    # through the client: the failure arrives as its typed event
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    got = [e.type for e in c.responses.create(model="script", input="boom-later",
                                              stream=True)]
    assert got[-1] == "response.failed"
    # a failure before the first token is a plain 500 in the envelope
    r = httpx.post(url + "/v1/responses", json={"model": "script", "input": "boom",
                                                "stream": True})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text


def test_memory_store_keeps_nothing(live_server):
    url = live_server(SCRIPT)      # the tests' servers run with TEP_RESPONSES_STORE=:memory:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = c.responses.create(model="script", input="eos")
    assert r.status == "completed" and r.store is False and r.output_text
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="script", input="x", previous_response_id=r.id)


def test_bad_store_file_stops_the_server_at_start(tmp_path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is no database " * 1000)
    ro = tmp_path / "ro.sqlite3"
    proc, _ = _serve(ro)                 # a real store, then made read-only
    stop_process(proc)
    ro.chmod(0o444)
    for path, why in ((bad, "not a database"), (ro, "readonly")):
        r = subprocess.run([sys.executable, "-m", "tep", "serve", "--backend", TOY, "--port",
                            str(free_port()), "--responses-store", str(path)],
                           capture_output=True, text=True, timeout=120, env=child_env(),
                           preexec_fn=obey_file_modes)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and why in lines[0], r.stderr


def test_two_workers_share_the_store(tmp_path):
    store = tmp_path / "r.sqlite3"
    events = tmp_path / "events.jsonl"
    env = child_env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc, url = _serve(store, "--workers", "2", "--events-jsonl", str(events), env=env)
    try:
        firsts = []
        for k in range(12):   # a new connection each: the kernel spreads them
            r = httpx.post(url + "/v1/responses", json={
                "model": MODEL, "input": f"start {k}", "max_output_tokens": 3})
            assert r.status_code == 200
            firsts.append(r.json()["id"])
        for k, rid in enumerate(firsts):
            r = httpx.post(url + "/v1/responses", json={
                "model": MODEL, "input": f"next {k}", "previous_response_id": rid,
                "max_output_tokens": 3})
            assert r.status_code == 200, r.text
            got = httpx.get(f"{url}/v1/responses/{r.json()['id']}").json()
            assert got["previous_response_id"] == rid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)
    # both workers answered Responses requests (one events file each)
    served = [sum(1 for line in p.read_text().splitlines()
                  if '"eval"' in line and '"resp_' in line)
              for p in sorted(tmp_path.glob("events.*.jsonl"))]
    assert len(served) == 2 and all(n > 0 for n in served) and sum(served) == 24, served
