"""The validated, tokenizer-independent results of parsing a request's structured fields.

Plain data with no imports from the rest of :mod:`tep.structured`, so the parser
(:mod:`tep.structured.spec`) and the tool grammar (:mod:`tep.structured.tools`) can both
use them without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ConstraintSpec", "ToolsSpec", "Structured", "ConstraintKind"]

ConstraintKind = Literal["json_schema", "json_object", "regex", "grammar", "choice", "tools"]


@dataclass(frozen=True)
class ConstraintSpec:
    """A validated constraint, independent of any tokenizer.

    Attributes:
        kind: what the request asked for.
        param: the body field it came from (for errors raised later, e.g. a backend that
            cannot constrain: ``BadRequestError(..., param=spec.param)``).
        grammar: the llguidance grammar string (already validated).
        schema: the JSON schema for ``json_schema``/``json_object``, else None.
    """

    kind: ConstraintKind
    param: str
    grammar: str
    schema: Any = None


@dataclass(frozen=True)
class ToolsSpec:
    """Validated ``tools`` / ``tool_choice`` / ``parallel_tool_calls``.

    Attributes:
        tools: the functions, normalised to ``{"type": "function", "function": {"name",
            "description"?, "parameters", "strict"?}}`` (``parameters`` defaults to an
            object with no required properties).
        choice: ``"none"``, ``"auto"``, ``"required"`` or ``"function"`` (a named one).
        function: the forced function's name when ``choice == "function"``.
        parallel: whether more than one call may be made.
    """

    tools: tuple[dict, ...]
    choice: Literal["none", "auto", "required", "function"] = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The function names, in order."""
        return tuple(t["function"]["name"] for t in self.tools)

    @property
    def callable_tools(self) -> tuple[dict, ...]:
        """The functions the model may call under ``choice`` (none for ``"none"``)."""
        if self.choice == "none":
            return ()
        if self.choice == "function":
            return tuple(t for t in self.tools if t["function"]["name"] == self.function)
        return self.tools


@dataclass(frozen=True)
class Structured:
    """What :func:`parse_structured` returns: the constraint to hand to the engine (None =
    unconstrained) and the tools (None = the request has none)."""

    constraint: ConstraintSpec | None = None
    tools: ToolsSpec | None = None

