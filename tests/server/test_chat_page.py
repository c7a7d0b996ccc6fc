"""The chat page at ``GET /``: served (or not, ``--no-ui``) on both paths, self-contained,
and driven in a real browser (Debian's headless Chromium through selenium) against a live
``tep serve`` with the toy model: streaming, stop (cancelled server-side), TTFT and
tokens/s, the kept conversation, API keys and the JSON-schema toggle.

The browser tests skip only when Chromium, its driver or selenium is missing, and fail
instead when ``TEP_REQUIRE_BROWSER`` or ``CI`` is set (``.ci/run`` sets it and installs
``chromium chromium-driver``). ``TEP_CHAT_SCREENSHOT=path`` saves a screenshot of the page
after the conversation test (how docs/chat-page.png was made).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import jsonschema
import pytest

import tep
from support.process import free_port, child_env, start_process, stop_process
from support.prometheus import parse

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "sk-page-test"
CHAT = "/v1/chat/completions"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _need_browser() -> None:
    """Skip (locally) or fail (CI, TEP_REQUIRE_BROWSER) when the browser is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        msg = (f"browser test needs {', '.join(missing)} "
               "(apt-get install chromium chromium-driver)")
        if _truthy("TEP_REQUIRE_BROWSER") or _truthy("CI"):
            pytest.fail(msg + "; required here (TEP_REQUIRE_BROWSER / CI)")
        pytest.skip(msg)


# --------------------------------------------------------------------- without a browser

@pytest.mark.anyio
@pytest.mark.parametrize("fast_path", [True, False])
async def test_page_served_self_contained(fast_path):
    app = tep.create_app("toy", fast_path=fast_path)
    async with app.test_app() as t:
        c = t.test_client()
        r = await c.get("/")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        html = (await r.get_data()).decode()
        for el in ("model", "system", "temperature", "max-tokens", "json-mode", "schema",
                   "api-key", "send", "stop", "ttft", "tps"):
            assert f'id="{el}"' in html
        # nothing from elsewhere: no absolute URLs, no external scripts or styles
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}", html, re.I)
        assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", html, re.I)
        assert "fetch(\"v1/chat/completions\"" in html and "fetch(\"v1/models\"" in html
        # the other routes are unchanged
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/", json={})).status_code == 405
        doc = await (await c.get("/openapi.json")).get_json()
        assert "text/html" in doc["paths"]["/"]["get"]["responses"]["200"]["content"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["argument", "env"])
