"""Structured outputs and tool calls: grammars as token bitmasks.

Request fields (``response_format``, ``guided_json``/``_regex``/``_grammar``/``_choice``,
``tools``/``tool_choice``/``parallel_tool_calls``) are validated into a
:class:`~tep.structured.spec.ConstraintSpec` (:func:`parse_structured`); per sequence a
:class:`~tep.structured.matcher.Constraint` (llguidance) fills an int32 bitmask row before
each sampling step and accepts the sampled token; tool-call text is parsed into OpenAI
``tool_calls`` whole or as streamed deltas (:mod:`tep.structured.tool_calls`).
See docs/STRUCTURED.md.
"""
from tep.structured.bitmask import allocate_bitmask, allowed_token_ids, apply_bitmask
from tep.structured.matcher import (Constraint, ConstraintFailed, MaskFiller, StepMaskResult,
                                    StepMasks, fill_bitmasks, make_constraint)
from tep.structured.spec import (ConstraintSpec, Structured, ToolsSpec, parse_constraint,
                                 parse_structured, parse_tools, unsupported)
from tep.structured.tool_calls import (ContentDelta, ParsedReply, ToolCallDelta,
                                       ToolCallStream, chunk_deltas, finish_reason,
                                       parse_tool_calls)
from tep.structured.tools import prepare_messages, template_tools, tool_constraint

__all__ = [
    "ConstraintSpec", "ToolsSpec", "Structured", "parse_constraint", "parse_tools",
    "parse_structured", "unsupported", "Constraint", "ConstraintFailed", "StepMasks",
    "StepMaskResult", "make_constraint", "fill_bitmasks", "MaskFiller",
    "allocate_bitmask", "allowed_token_ids", "apply_bitmask", "ToolCallStream",
    "ToolCallDelta", "ContentDelta", "chunk_deltas", "ParsedReply", "parse_tool_calls", "finish_reason",
    "prepare_messages", "template_tools", "tool_constraint",
]
