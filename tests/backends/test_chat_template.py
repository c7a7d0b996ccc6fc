"""Chat-template rendering: HF ``apply_chat_template`` semantics, byte for byte.

References: strings written out by hand for SmolLM2's template (read from the GGUF), and
llama-cpp-python's own Jinja2ChatFormatter over the same template.
"""
from __future__ import annotations

import pytest

from tep.engine.chat_template import TemplateError, render_chat
from support import smollm2

SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi there"}],
    "system+user": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Another, in French: é, 中文?"}],
    "system+multi-turn": [{"role": "system", "content": "You count."},
                          {"role": "user", "content": "1"},
                          {"role": "assistant", "content": "2"},
                          {"role": "user", "content": "3\n\n  spaced  "}],
}


def _chatml(messages, gen: bool, default_system: bool = True) -> str:
    """SmolLM2's template, written out by hand."""
    out = ""
    if default_system and messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{SYS}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + ("<|im_start|>assistant\n" if gen else "")


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    pytest.importorskip("llama_cpp")
    from tep.backends.llamacpp_model import LlamaCppModel

    path = smollm2.model_path()
    model = LlamaCppModel(path, context_size=256, max_num_seqs=1, n_threads=1)
    try:
        assert model.chat_template
        return model.chat_template
    finally:
        model.close()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_renders_byte_for_byte(smollm2_template, name, gen):
    msgs = CONVERSATIONS[name]
    got = render_chat(smollm2_template, msgs, add_generation_prompt=gen,
                      bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert got == _chatml(msgs, gen)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_llama_cpp_pythons_formatter(smollm2_template, name):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ref = Jinja2ChatFormatter(smollm2_template, eos_token="<|im_end|>",
                              bos_token="<|im_start|>", add_generation_prompt=True)
    msgs = CONVERSATIONS[name]
    assert render_chat(smollm2_template, msgs, bos_token="<|im_start|>",
                       eos_token="<|im_end|>") == ref(messages=msgs).prompt


# --------------------------------------------------------------- HF environment features

def test_trim_and_lstrip_blocks():
    tpl = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    assert render_chat(tpl, [{"role": "user", "content": "a"},
                             {"role": "user", "content": "b"}]) == "    a\n    b\n"


def test_bos_eos_and_generation_prompt_are_in_the_context():
    tpl = "{{ bos_token }}{{ messages|length }}{% if add_generation_prompt %}G{% endif %}{{ eos_token }}"
    assert render_chat(tpl, [{"role": "user", "content": "x"}], bos_token="<s>",
                       eos_token="</s>") == "<s>1G</s>"
    assert render_chat(tpl, [], add_generation_prompt=False) == "0"


def test_raise_exception_becomes_a_template_error():
    tpl = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
           "{% endif %}ok")
    assert render_chat(tpl, [{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(TemplateError, match="first must be user"):
        render_chat(tpl, [{"role": "assistant", "content": ""}])


def test_loopcontrols_and_tojson_keep_unicode():
    tpl = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m|tojson }}{% endfor %}"
    msgs = [{"role": "user", "content": "é<>&"}, {"role": "user", "content": "no"}]
    assert render_chat(tpl, msgs) == '{"role": "user", "content": "é<>&"}'
    assert render_chat("{{ tools|tojson(indent=1) }}", [], tools=[{"a": 1}]) == '[\n {\n  "a": 1\n }\n]'


def test_sandbox_refuses_internals_and_mutation():
    with pytest.raises(TemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(TemplateError):
        render_chat("{{ messages.append(1) }}", [])
    with pytest.raises(TemplateError, match="chat template failed"):
        render_chat("{% if %}", [])


def test_strftime_now_is_available():
    out = render_chat("{{ strftime_now('%Y') }}", [])
    assert out.isdigit() and len(out) == 4
