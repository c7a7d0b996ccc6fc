"""Quart test-client tests: every route and every error class, on test backends."""
from __future__ import annotations

import base64
import logging

import numpy as np
import pytest
from support.backends import (BrokenModelsBackend, CompletionOnlyBackend, ScriptBackend,
                             StreamOnlyNoDetok)
from support.http import (check_stream_rules, client_for, post_json, post_stream,
                            stream_text)

import tep

pytestmark = pytest.mark.anyio

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"


def _err(body, status_type="invalid_request_error"):
    assert set(body) == {"error"}
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert isinstance(e["message"], str) and e["message"]
    assert e["type"] == status_type
    return e


# ------------------------------------------------------------------ metadata routes

async def test_health_models_and_model():
    async with client_for(ScriptBackend()) as c:
        r = await c.get("/health")
        assert r.status_code == 200 and (await r.get_json())["status"] == "ok"
        r = await c.get("/v1/models")
        body = await r.get_json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["script", "other/model"]
        assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])
        r = await c.get("/v1/models/other/model")
        assert r.status_code == 200 and (await r.get_json())["id"] == "other/model"
        r = await c.get("/v1/models/nope")
        assert r.status_code == 404
        e = _err(await r.get_json())
        assert e["code"] == "model_not_found" and e["param"] == "model"
        assert r.headers["X-Request-Id"]


async def test_openapi_describes_every_endpoint():
    async with client_for(ScriptBackend()) as c:
        doc = await (await c.get("/openapi.json")).get_json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for p in ("/health", "/v1/models", "/v1/models/{model_id}", CMPL, CHAT, EMB):
        assert p in paths
    for p in (CMPL, CHAT, EMB):
        ref = paths[p]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert "model" in schema["required"]
        assert {"400", "404", "413", "500", "501"} <= set(paths[p]["post"]["responses"])


async def test_bare_backend_serves_without_crashing():
    async with client_for(tep.Backend()) as c:
        assert (await (await c.get("/v1/models")).get_json())["data"] == []
        st, body = await post_json(c, CMPL, {"model": "m", "prompt": [1, 2]})
        assert st == 404 and _err(body)["code"] == "model_not_found"
        st, body = await post_json(c, CHAT, {"model": "m", "messages": [{"role": "user",
                                                                          "content": "hi"}]})
        assert st == 501 and _err(body, "not_implemented_error")
        st, body = await post_json(c, EMB, {"model": "m", "input": [1]})
        assert st == 501 and _err(body, "not_implemented_error")


async def test_bare_backend_defaults():
    b = tep.Backend()
    s = tep.Sampling()
    c = b.generate_from_tokens("m", [1], s)
    assert c.text == "" and c.finish_reason == "stop"
    assert b.list_models() == [] and not b.supports_chat() and not b.supports_embeddings()
    assert b.device_kind() == "cpu" and b.generate_embeddings("m", [1]).shape == (0,)
    assert not b.supports_tokenize() and not b.supports_detokenize()


# ------------------------------------------------------------------ completions

