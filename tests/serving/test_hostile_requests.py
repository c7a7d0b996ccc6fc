"""Requests that used to crash or mislead the server: each answers 4xx in the envelope
(or a correct 200), and the server keeps serving."""
from __future__ import annotations

import logging

import pytest
from support.backends import ScriptBackend
from support.http import client_for, post_json

from tep.backends.toy import ToyBackend

pytestmark = pytest.mark.anyio
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def _err(body: dict) -> dict:
    return body["error"]


@pytest.mark.parametrize("field,value", [
    ("top_p", 1e-300),               # positive in float64, 0 in float32
    ("top_p", 1e-46),
    ("top_k", 2**62),                # past the kernel's int32 range
    ("top_k", 2**70),
    ("repetition_penalty", 1e-300),  # would make the row +inf
    ("repetition_penalty", 1e-3),
    ("max_tokens", 2**70),
])
async def test_extreme_knobs_are_400_naming_the_field(field, value):
    async with client_for(ToyBackend()) as c:
        for path, extra in ((CMPL, {"prompt": "xxxxx"}),
                            (CHAT, {"messages": [{"role": "user", "content": "x"}]})):
            body = {"model": "tep-toy", "max_tokens": 1, "seed": 746, "top_k": 5,
                    "logprobs": 20 if path == CMPL else True, **extra, field: value}
            if path == CHAT:
                body["top_logprobs"] = 5
            status, out = await post_json(c, path, body)
            assert status == 400, (path, field, value, out)
            assert _err(out)["param"] == field
        # still serving
        status, _ = await post_json(c, CMPL, {"model": "tep-toy", "prompt": "xx",
                                              "max_tokens": 2})
        assert status == 200


async def test_the_reported_crash_request_is_a_400_and_the_server_lives():
    body = {"model": "tep-toy", "prompt": "xxxxx", "max_tokens": 1, "seed": 746,
            "top_k": 5, "top_p": 1e-300, "logprobs": 20}
    async with client_for(ToyBackend()) as c:
        assert (await post_json(c, CMPL, {**body, "top_p": 0.5}))[0] == 200
        status, out = await post_json(c, CMPL, body)
        assert status == 400 and _err(out)["param"] == "top_p"
        assert (await post_json(c, CMPL, {**body, "top_p": 0.5}))[0] == 200


async def test_max_tokens_limit_is_configurable_and_stated():
    async with client_for(ToyBackend(), max_tokens_limit=100) as c:
        status, out = await post_json(c, CMPL, {"model": "tep-toy", "prompt": "x",
                                                "max_tokens": 101})
        assert status == 400 and "100" in _err(out)["message"]
        assert (await post_json(c, CMPL, {"model": "tep-toy", "prompt": "x",
                                          "max_tokens": 100}))[0] == 200


async def test_max_tokens_default_comes_from_the_backends_context_size():
    class Small(ScriptBackend):
        def context_size(self, model):
            return 64

    async with client_for(Small()) as c:
        status, out = await post_json(c, CMPL, {"model": "script", "prompt": [9],
                                                "max_tokens": 65})
        assert status == 400 and "64" in _err(out)["message"]
        status, out = await post_json(c, CHAT, {"model": "script", "messages": [
            {"role": "user", "content": "hi"}]})  # chat default 256 is cut to 64
        assert status == 200


async def test_deeply_nested_json_is_a_400():
    async with client_for(ToyBackend()) as c:
        r = await c.post(CMPL, data=b"[" * 100_000 + b"]" * 100_000,
                         headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert _err(await r.get_json())["code"] == "invalid_json"


async def test_501_tells_the_openai_client_not_to_retry():
    import tep

    async with client_for(tep.Backend()) as c:
        r = await c.post(CHAT, json={"model": "m", "messages": [{"role": "user",
                                                                 "content": "x"}]})
        assert r.status_code == 501 and r.headers["x-should-retry"] == "false"


async def test_unknown_field_names_cannot_forge_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="tep.wire")
    async with client_for(ToyBackend()) as c:
        status, _ = await post_json(c, CMPL, {"model": "tep-toy", "prompt": "x",
                                              "max_tokens": 1,
                                              "a\nFAKE ERROR tep.server: pwned": 1})
        assert status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "tep.wire"]
    assert lines and all("\n" not in m for m in lines)
    assert any("FAKE ERROR" in m for m in lines)  # logged, escaped


async def test_client_request_ids_are_echoed_only_when_plain():
    async with client_for(ToyBackend()) as c:
        r = await c.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        assert r.headers["X-Request-Id"] == "abc-123"
        for bad in ("x" * 500, "has space", "fake\u2028line"):
            r = await c.get("/v1/models", headers={"X-Request-Id": bad})
            assert r.headers["X-Request-Id"].startswith("req-")


def test_events_cap_what_they_copy_from_a_request():
    from tep.backend import Sampling
    from tep.obs.telemetry import EVENT_ITEMS_MAX, EVENT_STR_MAX, sampling_dict

    d = sampling_dict(Sampling(stop=["s" * 1_000_000, "t"],
                               allowed_token_ids=list(range(10_000)),
                               logit_bias={i: 1.0 for i in range(5000)}))
    assert len(d["stop"][0]) <= EVENT_STR_MAX + 3
    assert len(d["allowed_token_ids"]) == EVENT_ITEMS_MAX + 1
    assert len(d["logit_bias"]) == EVENT_ITEMS_MAX + 1


async def test_echo_with_logprobs_only_the_first_prompt_token_is_null():
    async with client_for(ToyBackend()) as c:
        status, out = await post_json(c, CMPL, {"model": "tep-toy", "prompt": "hello",
                                                "max_tokens": 2, "echo": True,
                                                "logprobs": 2, "seed": 1})
    assert status == 200
    lps = out["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None and all(isinstance(x, float) for x in lps[1:])
    assert len(lps) == 5 + 2


async def test_echo_with_logprobs_is_a_400_without_prompt_logprobs():
    import tep

    class NoPromptLogprobs(tep.Backend):
        def list_models(self):
            return ["m"]

        def detokenize(self, model, ids):
            return "x" * len(ids)

        def generate_stream_from_tokens(self, model, token_ids, sampling, sink):
            sink.emit_token("y", token_id=1, logprob=-1.0)

    async with client_for(NoPromptLogprobs()) as c:
        status, out = await post_json(c, CMPL, {"model": "m", "prompt": [9, 9],
                                                "max_tokens": 2, "echo": True,
                                                "logprobs": 1})
        assert status == 400 and _err(out)["param"] == "echo"
        status, out = await post_json(c, CMPL, {"model": "m", "prompt": [9, 9],
                                                "max_tokens": 2, "echo": True})
        assert status == 200 and out["choices"][0]["text"] == "xxy"


async def test_a_backend_without_logprobs_is_a_400_not_silent_nulls():
    import tep

    class NoLogprobs(tep.Backend):
        def list_models(self):
            return ["m"]

        def generate_stream_from_tokens(self, model, token_ids, sampling, sink):
            for _ in range(3):
                if not sink.emit_token("a", token_id=1):
                    return

    async with client_for(NoLogprobs()) as c:
        for stream in (False, True):
            r = await c.post(CMPL, json={"model": "m", "prompt": [1], "max_tokens": 3,
                                         "logprobs": 1, "stream": stream})
            assert r.status_code == 400, await r.get_data()
            assert _err(await r.get_json())["param"] == "logprobs"
        status, out = await post_json(c, CMPL, {"model": "m", "prompt": [1], "max_tokens": 3})
        assert status == 200 and out["choices"][0]["text"] == "aaa"
