"""``system_fingerprint``: in every chat and completions answer, JSON and each stream
chunk; the same for the same weights and settings, different when they change; null for a
backend without the hook; a failing hook never fails the answer."""
from __future__ import annotations

import re

import pytest

from support.http import client_for, post_json, post_stream

import tep
from tep.backend.fingerprint import file_digest, fingerprint_of
from tep.backends.toy import ToyBackend, ToyEngineBackend

pytestmark = pytest.mark.anyio

FP = re.compile(r"^fp_[0-9a-f]{16}$")
# no end-of-sequence (token 256): an unseeded stream that sampled it first would have too
# few chunks for the count below (about 1 run in 300)
NO_EOS = {"logit_bias": {"256": -100}}
CHAT = {"model": "tep-toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        **NO_EOS}
CMPL = {"model": "tep-toy", "prompt": "hi", "max_tokens": 3, **NO_EOS}


@pytest.mark.parametrize("make", [ToyBackend, ToyEngineBackend], ids=["toy", "engine"])
async def test_every_answer_and_chunk_carries_the_backend_fingerprint(make):
    backend = make()
    fp = backend.fingerprint("tep-toy")
    assert FP.match(fp)
    async with client_for(backend) as c:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", CMPL)):
            status, js = await post_json(c, path, body)
            assert status == 200 and js["system_fingerprint"] == fp
            status, events, _ = await post_stream(
                c, path, {**body, "stream_options": {"include_usage": True}})
            chunks = [e for e in events if e != "[DONE]"]
            assert status == 200 and len(chunks) >= 3
            assert all(e["system_fingerprint"] == fp for e in chunks)
    if hasattr(backend, "close"):
        backend.close()


def test_fingerprint_follows_weights_and_settings():
    a, b = ToyBackend(), ToyBackend()
    assert a.fingerprint("tep-toy") == b.fingerprint("tep-toy")      # same weights
    assert ToyBackend(weights_seed=7).fingerprint("tep-toy") != a.fingerprint("tep-toy")
    assert ToyBackend(dim=32).fingerprint("tep-toy") != a.fingerprint("tep-toy")
    assert fingerprint_of({"x": 1, "y": 2}) == fingerprint_of({"y": 2, "x": 1})
    assert fingerprint_of({"x": 1}) != fingerprint_of({"x": 2})


def test_file_digest_reads_the_ends_and_size_and_is_cached(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"a" * (3 << 20))
    d = file_digest(p)
    assert re.fullmatch(r"[0-9a-f]{64}", d) and file_digest(p) == d
    q = tmp_path / "n.gguf"
    q.write_bytes(b"a" * ((3 << 20) - 1) + b"b")                      # last byte differs
    assert file_digest(q) != d
    r = tmp_path / "o.gguf"
    r.write_bytes(b"a" * ((3 << 20) + 1))                             # size differs
    assert file_digest(r) != d


class _NoHook(tep.Backend):
    def list_models(self):
        return ["m"]

    def generate_from_tokens(self, model, token_ids, sampling):
        return tep.Completion(text="x", token_ids=[1], finish_reason="stop")


class _BadHook(_NoHook):
    def fingerprint(self, model):
        raise RuntimeError("boom")


@pytest.mark.parametrize("backend", [_NoHook(), _BadHook()], ids=["none", "failing"])
async def test_no_or_failing_hook_gives_null_and_a_200(backend):
    async with client_for(backend) as c:
        status, js = await post_json(c, "/v1/completions",
                                     {"model": "m", "prompt": [1, 2], "max_tokens": 1})
        assert status == 200 and js["system_fingerprint"] is None