async def test_completion_shape_usage_and_determinism():
    body = {"model": "script", "prompt": [10, 11, 12], "max_tokens": 7, "seed": 5}
    async with client_for(ScriptBackend()) as c:
        st, a = await post_json(c, CMPL, body)
        st2, b = await post_json(c, CMPL, body)
    assert st == st2 == 200
    assert a["id"].startswith("cmpl-") and a["object"] == "text_completion"
    assert isinstance(a["created"], int) and a["model"] == "script"
    (ch,) = a["choices"]
    assert ch["index"] == 0 and len(ch["text"]) == 7 and ch["finish_reason"] == "length"
    assert ch["logprobs"] is None
    assert a["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


async def test_completion_batch_prompts_times_n_indexing():
    prompts = [[10, 11], [20, 21, 22]]
    async with client_for(ScriptBackend()) as c:
        st, out = await post_json(c, CMPL, {"model": "script", "prompt": prompts, "n": 2,
                                            "max_tokens": 6, "seed": 1})
        singles = []
        for p in prompts:
            for j in range(2):
                _, o = await post_json(c, CMPL, {"model": "script", "prompt": p,
                                                 "max_tokens": 6, "seed": 1 + j})
                singles.append(o["choices"][0]["text"])
    assert st == 200
    assert [ch["index"] for ch in out["choices"]] == [0, 1, 2, 3]
    # choice j of prompt p uses seed + j; choices are prompt-major
    assert [ch["text"] for ch in out["choices"]] == singles
    assert len(set(singles)) == 4
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 24


async def test_text_prompt_uses_tokenize_and_ids_only_backend_refuses():
    async with client_for(ScriptBackend()) as c:
        st, a = await post_json(c, CMPL, {"model": "script", "prompt": "hi", "seed": 2})
        _, b = await post_json(c, CMPL, {"model": "script", "prompt": [104, 105], "seed": 2})
        assert st == 200 and a["choices"][0]["text"] == b["choices"][0]["text"]
        st, a = await post_json(c, CMPL, {"model": "script", "prompt": ["hi", "yo"]})
        assert st == 200 and len(a["choices"]) == 2
    async with client_for(StreamOnlyNoDetok()) as c:
        st, body = await post_json(c, CMPL, {"model": "ids-only", "prompt": "hello"})
        assert st == 400
        e = _err(body)
        assert "token IDs" in e["message"] and e["param"] == "prompt"
        st, body = await post_json(c, CMPL, {"model": "ids-only", "prompt": [1], "echo": True})
        assert st == 501 and _err(body, "not_implemented_error")["param"] == "echo"


async def test_logprobs_completion_shape():
    async with client_for(ScriptBackend()) as c:
        st, a = await post_json(c, CMPL, {"model": "script", "prompt": [9], "max_tokens": 4,
                                          "seed": 3, "logprobs": 2})
    lp = a["choices"][0]["logprobs"]
    text = a["choices"][0]["text"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == text
    assert lp["token_logprobs"] == [-0.5] * 4
    assert all(isinstance(d, dict) and len(d) == 2 for d in lp["top_logprobs"])
    assert lp["text_offset"] == [0, 1, 2, 3]
    for tok, d in zip(lp["tokens"], lp["top_logprobs"]):
        assert d[tok] == -0.5


async def test_logprob_alternatives_given_as_ids_without_detokenize():
    async with client_for(StreamOnlyNoDetok()) as c:
        st, a = await post_json(c, CMPL, {"model": "ids-only", "prompt": [1], "max_tokens": 2,
                                          "logprobs": 2})
    assert st == 200
    assert a["choices"][0]["logprobs"]["top_logprobs"][0] == {"token_id:120": -1.0,
                                                              "token_id:121": -2.0}


async def test_echo_with_and_without_logprobs():
    async with client_for(ScriptBackend()) as c:
        _, plain = await post_json(c, CMPL, {"model": "script", "prompt": [104, 105],
                                             "max_tokens": 3, "seed": 4})
        _, echo = await post_json(c, CMPL, {"model": "script", "prompt": [104, 105],
                                            "max_tokens": 3, "seed": 4, "echo": True,
                                            "logprobs": 1})
        _, echo0 = await post_json(c, CMPL, {"model": "script", "prompt": "hey",
                                             "max_tokens": 0, "echo": True})
    gen = plain["choices"][0]["text"]
    assert echo["choices"][0]["text"] == "hi" + gen
    lp = echo["choices"][0]["logprobs"]
    # only the first prompt token has no logprob (nothing precedes it)
    assert lp["tokens"][:2] == ["h", "i"] and lp["token_logprobs"][:2] == [None, -0.25]
    assert lp["top_logprobs"][:2] == [None, {"i": -0.25}]
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert echo0["choices"][0]["text"] == "hey"
    assert echo0["choices"][0]["finish_reason"] == "length"
    assert echo0["usage"]["completion_tokens"] == 0


async def test_stop_strings_and_stop_token_ids():
    body = {"model": "script", "prompt": [10], "max_tokens": 30, "seed": 9}
    async with client_for(ScriptBackend()) as c:
        _, full = await post_json(c, CMPL, body)
        text = full["choices"][0]["text"]
        stop = text[10:12]
        cut = text.index(stop)
        _, s1 = await post_json(c, CMPL, {**body, "stop": [stop, "never-happens"]})
        assert s1["choices"][0]["text"] == text[:cut]
        assert s1["choices"][0]["finish_reason"] == "stop"
        # a stop token: text ends before its first occurrence, the token is counted
        tid = ord(text[5])
        first = text.index(text[5])
        _, s2 = await post_json(c, CMPL, {**body, "stop_token_ids": [tid]})
        assert s2["choices"][0]["text"] == text[:first]
        assert s2["choices"][0]["finish_reason"] == "stop"
        assert s2["usage"]["completion_tokens"] == first + 1
        # streaming gives the same text (held-back prefixes of stop strings included)
        st, ev, _ = await post_stream(c, CMPL, {**body, "stop": [stop]})
        check_stream_rules(ev, 1, chat=False, include_usage=False)
        assert stream_text(ev, chat=False)[0] == text[:cut]


async def test_backend_eos_finish_stop():
    async with client_for(ScriptBackend()) as c:
        _, a = await post_json(c, CMPL, {"model": "script", "prompt": [4], "max_tokens": 50})
    assert a["choices"][0]["finish_reason"] == "stop" and len(a["choices"][0]["text"]) == 5


@pytest.mark.parametrize("n,include_usage,logprobs", [(1, False, None), (2, True, 2),
                                                      (3, True, None)])
async def test_completion_stream_rules_and_equality(n, include_usage, logprobs):
    body = {"model": "script", "prompt": [[7, 8], [9]], "max_tokens": 9, "seed": 11, "n": n,
            "logprobs": logprobs}
    async with client_for(ScriptBackend()) as c:
        _, full = await post_json(c, CMPL, body)
        sbody = dict(body)
        if include_usage:
            sbody["stream_options"] = {"include_usage": True}
        st, ev, _ = await post_stream(c, CMPL, sbody)
    assert st == 200
    check_stream_rules(ev, 2 * n, chat=False, include_usage=include_usage)
    texts = stream_text(ev, chat=False)
    assert texts == {ch["index"]: ch["text"] for ch in full["choices"]}
    if include_usage:
        assert ev[-2]["usage"] == full["usage"]
    if logprobs:
        toks: dict[int, list] = {}
        for e in ev[:-1]:
            for ch in e["choices"]:
                if ch["logprobs"]:
                    toks.setdefault(ch["index"], []).extend(ch["logprobs"]["tokens"])
        assert {i: "".join(t) for i, t in toks.items()} == texts


async def test_stream_echo_and_max_tokens_zero():
    async with client_for(ScriptBackend()) as c:
        _, full = await post_json(c, CMPL, {"model": "script", "prompt": "ab", "echo": True,
                                            "max_tokens": 4, "seed": 1, "logprobs": 1})
        st, ev, _ = await post_stream(c, CMPL, {"model": "script", "prompt": "ab", "echo": True,
                                                "max_tokens": 4, "seed": 1, "logprobs": 1})
        check_stream_rules(ev, 1, chat=False, include_usage=False)
        assert stream_text(ev, chat=False)[0] == full["choices"][0]["text"]
        offsets = [o for e in ev[:-1] for ch in e["choices"] if ch["logprobs"]
                   for o in ch["logprobs"]["text_offset"]]
        assert offsets == full["choices"][0]["logprobs"]["text_offset"]
        st, ev, _ = await post_stream(c, CMPL, {"model": "script", "prompt": [1],
                                                "max_tokens": 0})
        check_stream_rules(ev, 1, chat=False, include_usage=False)


# ------------------------------------------------------------------ chat

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


async def test_chat_shape_and_logprobs():
    async with client_for(ScriptBackend()) as c:
        st, a = await post_json(c, CHAT, {"model": "script", "messages": MSGS, "max_tokens": 5,
                                          "seed": 1, "logprobs": True, "top_logprobs": 2})
    assert st == 200
    assert a["id"].startswith("chatcmpl-") and a["object"] == "chat.completion"
    (ch,) = a["choices"]
    assert ch["message"]["role"] == "assistant" and len(ch["message"]["content"]) == 5
    assert ch["finish_reason"] == "length"
    content = ch["logprobs"]["content"]
    assert len(content) == 5
    for item, char in zip(content, ch["message"]["content"]):
        assert item["token"] == char and item["logprob"] == -0.5
        assert item["bytes"] == list(char.encode())
        assert len(item["top_logprobs"]) == 2
        assert set(item["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert a["usage"]["prompt_tokens"] == len("be brief") + len("hello")
    assert a["usage"]["completion_tokens"] == 5


async def test_chat_default_max_tokens_and_max_completion_tokens():
    async with client_for(ScriptBackend(), chat_max_tokens=12) as c:
        _, a = await post_json(c, CHAT, {"model": "script", "messages": MSGS, "seed": 1})
        _, b = await post_json(c, CHAT, {"model": "script", "messages": MSGS, "seed": 1,
                                         "max_completion_tokens": 3})
    assert len(a["choices"][0]["message"]["content"]) == 12
    assert len(b["choices"][0]["message"]["content"]) == 3


@pytest.mark.parametrize("n,include_usage", [(1, False), (2, True)])
async def test_chat_stream_rules_and_equality(n, include_usage):
    body = {"model": "script", "messages": MSGS, "max_tokens": 6, "seed": 2, "n": n}
    async with client_for(ScriptBackend()) as c:
        _, full = await post_json(c, CHAT, body)
        sbody = {**body, **({"stream_options": {"include_usage": True}} if include_usage else {})}
        st, ev, _ = await post_stream(c, CHAT, sbody)
    check_stream_rules(ev, n, chat=True, include_usage=include_usage)
    assert stream_text(ev, chat=True) == {ch["index"]: ch["message"]["content"]
                                          for ch in full["choices"]}
    if include_usage:
        assert ev[-2]["usage"] == full["usage"]


async def test_chat_validation():
    async with client_for(ScriptBackend()) as c:
        for body, param in [
            ({"model": "script"}, "messages"),
            ({"model": "script", "messages": []}, "messages"),
            ({"model": "script", "messages": [{"content": "x"}]}, "messages[0]"),
            ({"model": "script", "messages": [{"role": "user", "content": 3}]},
             "messages[0].content"),
            ({"model": "script", "messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
            ({"model": "script", "messages": MSGS, "logprobs": True, "top_logprobs": 21},
             "top_logprobs"),
        ]:
            st, b = await post_json(c, CHAT, body)
            assert st == 400, body
            assert _err(b)["param"] == param


async def test_derived_streaming_from_non_streaming_backend():
    async with client_for(CompletionOnlyBackend()) as c:
        _, full = await post_json(c, CMPL, {"model": "fixed", "prompt": [1], "stop": ["STOP"]})
        assert full["choices"][0]["text"] == "hello world "
        assert full["choices"][0]["finish_reason"] == "stop"
        st, ev, _ = await post_stream(c, CMPL, {"model": "fixed", "prompt": [1],
                                                "stop": ["STOP"]})
        check_stream_rules(ev, 1, chat=False, include_usage=False)
        assert stream_text(ev, chat=False)[0] == "hello world "
        _, chat = await post_json(c, CHAT, {"model": "fixed", "messages": MSGS})
        assert chat["choices"][0]["message"]["content"] == "fixed answer"
        assert chat["usage"]["prompt_tokens"] == 7
        st, ev, _ = await post_stream(c, CHAT, {"model": "fixed", "messages": MSGS,
                                                "stream_options": {"include_usage": True}})
        check_stream_rules(ev, 1, chat=True, include_usage=True)
        assert stream_text(ev, chat=True)[0] == "fixed answer"
        assert ev[-2]["usage"]["prompt_tokens"] == 7


# ------------------------------------------------------------------ embeddings

async def test_embeddings_float_base64_dimensions_usage():
    async with client_for(ScriptBackend()) as c:
        st, f = await post_json(c, EMB, {"model": "script", "input": [[1 + 1, 3], [4, 5, 6]]})
        assert st == 200 and f["object"] == "list" and f["model"] == "script"
        assert [d["index"] for d in f["data"]] == [0, 1]
        assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in f["data"])
        assert f["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
        _, b = await post_json(c, EMB, {"model": "script", "input": [[2, 3], [4, 5, 6]],
                                        "encoding_format": "base64"})
        for fd, bd in zip(f["data"], b["data"]):
            v = np.frombuffer(base64.b64decode(bd["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(v, np.array(fd["embedding"], dtype=np.float32))
        _, d = await post_json(c, EMB, {"model": "script", "input": [2, 3], "dimensions": 3})
        v = np.array(d["data"][0]["embedding"])
        full = np.array(f["data"][0]["embedding"])
        assert v.shape == (3,)
        np.testing.assert_allclose(v, full[:3] / np.linalg.norm(full[:3]), rtol=1e-6)
        _, t = await post_json(c, EMB, {"model": "script", "input": ["hi", "yo"]})
        assert len(t["data"]) == 2 and t["usage"]["prompt_tokens"] == 4
        st, e = await post_json(c, EMB, {"model": "script", "input": [2], "dimensions": 9})
        assert st == 400 and _err(e)["param"] == "dimensions"
        for bad, param in [({"input": []}, "input"), ({"input": [[1], "x"]}, "input"),
                           ({"input": [1], "encoding_format": "int8"}, "encoding_format"),
                           ({"input": [1], "dimensions": 0}, "dimensions"),
                           ({"input": [-1]}, "input")]:
            st, e = await post_json(c, EMB, {"model": "script", **bad})
            assert st == 400 and _err(e)["param"] == param, bad
        st, e = await post_json(c, EMB, {"model": "script", "input": [1]})
        assert st == 500 and "embedding boom" not in e["error"]["message"]


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0),
    ("top_p", 1.5), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", True), ("n", 0),
    ("n", 1000), ("logprobs", 21), ("top_k", -2), ("min_p", 2), ("presence_penalty", 3),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("seed", "x"), ("seed", 2**64),
    ("stop", [1]), ("stop", ["a"] * 17), ("stop_token_ids", [-1]), ("logit_bias", {"a": 1}),
    ("logit_bias", {"5": 101}), ("logit_bias", [1]), ("echo", "yes"), ("stream", 1),
    ("prompt", []), ("prompt", [1, "a"]), ("prompt", [[1], [-2]]), ("prompt", 5),
    ("model", 3), ("user", 5), ("allowed_token_ids", []),
])
async def test_validation_400_names_param(field, value):
    body = {"model": "script", "prompt": [1], field: value}
    async with client_for(ScriptBackend()) as c:
        st, b = await post_json(c, CMPL, body)
    assert st == 400, (field, value, b)
    assert _err(b)["param"] == field


async def test_malformed_bodies_400():
    async with client_for(ScriptBackend()) as c:
        for raw in (b"{bad json", b"[1, 2]", b'"str"', b"", b'{"model": "script", '
                    b'"prompt": [1], "temperature": NaN}', b"\xff\xfe"):
            r = await c.post(CMPL, data=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, raw
            assert _err(await r.get_json())["code"] == "invalid_json"
        st, b = await post_json(c, CMPL, {"prompt": [1]})
        assert st == 400 and _err(b)["param"] == "model"
        st, b = await post_json(c, CMPL, {"model": "script"})
        assert st == 400 and _err(b)["param"] == "prompt"
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [1],
                                          "stream_options": {"include_usage": True}})
        assert st == 400 and _err(b)["param"] == "stream_options"


async def test_unknown_fields_ignored_with_log(caplog):
    caplog.set_level(logging.INFO, logger="tep")
    async with client_for(ScriptBackend()) as c:
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [9], "max_tokens": 2,
                                          "frobnicate": 1, "zzz": {}})
    assert st == 200
    assert any("frobnicate" in r.getMessage() and "zzz" in r.getMessage()
               and b["id"] in r.getMessage() for r in caplog.records)


async def test_unsupported_parameters_501():
    async with client_for(ScriptBackend()) as c:
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [1], "suffix": "x"})
        assert st == 501 and _err(b, "not_implemented_error")["param"] == "suffix"
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [1], "best_of": 3})
        assert st == 501


