"""schemathesis against the app's own OpenAPI document (/openapi.json) on a live toy
server: valid and invalid requests to every operation; never a 5xx, and every error
(status >= 400) is the OpenAI envelope (Anthropic's on /v1/messages).

"No 5xx" means no server failure: 501 is allowed only where the document declares it
(docs/WIRE.md: an unsupported capability or parameter, e.g. ``suffix``, is a 501).

The operations are driven through ``APIOperation.as_strategy`` and hypothesis directly
(one pytest test per operation and generation mode) rather than through schemathesis'
pytest plugin, which does not work with the pytest this project uses."""
from __future__ import annotations

import os

import pytest

if os.environ.get("CI"):  # a required suite: never skipped in CI
    import hypothesis
    import schemathesis
else:
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from tep.wire.openapi import openapi_document

pytest.importorskip("tep.kernels")

EXAMPLES = 60
# The routes that translate into the chat path (every valid body compiles its tools'
# schemas) and the text routes: fewer examples, to keep the suite's time bounded.
FEWER = {"/v1/messages": 30, "/v1/messages/count_tokens": 30, "/tokenize": 30,
         "/detokenize": 30, "/apply-template": 30}
# invalid inputs exist only for operations that take a body or a path parameter
CASES = [(m.upper(), p, mode) for p, item in openapi_document()["paths"].items()
         for m in item
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode == GenerationMode.POSITIVE or m == "post"]


@pytest.fixture(scope="module")
def api(live_server):
    # the generation timeout bounds what a fuzzed max_tokens / n can cost
    url = live_server("tep.backends.toy:ToyBackend", "--generation-timeout", "0.5",
                      "--max-concurrency", "2")
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = {}
    for res in schema.get_all_operations():
        op = res.ok()
        ops[(op.method.upper(), op.path)] = op
    return url, ops


def _check(url: str, case) -> None:
    r = case.call(base_url=url, timeout=30)
    where = (case.method, case.path, case.path_parameters, case.body)
    declared = openapi_document()["paths"][case.path][case.method.lower()]["responses"]
    assert r.status_code < 500 or (r.status_code == 501 and "501" in declared), \
        (where, r.text[:500])
    if r.status_code >= 400 and case.path.startswith("/v1/messages"):   # Anthropic's
        body = r.json()
        assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, \
            (where, r.text[:500])
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    elif r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"}, (where, r.text[:500])
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, (where, r.text[:500])
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str)


@pytest.mark.parametrize("method,path,mode", CASES,
                         ids=[f"{m}-{p}-{mode.value}" for m, p, mode in CASES])
def test_no_5xx_and_errors_in_envelope(api, method, path, mode):
    url, ops = api
    op = ops[(method, path)]
    try:
        strategy = op.as_strategy(generation_mode=mode)
    except Exception as e:  # e.g. no invalid input exists for a parameterless GET
        pytest.skip(f"no {mode.value} cases: {e}")

    @hypothesis.settings(max_examples=FEWER.get(path, EXAMPLES), deadline=None,
                         derandomize=True,
                         database=None, suppress_health_check=list(HealthCheck),
                         phases=[Phase.explicit, Phase.generate])  # no shrinking: bounded time
    @hypothesis.given(case=strategy)
    def run(case):
        _check(url, case)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        pytest.skip(f"no {mode.value} cases for {method} {path}")
