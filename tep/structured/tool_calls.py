"""Generated text -> OpenAI ``tool_calls``, whole or as streamed deltas.

:class:`ToolCallStream` reads the model's text as it is generated and returns typed
deltas: :class:`ContentDelta` for a plain answer, :class:`ToolCallDelta` for calls — the
first delta of a call carries ``index``, ``id``, ``type`` and the function ``name`` (with
``arguments`` ``""``), the following ones carry pieces of ``arguments``, exactly the way
OpenAI streams ``delta.tool_calls``. :func:`parse_tool_calls` runs the same parser over a
whole text, so a streamed reply assembles to the non-streamed one.

The text is either a plain answer or Hermes tool-call blocks (``<tool_call>\\n{"name":
..., "arguments": {...}}\\n</tool_call>``, see :mod:`tep.structured.tools`). Until the
first characters rule out the tag, they are held back (at most ``len("<tool_call>")``).
``arguments`` is the exact JSON text the model wrote for the value (compact under tep's
grammar), streamed as it arrives.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Union

from tep.structured.limits import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

__all__ = ["ContentDelta", "ToolCallDelta", "ToolCall", "ParsedReply", "ToolCallStream",
           "parse_tool_calls", "new_call_id", "finish_reason", "chunk_deltas"]


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ContentDelta:
    """Plain answer text (``delta.content``)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One ``delta.tool_calls[]`` entry. ``id``/``name`` are set only in a call's first
    delta (then ``arguments`` is ``""``); later deltas carry only ``arguments`` pieces."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict:
        """The wire dict: ``{"index", "id", "type", "function": {"name", "arguments"}}``
        for the first delta of a call, ``{"index", "function": {"arguments"}}`` after."""
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


Delta = Union[ContentDelta, ToolCallDelta]


@dataclass
class ToolCall:
    """One assembled call."""

    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict:
        """``message.tool_calls[]`` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedReply:
    """A whole reply: ``content`` (None when the reply is tool calls only) and the calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict:
        """The ``choices[].message`` fields: ``role``, ``content`` and ``tool_calls``
        (present only when there are calls)."""
        m: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return m


_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_WS = " \t\r\n"