async def test_unknown_model_route_method_404_405():
    async with client_for(ScriptBackend()) as c:
        st, b = await post_json(c, CMPL, {"model": "gpt-9", "prompt": [1]})
        assert st == 404 and _err(b)["code"] == "model_not_found"
        st, b = await post_json(c, CHAT, {"model": "gpt-9", "messages": MSGS})
        assert st == 404
        st, b = await post_json(c, EMB, {"model": "gpt-9", "input": [1]})
        assert st == 404
        r = await c.get("/v1/nothing-here")
        assert r.status_code == 404 and _err(await r.get_json())["code"] == "not_found"
        for method, path in (("GET", CMPL), ("GET", CHAT), ("PUT", EMB), ("POST", "/v1/models"),
                             ("DELETE", "/health")):
            r = await c.open(path, method=method)
            assert r.status_code == 405, (method, path)
            assert _err(await r.get_json())["code"] == "method_not_allowed"


async def test_body_too_large_413():
    async with client_for(ScriptBackend(), max_body_bytes=4096) as c:
        big = {"model": "script", "prompt": list(range(3000))}
        st, b = await post_json(c, CMPL, big)
        assert st == 413 and _err(b)["code"] == "request_too_large"
        st, _ = await post_json(c, CMPL, {"model": "script", "prompt": [7, 8], "max_tokens": 1})
        assert st == 200


