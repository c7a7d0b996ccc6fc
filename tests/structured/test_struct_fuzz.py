"""Fuzz the grammar layer: random regexes, JSON schemas, Lark grammars and choices (within
and beyond the matcher's limits) on the toy vocabulary and SmolLM2's real one, and over
HTTP on the toy engine.

The property, each time: a request either fails with a 4xx (a 400 when parsed, when the
matcher is built and probed, or when it gives up during generation), or its output
matches its constraint by an independent oracle (Python's ``re``, ``jsonschema``, the
choice list). Nothing else: no other exception, no 5xx, no output that does not match.

The grammar-layer runs walk each constraint with a random sampler that only picks allowed
tokens (and ends with end-of-sequence, when allowed, half the time). Example counts are
bounded and the search is derandomized, so the suite takes seconds and is the same every
run.
"""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from struct_real import smol  # noqa: F401 - the fixture
from struct_strategies import bodies
from tep.errors import BadRequestError
from tep.structured import make_constraint, parse_structured
from tep.structured.matcher import ConstraintFailed

MAX_STEPS = 400
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def matches(kind: str, oracle, text: str) -> bool:
    """The independent check of a finished output."""
    if kind == "big":      # a million-fold repetition cannot finish within the walk
        return False
    if kind == "regex":
        return re.fullmatch(oracle, text) is not None
    if kind == "choice":
        return text in oracle
    try:
        jsonschema.validate(json.loads(text), oracle)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def attempt(body: dict, tok, decode, seed: int) -> tuple[int, str | None]:
    """The server's recipe without the model: parse (400), build and probe the matcher
    (400), then walk it with a random allowed-token sampler; a matcher that gives up is
    the 400 the engine sends. Returns (status, text; None unless finished)."""
    try:
        spec = parse_structured(body, "completions").constraint
        c = make_constraint(spec, tok, check=True)
    except BadRequestError as e:          # ConstraintFailed is one
        assert e.status == 400 and e.param in body, (e.param, body)
        return 400, None
    rng = np.random.default_rng(seed)
    eos = set(c.eos_ids)
    row = np.empty(c.words, np.int32)
    out: list[int] = []
    for _ in range(MAX_STEPS):
        c.fill_bitmask(row)
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:c.vocab_size]
        allowed = np.flatnonzero(bits)
        assert allowed.size, "an empty mask"
        ends = [t for t in allowed.tolist() if t in eos]
        rest = [t for t in allowed.tolist() if t not in eos]
        t = ends[0] if ends and (not rest or rng.random() < 0.5) else \
            rest[int(rng.integers(len(rest)))]
        if not c.accept(t):
            e = c.violation(t)
            assert isinstance(e, ConstraintFailed) and e.status == 400
            return 400, None
        if t in eos:
            return 200, decode(out)
        out.append(t)
    return 200, None   # still going at MAX_STEPS (a "length" finish): nothing to check


def _fuzz(tok, decode, examples: int) -> dict:
    seen = {"ok": 0, "checked": 0, "4xx": 0}

    @settings(FUZZ, max_examples=examples)
    @given(case=bodies(), seed=st.integers(0, 2**32 - 1))
    def run(case, seed):
        body, kind, oracle = case
        status, text = attempt(body, tok, decode, seed)
        if status == 400:
            seen["4xx"] += 1
            return
        seen["ok"] += 1
        if text is not None:
            seen["checked"] += 1
            assert matches(kind, oracle, text), (body, text)

    run()
    print("fuzz:", seen)
    return seen


def test_fuzz_toy_vocabulary():
    from tep.backends.toy import toy_tokenizer

    tok = toy_tokenizer(1000)        # bytes plus " word" tokens
    seen = _fuzz(tok, lambda ids: tok.decode_bytes(ids).decode("utf-8"), 80)
    assert seen["checked"] >= 40 and seen["4xx"] >= 3, seen   # both sides exercised


def test_fuzz_real_vocabulary(smol):  # noqa: F811 - the fixture
    from tep.structured.tokenizer import llamacpp_tokenizer

    tok = llamacpp_tokenizer(smol)
    seen = _fuzz(tok, lambda ids: tok.decode_bytes(ids).decode("utf-8"), 40)
    assert seen["checked"] >= 20 and seen["4xx"] >= 2, seen


@pytest.fixture(scope="module")
def toy_url(live_server):
    return live_server("tep.backends.toy:ToyEngineBackend", "--grammar-compile-timeout", "20")


def test_fuzz_over_http_on_the_toy_engine(toy_url):
    seen = {"ok": 0, "checked": 0, "4xx": 0}
    with httpx.Client(base_url=toy_url, timeout=60) as http:
        @settings(FUZZ, max_examples=30)
        @given(case=bodies(), seed=st.integers(0, 2**31), chat=st.booleans())
        def run(case, seed, chat):
            body, kind, oracle = case
            req = {"model": "tep-toy", "max_tokens": 300, "seed": seed, **body}
            if chat:
                r = http.post("/v1/chat/completions",
                              json={**req, "messages": [{"role": "user", "content": "go"}]})
            else:
                r = http.post("/v1/completions", json={**req, "prompt": "go"})
            assert r.status_code < 500, r.text
            if r.status_code != 200:
                assert 400 <= r.status_code < 500 and r.json()["error"]["param"] in body
                seen["4xx"] += 1
                return
            ch = r.json()["choices"][0]
            text = ch["message"]["content"] if chat else ch["text"]
            seen["ok"] += 1
            if ch["finish_reason"] == "stop":
                seen["checked"] += 1
                assert matches(kind, oracle, text), (body, text)

        run()
        print("fuzz over HTTP:", seen)
        assert http.get("/health").status_code == 200
    assert seen["checked"] >= 12 and seen["4xx"] >= 1, seen