async def test_no_ui_is_a_404_in_the_envelope(how, monkeypatch):
    if how == "env":
        monkeypatch.setenv("TEP_UI", "0")
        app = tep.create_app("toy")
    else:
        app = tep.create_app("toy", ui=False)
    async with app.test_app() as t:
        c = t.test_client()
        r = await c.get("/")
        assert r.status_code == 404
        err = (await r.get_json())["error"]
        assert err["type"] == "invalid_request_error" and "GET '/'" in err["message"]
        assert (await c.get("/health")).status_code == 200
        r = await c.post(CHAT, json={"model": "tep-toy", "max_tokens": 3,
                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200


def test_cli_no_ui_option(monkeypatch):
    from tep.server.cli import _config_env, _parser
    from tep.serving.config import ServerConfig

    args = _parser().parse_args(["serve", "--no-ui"])
    env = _config_env(args)
    assert env["TEP_UI"] == "False"
    assert "TEP_UI" not in _config_env(_parser().parse_args(["serve"]))
    assert ServerConfig.from_env().ui is True
    monkeypatch.setenv("TEP_UI", env["TEP_UI"])   # how the option reaches the app
    assert ServerConfig.from_env().ui is False
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--ui"])   # only the negative spelling exists


# --------------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def servers():
    """``get(*extra)`` -> base URL of a live toy server with those extra options."""
    procs: dict[tuple, tuple[Any, str]] = {}

    def get(*extra: str) -> str:
        if extra not in procs:
            port = free_port()
            args = [sys.executable, "-m", "tep", "serve", "--backend", "toy", "--port",
                    str(port), "--max-concurrency", "2", "--graceful-timeout", "2", *extra]
            procs[extra] = start_process(args, port, child_env())
        return procs[extra][1]

    yield get
    for proc, _ in procs.values():
        stop_process(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,860",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    # the system driver, given explicitly: selenium then never looks for or downloads one
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def _wait(cond: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")


def _open(driver: Any, url: str) -> None:
    driver.get(url + "/")
    # record the request bodies the page sends (the page itself is not changed)
    _js(driver, """window.__bodies = []; const f = window.fetch;
        window.fetch = (u, o) => { if (o && o.body) window.__bodies.push(JSON.parse(o.body));
                                   return f(u, o); };""")


def _set(driver: Any, el_id: str, value: str) -> None:
    _js(driver, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('change'));", el_id, value)


def _last_reply(driver: Any) -> dict:
    return _js(driver, """const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m ? {text: m.querySelector('.content').textContent, state: m.dataset.state,
                    json: m.dataset.json || null, note: (m.querySelector('.note') || {}).textContent || null}
                 : null;""")


def _send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _stat(driver: Any, el_id: str) -> str:
    return _js(driver, "return document.getElementById(arguments[0]).textContent", el_id)


def _metrics(url: str) -> dict:
    return parse(httpx.get(url + "/metrics", timeout=10).text)


def _cancelled(m: dict) -> float:
    return sum(v for (name, labels), v in m.items() if name == "tep_requests_total"
               and dict(labels).get("endpoint") == CHAT
               and dict(labels).get("outcome") == "cancelled")


def _sampled(m: dict) -> float:
    return m[("tep_engine_tokens_sampled_total", ())]


def test_browser_streams_stops_and_keeps_the_conversation(servers, browser):
    url = servers()
    _open(browser, url)
    _wait(lambda: _js(browser, "return document.getElementById('model').options.length"),
          what="the model list")
    assert _js(browser, "return document.getElementById('model').value") == "tep-toy"

    # turn 1: a short reply that ends by itself
    _set(browser, "system", "You are terse.")
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", "40")
    _send(browser, "Hello there")
    _wait(lambda: _last_reply(browser)["state"] == "done", what="the first reply")
    first = _last_reply(browser)["text"]
    assert first
    assert _stat(browser, "ttft").endswith(" ms") and _stat(browser, "tps").endswith(" tok/s")
    assert int(_stat(browser, "ntokens")) >= 1

    # turn 2: a long stream, stopped in the middle
    before = _metrics(url)
    _set(browser, "max-tokens", "1000000")
    _send(browser, "Now talk for a long time")
    lengths: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(set(lengths)) < 5:
        r = _last_reply(browser)
        assert r["state"] == "streaming", r   # still going: it must not end by itself
        lengths.append(len(r["text"]))
        time.sleep(0.1)
    growth = sorted(set(lengths))
    assert len(growth) >= 5 and lengths == sorted(lengths), lengths[:50]  # grows, in steps
    assert _stat(browser, "ttft").endswith(" ms")
    browser.find_element("id", "stop").click()
    _wait(lambda: _last_reply(browser)["state"] == "stopped", what="the stopped state")
    stopped = _last_reply(browser)["text"]
    time.sleep(0.6)
    assert _last_reply(browser)["text"] == stopped, "text kept growing after stop"
    assert len(stopped) >= growth[-1]
    tps = _stat(browser, "tps")
    assert re.fullmatch(r"\d+(\.\d)? tok/s", tps) and float(tps.split()[0]) > 0
    assert _stat(browser, "finish") == "stopped"
    assert _js(browser, "return document.getElementById('send').disabled") is False

    # server side: the request ended as cancelled and the engine stopped sampling for it
    _wait(lambda: _cancelled(_metrics(url)) == _cancelled(before) + 1, timeout=10,
          what="outcome=cancelled in /metrics")
    s1 = _sampled(_metrics(url))
    time.sleep(0.5)
    s2 = _sampled(_metrics(url))
    assert s1 == s2, "the engine kept sampling after the page stopped"
    assert 0 < s2 - _sampled(before) < 1000000

    # turn 3: the conversation so far goes back with the next message
    _set(browser, "max-tokens", "5")
    _send(browser, "And now?")
    _wait(lambda: _last_reply(browser)["state"] == "done", what="the third reply")
    bodies = _js(browser, "return window.__bodies")
    assert len(bodies) == 3
    last = bodies[-1]
    assert last["model"] == "tep-toy" and last["stream"] is True
    assert last["temperature"] == 0 and last["max_tokens"] == 5
    assert "response_format" not in last
    assert last["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Now talk for a long time"},
        {"role": "assistant", "content": stopped},
        {"role": "user", "content": "And now?"}]
    assert len(browser.find_elements("css selector", ".msg")) == 6
    shot = os.environ.get("TEP_CHAT_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)


def test_browser_api_key_and_json_schema(servers, browser):
    url = servers("--api-key", KEY)
    _open(browser, url)
    # without the key the model list is a 401, said on the page
    _wait(lambda: "401" in _stat(browser, "status"), what="the 401 on the page")
    _set(browser, "api-key", KEY)   # 'change' reloads the models with the key
    _wait(lambda: _js(browser, "return document.getElementById('model').options.length"),
          what="the model list with the key")

    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["ok", "n", "tag"], "additionalProperties": False}
    browser.find_element("id", "json-mode").click()
    assert _js(browser, "return document.getElementById('schema').hidden") is False
    _set(browser, "schema", json.dumps(schema))
    _set(browser, "max-tokens", "200")
    _send(browser, "Give me JSON")
    _wait(lambda: _last_reply(browser)["state"] in ("done", "error"), what="the JSON reply")
    r = _last_reply(browser)
    assert r["state"] == "done", r
    jsonschema.validate(json.loads(r["text"]), schema)
    assert r["json"] == "valid"
    body = _js(browser, "return window.__bodies")[-1]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": schema, "strict": True}}

    # a schema that does not parse is refused on the page, nothing is sent
    _set(browser, "schema", "{not json")
    n = len(_js(browser, "return window.__bodies"))
    _send(browser, "again")
    _wait(lambda: "does not parse" in _stat(browser, "status"), what="the schema error")
    assert len(_js(browser, "return window.__bodies")) == n

    # a wrong key: the server's 401 message appears on the reply
    browser.find_element("id", "json-mode").click()
    _js(browser, "document.getElementById('api-key').value = 'wrong'")
    _send(browser, "hello")
    _wait(lambda: _last_reply(browser)["state"] == "error", what="the 401 reply")
    assert "401" in _last_reply(browser)["note"]