async def test_default_body_limit_takes_long_token_prompts():
    ids = [123456] * 1_000_000  # ~7 MB of JSON
    async with client_for(StreamOnlyNoDetok()) as c:
        st, b = await post_json(c, CMPL, {"model": "ids-only", "prompt": ids, "max_tokens": 1})
    assert st == 200 and b["usage"]["prompt_tokens"] == 1_000_000


async def test_backend_exception_500_logged_no_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="tep")
    async with client_for(ScriptBackend()) as c:
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [1]})
        assert st == 500
        e = _err(b, "server_error")
        assert "secret" not in e["message"] and "Traceback" not in e["message"]
        rid = e["message"].rsplit(" ", 1)[1]
        assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)
        # a stream that fails before its first token is also a plain 500
        st, ev, _ = await post_stream(c, CMPL, {"model": "script", "prompt": [1]})
        assert st == 500 and _err(ev[0], "server_error")
        st, ev, _ = await post_stream(c, CHAT, {"model": "script", "messages": [
            {"role": "user", "content": "boom"}]})
        assert st == 500
        # a backend may raise an API error of its own
        st, b = await post_json(c, CMPL, {"model": "script", "prompt": [5]})
        assert st == 400 and _err(b)["param"] == "prompt"


async def test_list_models_failure_is_500_envelope():
    async with client_for(BrokenModelsBackend()) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 500
        assert "exploded" not in _err(await r.get_json(), "server_error")["message"]


