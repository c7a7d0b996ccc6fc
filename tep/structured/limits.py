"""The structured-output limits and compile options: one place for every constant."""
from __future__ import annotations

import os

__all__ = [
    "MAX_GRAMMAR_CHARS", "MAX_CHOICES", "MAX_CHOICE_CHARS", "MAX_TOOLS", "MAX_TOOL_NAME_CHARS",
    "TOOL_NAME_PATTERN", "SCHEMA_NAME_PATTERN", "JSON_COMPILE_OPTIONS", "GRAMMAR_CACHE_SIZE",
    "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "MASK_THREADS", "PROBE_STEPS", "PARSER_LIMITS",
]

# Size limits on what a request may carry (each a 400 naming the field when exceeded).
MAX_GRAMMAR_CHARS = 256 * 1024        # a schema (as JSON text), a regex or a Lark grammar
MAX_CHOICES = 1024                    # guided_choice entries
MAX_CHOICE_CHARS = 4096               # one guided_choice entry
MAX_TOOLS = 128                       # functions in `tools`
MAX_TOOL_NAME_CHARS = 64              # OpenAI's limit on a function name

# OpenAI's name rules for functions and for response_format.json_schema.name.
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

# JSON Schema compile options for llguidance. Compact JSON (no free whitespace between
# tokens): small models otherwise spend their budget on spaces and newlines, and the
# output is what json.dumps(separators=(",", ":")) would write.
JSON_COMPILE_OPTIONS = {"whitespace_flexible": False}

# Compiled (validated) grammars kept, by grammar text.
GRAMMAR_CACHE_SIZE = 256

# The tool-call wrapper (Hermes / Qwen / NousResearch format): one JSON object
# {"name": ..., "arguments": {...}} per call, each inside these tags, calls separated by "\n".
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Threads of the shared llguidance executor that fills many rows' masks at once: one per
# CPU up to 8 (more threads than CPUs only add switching; the forward runs meanwhile).
MASK_THREADS = min(8, max(1, os.cpu_count() or 1))

# Tokens a new constraint is walked down (on a copy) before generation starts, so a grammar
# whose lexer outgrows llguidance's limits at its first lexeme (``a{1000000}``) is a 400
# before anything is generated. Each step is one mask fill (microseconds to a millisecond).
PROBE_STEPS = 4

# Overrides of llguidance's matcher limits (``llguidance.LLParserLimits`` keywords, e.g.
# ``max_items_in_row``, ``step_lexer_fuel``, ``max_lexer_states``); empty = its defaults.
# A grammar that exceeds one fails its sequence (a 400 before generation when the probe
# sees it, else an error event).
PARSER_LIMITS: dict = {}
