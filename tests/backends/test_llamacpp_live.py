"""End to end: ``tep serve`` with the llama.cpp backend on the real GGUF, driven by the
official openai client. References: llama-cpp-python's ``Llama`` on the same prompt tokens
(greedy tokens and log_softmax of its logits), and the server's own answers under other
concurrency."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from support.process import stop_process  # noqa: E402
from support import smollm2  # noqa: E402


CTX = 512
THREADS = 1


def _last_logits(llm) -> np.ndarray:
    """The logits of the last token ``llm`` evaluated, read from its llama.cpp context."""
    ptr = llama_cpp.llama_get_logits(llm.ctx)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32)


@pytest.fixture(scope="module")
def server():
    proc, url = smollm2.serve(context_size=CTX, threads=THREADS, max_num_seqs=16,
                              max_concurrency=64)
    yield url, smollm2.model_path()
    stop_process(proc)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(oai):
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def ref(server):
    llm = llama_cpp.Llama(model_path=str(server[1]), n_ctx=CTX, n_threads=THREADS,
                          n_threads_batch=THREADS, flash_attn=True,
                          **smollm2.reference_kv(), verbose=False)
    yield llm
    llm.close()


def _ref_greedy(llm, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the log_softmax of each chosen token, from llama-cpp-python."""
    llm.reset()
    llm.eval(ids)
    toks, lps = [], []
    for _ in range(n):
        row = _last_logits(llm).astype(np.float64)
        t = int(np.argmax(row))
        m = row.max()
        lps.append(float(row[t] - m - np.log(np.exp(row - m).sum())))
        toks.append(t)
        llm.eval([t])
    return toks, lps


def test_completions_greedy_tokens_and_logprobs_equal_llama_cpp(oai, model_id, ref):
    for text in ("The capital of France is", "def fibonacci(n):"):
        ids = ref.tokenize(text.encode(), add_bos=False, special=True)
        toks, lps = _ref_greedy(ref, ids, 12)
        r = oai.completions.create(model=model_id, prompt=ids, max_tokens=12, temperature=0,
                                   logprobs=1)
        c = r.choices[0]
        want_text = ref.detokenize(toks).decode("utf-8", errors="replace")
        assert c.text == want_text
        np.testing.assert_allclose(c.logprobs.token_logprobs, lps, atol=1e-4, rtol=0)
        # the same prompt as text: the server's tokenizer gives the same ids
        r2 = oai.completions.create(model=model_id, prompt=text, max_tokens=12, temperature=0)
        assert r2.choices[0].text == want_text
        assert r2.usage.prompt_tokens == len(ids)


def test_chat_streaming_and_eog_stop(oai, model_id):
    msgs = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    a = oai.chat.completions.create(model=model_id, messages=msgs, max_tokens=64, temperature=0)
    content = a.choices[0].message.content
    assert a.choices[0].finish_reason == "stop"          # the model's <|im_end|> ended it
    assert "<|im_end|>" not in content and "4" in content
    chunks = list(oai.chat.completions.create(model=model_id, messages=msgs, max_tokens=64,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens


def test_stop_strings_and_n2_seeded(oai, model_id):
    prompt = "Once upon a time"
    full = oai.completions.create(model=model_id, prompt=prompt, max_tokens=32, temperature=0)
    text = full.choices[0].text
    stop = text[12:15]
    cut = oai.completions.create(model=model_id, prompt=prompt, max_tokens=32, temperature=0,
                                 stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kw = dict(model=model_id, prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.95,
              seed=123, n=2)
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice j uses seed + j


def test_seeded_sampling_is_the_same_alone_and_among_16(server, oai, model_id):
    msgs = [{"role": "user", "content": f"Tell me something about the number {k}."}
            for k in range(16)]
    kw = dict(model=model_id, max_tokens=32, temperature=0.8, top_p=0.95, seed=77)
    alone = [oai.chat.completions.create(messages=[m], **kw).choices[0].message.content
             for m in msgs[:4]]

    async def together():
        ac = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0,
                                timeout=120)
        rs = await asyncio.gather(*(ac.chat.completions.create(messages=[m], **kw) for m in msgs))
        await ac.close()
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(together())[:4] == alone


def test_limits_and_embeddings(oai, model_id):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=model_id, prompt=[1] * (CTX + 5), max_tokens=4)
    assert str(CTX) in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=model_id, prompt="hi", max_tokens=CTX)
    assert "max_tokens" in ei.value.message
    with pytest.raises(openai.APIStatusError) as ei:
        oai.embeddings.create(model=model_id, input="hello")
    assert ei.value.status_code == 501
    # the server still answers
    r = oai.completions.create(model=model_id, prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
