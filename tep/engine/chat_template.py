"""Chat templates: Jinja rendering with Hugging Face ``apply_chat_template`` semantics.

The environment matches what ``transformers`` builds for chat templates: sandboxed
(``ImmutableSandboxedEnvironment``: a template cannot reach Python internals or mutate its
inputs), ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension
(``{% break %}``), a ``tojson`` filter that keeps non-ASCII text as is, and the globals
``raise_exception(message)`` and ``strftime_now(format)``. The context holds ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` and any extra keyword.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

__all__ = ["render_chat", "TemplateError"]


class TemplateError(ValueError):
    """The template failed to render (its ``raise_exception`` or a Jinja error)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes HTML characters and ASCII-only output; templates
    # written for transformers expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str):  # noqa: ANN202 - a jinja2 Template
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(template: str, messages: Sequence[dict[str, Any]], *,
                add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", tools: list[dict] | None = None,
                **extra: Any) -> str:
    """Render ``messages`` (OpenAI-shaped dicts) with a Jinja chat template, as HF does.

    Raises :class:`TemplateError` when the template refuses the input (its
    ``raise_exception``) or fails (a Jinja syntax or runtime error), so the caller can
    answer 400.
    """
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, tools=tools, **extra)
    except TemplateError:
        raise
    except Exception as e:  # jinja2 errors: the request, not the server, is at fault
        raise TemplateError(f"chat template failed: {e}") from None
