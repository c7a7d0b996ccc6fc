"""The issue's scenario over HTTP, real model, official openai client: a fresh server
answers chat A; a restarted server that first answered a multi-turn chat B (which shares
A's system turn, so A's prefix comes from B's cache) answers A with the same text, the
same finish reason and the same ``system_fingerprint`` (in JSON and every stream chunk),
and both match greedy decoding done directly with llama-cpp-python on A's tokens."""
from __future__ import annotations


import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from support.process import stop_process  # noqa: E402
from support import smollm2  # noqa: E402


A = [{"role": "user", "content": "Translate 'good morning' into French and Spanish."}]
B = [{"role": "user", "content": "What is 12 times 7?"},
     {"role": "assistant", "content": "12 times 7 is 84."},
     {"role": "user", "content": "And 13 times 7?"}]
MAX_TOKENS = 32


def _serve(path):
    return smollm2.serve(context_size=256, threads=1, max_num_seqs=4)


def _ask(url: str, messages, stream: bool = False):
    oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    model = oai.models.list().data[0].id
    kw = dict(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        r = oai.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.system_fingerprint
    text, finish, fps = "", None, set()
    for ch in oai.chat.completions.create(stream=True, **kw):
        fps.add(ch.system_fingerprint)
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    assert len(fps) == 1, fps
    return text, finish, fps.pop()


def _direct(path, messages) -> tuple[str, str]:
    """Greedy decoding with llama-cpp-python on the prompt tokens the server renders."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=32, n_ubatch=32,
                          n_threads=1, n_threads_batch=1, flash_attn=True,
                          **smollm2.reference_kv(), verbose=False)
    try:
        from tep.engine.chat_template import render_chat

        meta = llm.metadata
        text = render_chat(meta["tokenizer.chat_template"], messages)
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)  # BOS if the vocab asks
        llm.eval(ids)
        out = []
        for _ in range(MAX_TOKENS):
            ptr = llama_cpp.llama_get_logits(llm.ctx)
            t = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
            if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), t):
                return llm.detokenize(out).decode("utf-8", "replace"), "stop"
            out.append(t)
            llm.eval([t])
        return llm.detokenize(out).decode("utf-8", "replace"), "length"
    finally:
        llm.close()


def test_cold_and_warm_server_give_the_same_text_as_llama_cpp_python():
    path = smollm2.model_path()
    proc, url = _serve(path)
    try:
        cold = _ask(url, A)
    finally:
        stop_process(proc)
    proc, url = _serve(path)                     # restart: B first, then A (streamed too)
    try:
        _ask(url, B)
        warm = _ask(url, A)
        warm_stream = _ask(url, B + [{"role": "assistant", "content": "91"}] + A,
                           stream=True)
        warm_again = _ask(url, A, stream=True)
    finally:
        stop_process(proc)
    assert cold[2] and cold[2].startswith("fp_")
    assert warm == cold, (warm, cold)
    assert warm_again == cold
    assert warm_stream[2] == cold[2]
    assert cold[:2] == _direct(path, A)
