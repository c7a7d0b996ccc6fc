"""Grammar compiles and chat-template rendering for engine requests run in the worker
pool, not on the event loop, and a compile past ``grammar_compile_timeout`` is a 400.

The loop's responsiveness is measured with a ticker task on the app's own loop (what every
open stream's next chunk waits for), in the same run as a control that does the same
compile on the loop, so the bound is a ratio, not a wall-clock guess.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from support.http import client_for, post_json
from tep.backends.toy import ToyEngineBackend, toy_tokenizer
from tep.serving.config import ServerConfig
from tep.structured import make_constraint, parse_structured

ASK = [{"role": "user", "content": "hi"}]
N_SCHEMAS = 4


def big_schema(n: int = 1500) -> dict:
    """A schema whose compile takes a few hundred milliseconds (unique: no cache hit)."""
    u = uuid.uuid4().hex[:8]
    return {"type": "object",
            "properties": {f"p{i}_{u}": {"type": "string", "maxLength": 8} for i in range(n)},
            "required": [f"p{i}_{u}" for i in range(0, n, 3)]}


async def _max_lag(work) -> float:
    """The longest the loop was late for a 2 ms tick while ``work()`` ran."""
    lags: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            t0 = time.perf_counter()
            await asyncio.sleep(0.002)
            lags.append(time.perf_counter() - t0 - 0.002)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.02)
    try:
        await work()
    finally:
        done = True
        await ticker
    return max(lags)


def test_big_schema_compile_leaves_the_loop_responsive():
    async def main():
        b = ToyEngineBackend()
        try:
            async with client_for(b) as c:
                await post_json(c, "/v1/chat/completions", {   # warm-up (pool, engine)
                    "model": "tep-toy", "messages": ASK, "max_tokens": 2,
                    "guided_json": {"type": "object"}})

                # N schemas one after another, so the on-loop control stalls the loop
                # for well over 0.1 s even on a fast machine (one compiles in ~0.1 s)
                async def on_loop():   # the old way: the same compiles, on the loop
                    for _ in range(N_SCHEMAS):
                        spec = parse_structured({"guided_json": big_schema()},
                                                "chat").constraint
                        make_constraint(spec, toy_tokenizer(b.model.vocab_size), check=True)

                async def served():
                    for _ in range(N_SCHEMAS):
                        st, body = await post_json(c, "/v1/chat/completions", {
                            "model": "tep-toy", "messages": ASK, "max_tokens": 4,
                            "guided_json": big_schema()})
                        assert st == 200, body

                control = await _max_lag(on_loop)
                lags = [await _max_lag(served) for _ in range(2)]
                return control, lags
        finally:
            b.close()

    control, lags = asyncio.run(main())
    print(f"loop lag: compile on the loop {control:.3f} s, served {lags}")
    assert control > 0.1, f"the schemas compiled in {control:.3f} s: too small to show"
    assert min(lags) < control / 3, (control, lags)


def test_compile_past_the_budget_is_400_and_the_server_serves_on():
    async def main():
        b = ToyEngineBackend()
        toy_tokenizer(b.model.vocab_size)        # built once per process: not this test's
        parse_structured({"guided_choice": ["yes", "no"]}, "completions")   # warm caches
        try:
            # one big schema compiles in ~0.1 s on a quiet 2-core machine, far more than
            # this budget; the small choice grammar (warm caches) in about a millisecond
            async with client_for(b, grammar_compile_timeout=0.02) as c:
                t0 = time.perf_counter()
                slow = await post_json(c, "/v1/chat/completions", {
                    "model": "tep-toy", "messages": ASK, "max_tokens": 4,
                    "guided_json": big_schema()})
                took = time.perf_counter() - t0
                r = await c.get("/health")
                fine = await post_json(c, "/v1/completions", {
                    "model": "tep-toy", "prompt": "x", "max_tokens": 3,
                    "guided_choice": ["yes", "no"]})
                return slow, took, r.status_code, fine
        finally:
            b.close()

    (st, err), took, health, (fst, fine) = asyncio.run(main())
    assert st == 400, err
    assert err["error"]["param"] == "guided_json"
    assert err["error"]["code"] == "grammar_too_complex"
    assert took < 0.6        # answered at the budget, not after the compile
    assert health == 200
    assert fst == 200 and fine["choices"][0]["text"] in ("yes", "no")


def test_budget_and_stream_settings_come_from_config_env_and_cli(monkeypatch):
    from tep.server.cli import _config_env, _parser

    monkeypatch.setenv("TEP_GRAMMAR_COMPILE_TIMEOUT", "2.5")
    monkeypatch.setenv("TEP_STREAM_STALL_TIMEOUT", "7")
    monkeypatch.setenv("TEP_STREAM_BUFFER_EVENTS", "512")
    cfg = ServerConfig.from_env()
    assert (cfg.grammar_compile_timeout, cfg.stream_stall_timeout,
            cfg.stream_buffer_events) == (2.5, 7.0, 512)
    args = _parser().parse_args(["serve", "--grammar-compile-timeout", "1.5",
                                      "--stream-stall-timeout", "3",
                                      "--stream-buffer-events", "64"])
    env = _config_env(args)
    assert env["TEP_GRAMMAR_COMPILE_TIMEOUT"] == "1.5"
    assert env["TEP_STREAM_STALL_TIMEOUT"] == "3.0"
    assert env["TEP_STREAM_BUFFER_EVENTS"] == "64"
    monkeypatch.setenv("TEP_GRAMMAR_COMPILE_TIMEOUT", "-1")
    try:
        ServerConfig.from_env()
    except ValueError as e:
        assert "grammar_compile_timeout" in str(e)
    else:
        raise AssertionError("a negative budget was accepted")
