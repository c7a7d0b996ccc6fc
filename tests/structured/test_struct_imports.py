"""tep.structured has no import circles and does not reach into the layers above it, and
the engine's chat entry cuts a default answer length through the sink's public method.

The import graph is read from the source (every ``import``/``from`` statement, those inside
functions too, since a deferred import is still a dependency), so a circle hidden behind a
function-level import is caught.
"""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import tep
from tep.backend import ChatStreamSink

ROOT = Path(tep.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The tep modules ``path`` imports (any depth in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tep"))
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("tep") and node.level == 0:
            out.add(node.module)
            for a in node.names:   # "from tep.structured import grammar" is a module
                if (ROOT.parent / (node.module.replace(".", "/") + f"/{a.name}.py")).exists():
                    out.add(f"{node.module}.{a.name}")
    return out


def _graph(package: str) -> dict[str, set[str]]:
    base = ROOT.parent / package.replace(".", "/")
    mods = {_module(p): p for p in base.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_structured_has_no_import_circle():
    # the package's __init__ re-exports everything: leave it out, it is not a dependency
    g = {m: d - {"tep.structured"} for m, d in _graph("tep.structured").items()
         if m != "tep.structured"}
    assert "tep.structured.tools" in g["tep.structured.spec"]   # the graph is real
    assert _cycle(g) is None, _cycle(g)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_structured_does_not_import_the_layers_above():
    above = ("tep.backends", "tep.serving", "tep.server", "tep.engine")
    for p in (ROOT / "structured").rglob("*.py"):
        bad = [i for i in _imports(p) if i.startswith(above)]
        assert not bad, (p.name, bad)


def test_the_toy_tokenizer_words_come_from_the_toy():
    from tep.backends.toy import _word, toy_tokenizer

    tok = toy_tokenizer(300)
    assert tok.decode_bytes([299]) == _word(299).encode()


def test_engine_chat_cuts_the_default_answer_length_through_the_sink():
    """A chat prompt that leaves 5 tokens of context and no max_tokens: the sink, made
    before the prompt was rendered, stops after 5 (its public lower_max_tokens)."""
    from tep.backends.toy import ToyBackend, ToyModel
    from tep.engine import EngineBackend
    from tep.wire.chat import parse_chat_request

    model = ToyModel(ToyBackend("tep-toy"), max_num_seqs=4, context_size=64)
    backend = EngineBackend(model, max_num_seqs=4)
    try:
        msgs = [{"role": "user", "content": "x"}]
        n_prompt = len(backend.chat_prompt_ids(msgs))
        pad = "y" * (64 - 5 - n_prompt)
        req = parse_chat_request({"model": "tep-toy", "messages": [
            {"role": "user", "content": "x" + pad}], "logit_bias": {"256": -100}},
            "chatcmpl-t", default_max_tokens=256)
        sink = ChatStreamSink(req.sampling, cancel=threading.Event())
        assert sink._max_tokens == 256
        backend.chat_completion_stream(req, sink)
        out = sink.result()
        assert sink.prompt_tokens == 64 - 5
        assert out.finish_reason == "length" and len(out.token_ids) == 5
    finally:
        backend.close()
