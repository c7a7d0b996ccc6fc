"""Grammar text for llguidance, built and validated once per distinct source.

Every constraint ends up as one llguidance grammar string (tokenizer independent). It is
validated here, without a tokenizer, when the request is parsed, so a bad schema, regex or
grammar is a 400 before anything is scheduled; the result is cached by its source text.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from tep.structured.limits import GRAMMAR_CACHE_SIZE, JSON_COMPILE_OPTIONS

__all__ = ["GrammarError", "json_schema_grammar", "regex_grammar", "lark_grammar",
           "choice_grammar", "validate"]


class GrammarError(ValueError):
    """llguidance refused a schema, regex or grammar; the message says why."""


def _llg():
    try:
        import llguidance
    except ImportError as e:  # the extra is not installed: the server answers 400, not 500
        raise GrammarError("structured output needs the 'llguidance' package "
                           "(pip install llguidance; it is a dependency of tep-serve)") from e
    return llguidance


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def validate(grammar: str) -> str:
    """Check an llguidance grammar string; returns it, or raises :class:`GrammarError`."""
    err = _llg().LLMatcher.validate_grammar(grammar)
    if err:
        raise GrammarError(err.strip().splitlines()[0] if err.strip() else err)
    return grammar


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _json_grammar(schema_text: str) -> str:
    llg = _llg()
    try:
        g = llg.LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_COMPILE_OPTIONS)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return validate(g)


def json_schema_grammar(schema: Any) -> str:
    """A grammar for JSON text that validates against ``schema`` (a dict or bool)."""
    return _json_grammar(json.dumps(schema, sort_keys=False, ensure_ascii=False))


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def regex_grammar(regex: str) -> str:
    """A grammar for text that fully matches ``regex`` (Rust ``regex`` syntax)."""
    return validate(_llg().LLMatcher.grammar_from_regex(regex))


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def lark_grammar(text: str) -> str:
    """A grammar from llguidance's Lark dialect (GBNF is converted to it first)."""
    llg = _llg()
    try:
        g = llg.grammar_from("grammar", text)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return validate(g)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """A grammar for exactly one of ``choices``."""
    return lark_grammar("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                               for c in choices))
