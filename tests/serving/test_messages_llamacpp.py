"""The Messages API and the text routes on the real model (SmolLM2-135M-Instruct through
llama.cpp), against llama.cpp's own tokenizer (llama-cpp-python, ``vocab_only``):
/tokenize and /detokenize round trips, count_tokens equal to the tokens of the rendered
prompt and to what generation counts, the context length on the model card, and the
anthropic client's create/stream agreeing for a seed."""
from __future__ import annotations


import httpx
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
anthropic = pytest.importorskip("anthropic")

from support.process import stop_process  # noqa: E402
from support import smollm2  # noqa: E402


CTX = 512
TEXTS = ["Hello, world!", "naïve café — 東京 🚀\n\ttabs  and  spaces",
         "<|im_start|>user\nspecial tokens in text<|im_end|>", "   leading", "x" * 700]
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server():
    proc, url = smollm2.serve(context_size=CTX, threads=1, max_num_seqs=2, max_concurrency=4)
    yield url, smollm2.model_path()
    stop_process(proc)


@pytest.fixture(scope="module")
def vocab(server):
    llm = llama_cpp.Llama(model_path=str(server[1]), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def h(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(h):
    return h.get("/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_equals_llama_cpp(h, vocab, text):
    for add in (False, True):
        ref = vocab.tokenize(text.encode(), add_bos=add, special=True)
        got = h.post("/tokenize", json={"content": text, "add_special": add}).json()
        assert got["tokens"] == ref and got["count"] == len(ref)
        assert got["max_model_len"] == CTX
    ids = h.post("/tokenize", json={"content": text}).json()["tokens"]
    back = h.post("/detokenize", json={"tokens": ids}).json()["content"]
    assert back == vocab.detokenize(ids, special=True).decode("utf-8", "replace") == text
    pieces = h.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    raw = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                   for p in pieces)
    assert raw == text.encode()


def test_count_tokens_equals_rendered_prompt_and_usage(h, vocab, server, model_id):
    c = anthropic.Anthropic(base_url=server[0], api_key="x", max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    for kw in ({"system": "You are terse."}, {"tools": tools}):
        n = c.messages.count_tokens(model=model_id, messages=ASK, **kw).input_tokens
        chat = {"messages": ([{"role": "system", "content": kw["system"]}]
                             if "system" in kw else []) + ASK}
        if "tools" in kw:
            chat["tools"] = [{"type": "function", "function": {
                "name": t["name"], "description": t["description"],
                "parameters": t["input_schema"]}} for t in tools]
        prompt = h.post("/apply-template", json=chat).json()["prompt"]
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        ref = vocab.tokenize(prompt.encode(), add_bos=True, special=True)
        assert n == len(ref) == h.post("/tokenize", json=chat).json()["count"]
        m = c.messages.create(model=model_id, messages=ASK, max_tokens=6,
                              extra_body={"seed": 1}, **kw)
        assert m.usage.input_tokens == n


def test_create_and_stream_agree(server, model_id):
    c = anthropic.Anthropic(base_url=server[0], api_key="x", max_retries=0, timeout=120)
    kw = dict(model=model_id, messages=ASK, max_tokens=12, system="Answer in one word.",
              extra_body={"seed": 3, "temperature": 0.7})
    whole = c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.content[0].text == whole.content[0].text and whole.content[0].text
    assert final.stop_reason == whole.stop_reason in ("end_turn", "max_tokens")
    assert (final.usage.input_tokens, final.usage.output_tokens) == \
        (whole.usage.input_tokens, whole.usage.output_tokens)


def test_model_card_context_and_too_long(h, model_id, server):
    card = h.get(f"/v1/models/{model_id}").json()
    assert card["context_length"] == card["max_model_len"] == CTX
    c = anthropic.Anthropic(base_url=server[0], api_key="x", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError) as e:   # 600 messages > the context
        c.messages.create(model=model_id, max_tokens=4,
                          messages=[{"role": "user", "content": "hi"}] * 600)
    assert "context" in e.value.message
    assert c.messages.create(model=model_id, max_tokens=2, messages=ASK).usage.output_tokens
