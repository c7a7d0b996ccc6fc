"""schemathesis against the app's own OpenAPI document (/openapi.json) on a live toy
server: valid and invalid requests to every operation; never a 5xx, and every error
(status >= 400) is the OpenAI envelope.

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
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from tep.openapi import openapi_document

pytest.importorskip("tep.kernels")

EXAMPLES = 30
OPERATIONS = [(m.upper(), p) for p, item in openapi_document()["paths"].items() for m in item]


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
    assert r.status_code < 500, (where, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"}, (where, r.text[:500])
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, (where, r.text[:500])
        assert isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("method,path", OPERATIONS)
def test_no_5xx_and_errors_in_envelope(api, method, path, mode):
    url, ops = api
    op = ops[(method, path)]
    try:
        strategy = op.as_strategy(generation_mode=mode)
    except Exception as e:  # e.g. no invalid input exists for a parameterless GET
        pytest.skip(f"no {mode.value} cases: {e}")

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                         database=None, suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=strategy)
    def run(case):
        _check(url, case)

    run()