@pytest.mark.parametrize("path,body", [
    (CMPL, {"model": "script", "prompt": [2], "max_tokens": 50}),
    (CHAT, {"model": "script", "messages": [{"role": "user", "content": "boom-later"}]}),
])
async def test_mid_stream_error_event_then_done(path, body):
    async with client_for(ScriptBackend()) as c:
        st, ev, _ = await post_stream(c, path, body)
    assert st == 200
    assert ev[-1] == "[DONE]" and ev.count("[DONE]") == 1
    err = ev[-2]
    assert set(err) == {"error"} and err["error"]["type"] == "server_error"
    assert "secret" not in err["error"]["message"]
    assert len(ev) >= 5  # some tokens made it out first


async def test_api_key_401():
    async with client_for(ScriptBackend(), api_keys=("sekrit",)) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and _err(await r.get_json())["code"] == "invalid_api_key"
        r = await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_backend_runs_on_pool_threads_not_event_loop():
    ScriptBackend.threads.clear()
    async with client_for(ScriptBackend(), max_concurrency=3) as c:
        await post_json(c, CMPL, {"model": "script", "prompt": [9], "max_tokens": 2})
        await post_stream(c, CMPL, {"model": "script", "prompt": [9], "max_tokens": 2})
        await post_json(c, CHAT, {"model": "script", "messages": MSGS, "max_tokens": 2})
    assert ScriptBackend.threads
    assert all(t.startswith("tep-backend") for t in ScriptBackend.threads)


async def test_concurrent_streams_interleave():
    ScriptBackend.events.clear()
    import asyncio

    async with client_for(ScriptBackend(), max_concurrency=2) as c:
        body = {"model": "script", "prompt": [3], "max_tokens": 10}
        results = await asyncio.gather(post_stream(c, CMPL, body), post_stream(c, CMPL, body))
    for st, ev, _ in results:
        assert st == 200 and len(stream_text(ev, chat=False)[0]) == 10
    slow = [e for e in ScriptBackend.events if e["mode"] == "slow"]
    assert len(slow) == 2
    assert max(e["start"] for e in slow) < min(e["end"] for e in slow)
