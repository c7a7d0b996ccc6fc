"""End-to-end: ``tep serve`` with the toy model on the engine, driven by the official
openai client; the per-request toy backend (an independent path) is the reference."""
from __future__ import annotations

import asyncio

import openai
import pytest

ENGINE = "tep.backends.toy:ToyEngineBackend"
PER_REQUEST = "tep.backends.toy:ToyBackend"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_and_chat_match_the_per_request_path(live_server):
    eng, ref = client(live_server(ENGINE)), client(live_server(PER_REQUEST))
    for kw in ({"temperature": 0.9, "seed": 5},
               {"temperature": 1.2, "top_p": 0.9, "seed": 6, "frequency_penalty": 0.5,
                "presence_penalty": 0.3, "extra_body": {"top_k": 20, "min_p": 0.01}},
               {"temperature": 0.0, "seed": 0}):
        a = eng.completions.create(model="tep-toy", prompt="Once upon a time", max_tokens=24,
                                   n=2, **kw)
        b = ref.completions.create(model="tep-toy", prompt="Once upon a time", max_tokens=24,
                                   n=2, **kw)
        assert [c.text for c in a.choices] == [c.text for c in b.choices]
        assert a.usage.completion_tokens == b.usage.completion_tokens
        chunks = list(eng.completions.create(model="tep-toy", prompt="Once upon a time",
                                             max_tokens=24, n=2, stream=True, **kw))
        streamed = ["".join(c.choices[0].text for c in chunks if c.choices and
                            c.choices[0].index == i) for i in range(2)]
        assert streamed == [c.text for c in a.choices]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    a = eng.chat.completions.create(model="tep-toy", messages=msgs, max_tokens=16, seed=9,
                                    logprobs=True, top_logprobs=3)
    b = ref.chat.completions.create(model="tep-toy", messages=msgs, max_tokens=16, seed=9,
                                    logprobs=True, top_logprobs=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    la, lb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
    assert [(x.token, round(x.logprob, 4)) for x in la] == \
        [(x.token, round(x.logprob, 4)) for x in lb]
    assert [[t.token for t in x.top_logprobs] for x in la] == \
        [[t.token for t in x.top_logprobs] for x in lb]
    stream = eng.chat.completions.create(model="tep-toy", messages=msgs, max_tokens=16,
                                         seed=9, stream=True,
                                         stream_options={"include_usage": True})
    parts, usage = [], None
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == a.choices[0].message.content
    assert usage.completion_tokens == a.usage.completion_tokens


def test_stops_and_errors(live_server):
    eng, ref = client(live_server(ENGINE)), client(live_server(PER_REQUEST))
    full = ref.completions.create(model="tep-toy", prompt="abc", max_tokens=40, seed=2).choices[0]
    stop = full.text[10:12]
    a = eng.completions.create(model="tep-toy", prompt="abc", max_tokens=40, seed=2, stop=[stop])
    assert a.choices[0].text == full.text[:full.text.index(stop)]
    assert a.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as ei:
        eng.completions.create(model="tep-toy", prompt=[5, 300], max_tokens=4)
    assert "outside the vocabulary" in ei.value.message
    with pytest.raises(openai.BadRequestError):
        list(eng.completions.create(model="tep-toy", prompt=[], max_tokens=4, stream=True))
    emb = eng.embeddings.create(model="tep-toy", input=["one", "two words"])
    ref_emb = ref.embeddings.create(model="tep-toy", input=["one", "two words"])
    assert [d.embedding for d in emb.data] == [d.embedding for d in ref_emb.data]


def test_64_concurrent_streams(live_server):
    url = live_server(ENGINE, "--max-concurrency", "128")
    ref = client(live_server(PER_REQUEST))
    ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        s = await ac.completions.create(model="tep-toy", prompt=f"p{i}", max_tokens=20,
                                        seed=i, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await ac.close()

    got = asyncio.run(main())
    for i in (0, 17, 63):
        want = ref.completions.create(model="tep-toy", prompt=f"p{i}", max_tokens=20, seed=i)
        assert got[i] == want.choices[0].text