class ToolCallStream:
    """Incremental parser: :meth:`feed` text deltas, then :meth:`finish` once.

    Args:
        new_id: makes call ids (default :func:`new_call_id`).
    """

    _DECIDE, _TEXT, _BETWEEN, _HEAD, _ARGS, _TAIL, _WHOLE = range(7)

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._state = self._DECIDE
        self._buf = ""            # text not yet consumed
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self._depth = 0           # arguments scanner: nesting depth, string, escape
        self._in_str = False
        self._esc = False

    # ---- results
    def reply(self) -> ParsedReply:
        """The assembled reply (call after :meth:`finish`): ``content`` is None when the
        reply is only tool calls."""
        text = "".join(self.content_parts)
        return ParsedReply(None if self.calls and not text else text, list(self.calls))

    # ---- parsing
    def feed(self, text: str) -> list[Delta]:
        """Consume a text delta; return the deltas it completes (possibly none)."""
        self._buf += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """End of generation: flush held-back text; an unfinished call keeps what was
        streamed of it."""
        out: list[Delta] = []
        if self._state == self._DECIDE and self._buf:
            self._content(self._buf, out)
        elif self._state == self._TEXT and self._buf:
            self._content(self._buf, out)
        elif self._state == self._WHOLE:
            self._whole(self._buf, out)
        self._buf = ""
        return out

    def _content(self, text: str, out: list[Delta]) -> None:
        if text:
            self.content_parts.append(text)
            out.append(ContentDelta(text))

    def _start_call(self, name: str, out: list[Delta]) -> None:
        call = ToolCall(self._new_id(), name)
        self.calls.append(call)
        out.append(ToolCallDelta(len(self.calls) - 1, "", call.id, name))

    def _args(self, piece: str, out: list[Delta]) -> None:
        if piece:
            self.calls[-1].arguments += piece
            out.append(ToolCallDelta(len(self.calls) - 1, piece))

    def _whole(self, body: str, out: list[Delta]) -> None:
        """Fallback for a call not written name-first: parse the complete JSON."""
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            self._content(TOOL_CALL_OPEN + body, out)   # not a call after all: keep the text
            return
        if not isinstance(name, str):
            self._content(TOOL_CALL_OPEN + body, out)
            return
        self._start_call(name, out)
        self._args(args if isinstance(args, str) else
                   json.dumps(args, ensure_ascii=False, separators=(",", ":")), out)

    def _step(self, out: list[Delta]) -> bool:
        """Advance one state; True when it made progress and may go on."""
        b, st = self._buf, self._state
        if st == self._TEXT:
            self._content(b, out)
            self._buf = ""
            return False
        if st in (self._DECIDE, self._BETWEEN):
            s = b.lstrip(_WS) if st == self._BETWEEN else b
            if s.startswith(TOOL_CALL_OPEN):
                self._buf = s[len(TOOL_CALL_OPEN):]
                self._state = self._HEAD
                return True
            if TOOL_CALL_OPEN.startswith(s):
                return False                       # could still be the tag: wait
            self._state = self._TEXT
            if st == self._BETWEEN:                # text after calls: keep it as content
                self._buf = s
            return True
        if st == self._HEAD:
            m = _NAME.match(b)
            if m is not None:
                self._start_call(json.loads('"' + m.group(1) + '"'), out)
                self._buf = b[m.end():]
                self._state, self._depth, self._in_str, self._esc = self._ARGS, 0, False, False
                return True
            # not name-first (or not yet): give up on streaming this call once it is clearly
            # not the expected prefix; the whole-call fallback parses it at the close tag
            if TOOL_CALL_CLOSE in b or not self._could_be_head(b):
                self._state = self._WHOLE
                return True
            return False
        if st == self._ARGS:
            if not self.calls[-1].arguments:
                # whitespace before the value: the head regex stops wherever the piece
                # ended, so drop it here or a stream's arguments could start with a space
                # that the whole text's do not
                b = self._buf = b.lstrip(_WS)
                if not b:
                    return False
            i = self._scan_args(b)
            if i < 0:
                self._args(b, out)
                self._buf = ""
                return False
            self._args(b[:i], out)
            self._buf = b[i:]
            self._state = self._TAIL
            return True
        if st == self._TAIL:                       # `}` then the close tag
            s = b.lstrip(_WS)
            if s.startswith("}"):
                s2 = s[1:].lstrip(_WS)
                if s2.startswith(TOOL_CALL_CLOSE):
                    self._buf = s2[len(TOOL_CALL_CLOSE):]
                    self._state = self._BETWEEN
                    return True
                if TOOL_CALL_CLOSE.startswith(s2):
                    return False
            elif not s:
                return False
            self._buf = ""                         # malformed tail: drop it
            self._state = self._BETWEEN
            return False
        if st == self._WHOLE:
            j = b.find(TOOL_CALL_CLOSE)
            if j < 0:
                return False
            self._whole(b[:j], out)
            self._buf = b[j + len(TOOL_CALL_CLOSE):]
            self._state = self._BETWEEN
            return True
        return False

    @staticmethod
    def _could_be_head(b: str) -> bool:
        """Whether ``b`` may still grow into ``{"name": "...", "arguments": ``."""
        t = b.lstrip(_WS)
        if not t:
            return True
        if not t.startswith("{"):
            return False
        u = t[1:].lstrip(_WS)
        key = '"name"'
        if len(u) <= len(key):
            return key.startswith(u)
        return u.startswith(key)   # the name string (or the "arguments" key) is still coming

    def _scan_args(self, b: str) -> int:
        """Scan the arguments value; return the index just past its end, or -1 if it has
        not ended within ``b`` (the scanner state carries over to the next call)."""
        depth, in_str, esc = self._depth, self._in_str, self._esc
        for i, ch in enumerate(b):
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
                    if depth == 0:
                        return i + 1               # a string value
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
                if depth < 0:                      # no value at all: `}` of the call
                    return i
            elif depth == 0 and ch in ",":
                return i                           # a scalar value ended
        self._depth, self._in_str, self._esc = depth, in_str, esc
        return -1


def parse_tool_calls(text: str, new_id: Callable[[], str] = new_call_id) -> ParsedReply:
    """Parse a whole reply (the same parser as streaming, fed in one piece)."""
    p = ToolCallStream(new_id)
    p.feed(text)
    p.finish()
    return p.reply()


def finish_reason(engine_reason: str, parser: ToolCallStream | ParsedReply) -> str:
    """OpenAI's ``finish_reason``: ``"tool_calls"`` when the reply made calls and ended on
    its own (``"stop"``), else the engine's reason (``"length"`` stays ``"length"``)."""
    calls = parser.calls if isinstance(parser, ToolCallStream) else parser.tool_calls
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def chunk_deltas(deltas: list[Delta]) -> list[dict]:
    """The ``choices[].delta`` dicts for a list of deltas, one per chat chunk: content
    pieces in a row are joined (``{"content": ...}``), as are argument pieces of the same
    call; a call's first delta is its own chunk (``{"tool_calls": [{index, id, type,
    function: {name, arguments: ""}}]}``), as OpenAI sends it."""
    out: list[dict] = []
    prev: Delta | None = None
    for d in deltas:
        if isinstance(d, ContentDelta):
            if isinstance(prev, ContentDelta):
                out[-1]["content"] += d.text
            else:
                out.append({"content": d.text})
        elif (d.id is None and isinstance(prev, ToolCallDelta) and prev.id is None
              and prev.index == d.index):
            out[-1]["tool_calls"][0]["function"]["arguments"] += d.arguments
        else:
            out.append({"tool_calls": [d.to_openai()]})
        prev = d
    return out
