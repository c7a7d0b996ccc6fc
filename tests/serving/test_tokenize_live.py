"""``/tokenize``, ``/detokenize``, ``/apply-template`` and ``GET /v1/models/{id}`` on a live
toy server: both spellings (llama-server's ``content``/``add_special``/``with_pieces``,
vLLM's ``prompt``/``messages``), pieces of partial UTF-8 as byte lists, the chat prompt
equal to what chat generation counts, and hostile bodies answered with 400/404."""
from __future__ import annotations

import httpx
import pytest

TOY = "tep.backends.toy:ToyEngineBackend"
MODEL = "tep-toy"
TEXTS = ["Hello, world!", "", "naïve café — 東京 🚀", "<|user|>\nspecial?\n", "a" * 3000]


@pytest.fixture(scope="module")
def h(live_server):
    with httpx.Client(base_url=live_server(TOY), timeout=60) as c:
        yield c


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_round_trip(h, text):
    r = h.post("/tokenize", json={"content": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list(text.encode()) and body["count"] == len(text.encode())
    assert body["max_model_len"] is None            # the toy has no context limit
    assert h.post("/tokenize", json={"model": MODEL, "prompt": text,
                                     "add_special_tokens": True}).json()["tokens"] == \
        body["tokens"]
    back = h.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"content": text, "prompt": text}


def test_pieces_spell_bytes(h):
    text = "é🚀x"
    toks = h.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    raw = text.encode()
    assert [t["id"] for t in toks] == list(raw)
    # byte-level tokens: a lone byte of a multi-byte character is not UTF-8 -> its bytes
    assert toks[-1] == {"id": ord("x"), "piece": "x"}
    assert toks[0] == {"id": raw[0], "piece": [raw[0]]}
    joined = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list)
                      else t["piece"].encode() for t in toks)
    assert joined == raw


def test_messages_prompt_is_the_chat_prompt(h):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hi there"}]
    prompt = h.post("/apply-template", json={"messages": msgs}).json()["prompt"]
    assert prompt == "<|system|>\nsys\n<|user|>\nHi there\n<|assistant|>\n"
    toks = h.post("/tokenize", json={"messages": msgs}).json()
    assert toks["tokens"] == list(prompt.encode())
    chat = h.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                "max_tokens": 2, "seed": 1}).json()
    assert chat["usage"]["prompt_tokens"] == toks["count"]
    # with tools, the tools are part of the rendered prompt (the toy template has no
    # tools variable, so they arrive as a system instruction), as chat renders them
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    p2 = h.post("/apply-template", json={"messages": msgs, "tools": tools}).json()["prompt"]
    assert '"name": "f"' in p2 and p2.endswith("<|assistant|>\n")
    n2 = h.post("/tokenize", json={"messages": msgs, "tools": tools}).json()["count"]
    chat2 = h.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                 "tools": tools, "max_tokens": 2,
                                                 "seed": 1}).json()
    assert n2 == len(p2.encode()) == chat2["usage"]["prompt_tokens"]


def test_model_card_has_context_length(h):
    card = h.get(f"/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"]
    assert "context_length" in card and card["max_model_len"] == card["context_length"]
    listed = h.get("/v1/models").json()["data"][0]
    assert listed == card
    assert h.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize("path,body,status", [
    ("/tokenize", {}, 400),
    ("/tokenize", {"content": 5}, 400),
    ("/tokenize", {"content": "a", "prompt": "b"}, 400),
    ("/tokenize", {"content": "a", "with_pieces": "yes"}, 400),
    ("/tokenize", {"content": "a", "add_special": 1}, 400),
    ("/tokenize", {"content": "a", "add_special": True, "add_special_tokens": False}, 400),
    ("/tokenize", {"content": "a", "model": "nope"}, 404),
    ("/tokenize", {"messages": "hi"}, 400),
    ("/tokenize", {"messages": [{"role": "user", "content": 3}]}, 400),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special": True}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
    ("/detokenize", {"tokens": [1, -2]}, 400),
    ("/detokenize", {"tokens": [1, 2.5]}, 400),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {}, 400),
    ("/apply-template", {}, 400),
    ("/apply-template", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400),
    ("/apply-template", {"messages": [{"role": "user", "content": "x"}],
                         "add_generation_prompt": False}, 400),
    ("/apply-template", {"messages": [{"role": "user", "content": "x"}],
                         "tools": [{"type": "function", "function": {"name": "f"}}],
                         "tool_choice": {"type": "function", "function": {"name": "g"}}},
     400),
])
def test_hostile_text_requests(h, path, body, status):
    r = h.post(path, json=body)
    assert r.status_code == status, (body, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert h.post("/tokenize", json={"content": "ok"}).json()["count"] == 2


def test_garbage_bodies(h):
    for raw in (b"[]", b"null", b"{", b"\xff\xfe"):
        for path in ("/tokenize", "/detokenize", "/apply-template"):
            r = h.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, raw)
    assert h.get("/tokenize").status_code == 405
