"""Chat templates: Jinja rendering with Hugging Face ``apply_chat_template`` semantics."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

__all__ = ["render_chat", "TemplateError"]


class TemplateError(ValueError):
    """The template failed to render (its ``raise_exception`` or a Jinja error)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render_chat(template: str, messages: Sequence[dict[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", tools: list[dict] | None = None,
                **extra: Any) -> str:
    """Render ``messages`` (OpenAI-shaped dicts) with a Jinja chat template, as HF does:
    sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` available, and
    ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` in
    the context. Raises :class:`TemplateError` when the template refuses the input."""
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except TemplateError:
        raise
    except Exception as e:  # jinja2 errors: the request, not the server, is at fault
        raise TemplateError(f"chat template failed: {e}") from None
