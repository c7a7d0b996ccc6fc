"""API keys (tep.serving.auth): Bearer on /v1, several keys, constant-time check, principal IDs
in events that do not reveal the key, and the openai client's AuthenticationError."""
from __future__ import annotations

import json

import openai
import pytest
from support.backends import ScriptBackend
from support.http import client_for

from tep.serving.auth import KeyChecker, principal_id
from tep.serving.config import ServerConfig

CMPL = "/v1/completions"
BODY = {"model": "script", "prompt": [9], "max_tokens": 2}


def test_key_checker():
    kc = KeyChecker(["alpha", "beta-key"])
    assert kc.enabled and not KeyChecker([]).enabled
    assert kc.check("Bearer alpha") == principal_id("alpha")
    assert kc.check("bearer beta-key") == principal_id("beta-key")
    for bad in (None, "", "alpha", "Basic alpha", "Bearer alph", "Bearer alphaa", "Bearer "):
        assert kc.check(bad) is None
    pid = principal_id("alpha")
    assert pid.startswith("key-") and "alpha" not in pid and pid != principal_id("beta-key")
    assert principal_id("alpha") == pid  # stable across processes and restarts


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("TEP_API_KEYS", "a, b ,,c")
    cfg = ServerConfig.from_env()
    assert cfg.all_api_keys() == ("a", "b", "c")
    assert cfg.public()["api_keys"] == 3 and "\"a\"" not in json.dumps(cfg.public())
    assert ServerConfig.from_env(api_keys=["x"]).all_api_keys() == ("x",)


@pytest.mark.anyio
async def test_two_keys_and_public_routes(tmp_path):
    path = tmp_path / "ev.jsonl"
    async with client_for(ScriptBackend(), api_keys=["k-one", "k-two"],
                          events_jsonl=str(path)) as c:
        for hdr in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k-one"}):
            r = await c.post(CMPL, json=BODY, headers=hdr)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            err = (await r.get_json())["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        for key in ("k-one", "k-two"):
            r = await c.post(CMPL, json=BODY, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        for public in ("/health", "/metrics", "/openapi.json"):
            assert (await c.get(public)).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
    text = path.read_text()
    assert "k-one" not in text and "k-two" not in text
    evals = [e["extra"] for e in map(json.loads, text.splitlines()) if e["event"] == "eval"]
    assert [e["principal_id"] for e in evals[-2:]] == [principal_id("k-one"),
                                                        principal_id("k-two")]
    assert [e["status"] for e in evals] == [401, 401, 401, 200, 200]


def test_openai_client_authentication_error(live_server):
    url = live_server("support.backends:ScriptBackend", "--api-key", "s3cret",
                      "--api-key", "other")
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.completions.create(model="script", prompt=[9], max_tokens=2)
    assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
    for key in ("s3cret", "other"):
        good = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
        assert good.completions.create(model="script", prompt=[9], max_tokens=2).choices
