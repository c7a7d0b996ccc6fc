"""hypothesis strategies for the grammar fuzz: regexes, JSON schemas and Lark grammars,
each with an independent oracle (Python's ``re`` for regexes and for the Lark grammars,
which are built from a regex tree, ``jsonschema`` for schemas).

The regex tree uses syntax that Rust's ``regex`` (llguidance) and Python's ``re`` read the
same way: literal letters, digits and a few punctuation marks, ``[...]`` classes,
concatenation, alternation and counted repetition. ``explosive`` gives counted repetitions
large enough to exceed the matcher's limits: such a request must be a 4xx (or, should
llguidance follow it, never finish wrong).
"""
from __future__ import annotations

import json

from hypothesis import strategies as st

LITERALS = "abcxyz019 _-"
CLASSES = ["[a-c]", "[0-9]", "[xyz]", "[a-z0-9]"]


def _lit(ch: str) -> tuple:
    return ("lit", ch)


def regex_trees(max_leaves: int = 10):
    """Trees: ("lit", c) | ("cls", "[..]") | ("cat", [t..]) | ("alt", [t..]) |
    ("rep", t, m, n) | ("opt", t)."""
    leaf = st.one_of(st.sampled_from(LITERALS).map(_lit),
                     st.sampled_from(CLASSES).map(lambda c: ("cls", c)))

    def extend(inner):
        return st.one_of(
            st.lists(inner, min_size=2, max_size=4).map(lambda ts: ("cat", ts)),
            st.lists(inner, min_size=2, max_size=3).map(lambda ts: ("alt", ts)),
            st.tuples(inner, st.integers(0, 2), st.integers(0, 3)).map(
                lambda t: ("rep", t[0], min(t[1], t[2]), max(t[1], t[2]))),
            inner.map(lambda t: ("opt", t)))

    return st.recursive(leaf, extend, max_leaves=max_leaves)


def explosive() -> st.SearchStrategy:
    """A non-empty core (a literal, a class, or a few of them in a row) repeated a million
    times, flat or nested three deep (100 x 100 x 100)."""
    core = st.lists(st.one_of(st.sampled_from("abcxyz01").map(_lit),
                              st.sampled_from(CLASSES).map(lambda c: ("cls", c))),
                    min_size=1, max_size=3).map(lambda ts: ts[0] if len(ts) == 1
                                                else ("cat", ts))
    flat = st.tuples(core, st.just(1_000_000)).map(
        lambda t: ("rep", t[0], t[1], t[1]))
    nested = core.map(lambda c: ("rep", ("rep", ("rep", c, 100, 100), 100, 100), 100, 100))
    return st.one_of(flat, nested)


def to_regex(t) -> str:
    k = t[0]
    if k == "lit":
        return "\\-" if t[1] == "-" else t[1]
    if k == "cls":
        return t[1]
    if k == "cat":
        return "".join(_group(x) for x in t[1])
    if k == "alt":
        return "|".join(to_regex(x) for x in t[1])
    if k == "rep":
        return f"{_group(t[1])}{{{t[2]},{t[3]}}}" if t[2] != t[3] else \
            f"{_group(t[1])}{{{t[2]}}}"
    return f"{_group(t[1])}?"


def _group(t) -> str:
    s = to_regex(t)
    return s if t[0] in ("lit", "cls") else f"({s})"


def to_lark(t) -> str:
    """A Lark grammar with one rule per inner node, equivalent to ``to_regex(t)``."""
    rules: list[str] = []

    def name(x) -> str:
        k = x[0]
        if k == "lit":
            return json.dumps(x[1])
        if k == "cls":
            return f"/{x[1]}/"
        r = f"r{len(rules)}"
        rules.append("")
        i = len(rules) - 1
        if k == "cat":
            body = " ".join(name(y) for y in x[1])
        elif k == "alt":
            body = " | ".join(name(y) for y in x[1])
        elif k == "rep":
            body = f"{name(x[1])}{{{x[2]},{x[3]}}}"
        else:
            body = f"{name(x[1])}?"
        rules[i] = f"{r}: {body}"
        return r

    top = name(t)
    return "\n".join([f"start: {top}", *rules]) + "\n"


def _leaf_schemas():
    return st.one_of(
        st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
        st.lists(st.text("abc xyz", min_size=1, max_size=5), min_size=1, max_size=4,
                 unique=True).map(lambda v: {"enum": v}),
        st.sampled_from([1, "k", True, None]).map(lambda v: {"const": v}),
        st.just({"type": "string", "pattern": "^[a-c]{1,3}$"}),
    )


def json_schemas(max_leaves: int = 6):
    """Objects (closed, some required), arrays (bounded), anyOf, over bounded leaves."""
    def extend(inner):
        obj = st.dictionaries(st.sampled_from(["a", "b", "c", "id", "name"]), inner,
                              min_size=1, max_size=3).flatmap(
            lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
                lambda req: {"type": "object", "properties": props, "required": req,
                             "additionalProperties": False}))
        arr = st.tuples(inner, st.integers(0, 2), st.integers(0, 3)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": min(t[1], t[2]),
                       "maxItems": max(t[1], t[2])})
        return st.one_of(obj, arr, st.lists(inner, min_size=2, max_size=3).map(
            lambda v: {"anyOf": v}))

    return st.recursive(_leaf_schemas(), extend, max_leaves=max_leaves)


def bodies(explode: bool = True):
    """(request body fragment, oracle kind, oracle value) triples; kind "big" (an
    explosive repetition) has no oracle: it must be a 4xx, or run past the walk."""
    trees = regex_trees()
    rx = trees.map(lambda t: ({"guided_regex": to_regex(t)}, "regex", to_regex(t)))
    lark = trees.map(lambda t: ({"guided_grammar": to_lark(t)}, "regex", to_regex(t)))
    js = json_schemas().map(lambda s: ({"guided_json": s}, "json", s))
    choice = st.lists(st.text("abc xyz01", min_size=1, max_size=6), min_size=1,
                      max_size=5).map(lambda v: ({"guided_choice": v}, "choice", v))
    out = [rx, lark, js, rx, lark, js, choice] * 2
    if explode:   # about one case in eight: each costs the matcher up to seconds to refuse
        out.append(explosive().map(lambda t: ({"guided_regex": to_regex(t)}, "big", None)))
        out.append(explosive().map(lambda t: ({"guided_grammar": to_lark(t)}, "big", None)))
    return st.one_of(*out)
