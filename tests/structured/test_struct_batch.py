"""A batch mixing constrained and unconstrained sequences gives each sequence the same
tokens as when it runs alone (same seed): masks are per row, draws keyed on (seed, step)."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np

from struct_drive import sample_masked
from tep.backends.toy import ToyBackend
from tep.structured import StepMasks, make_constraint, parse_structured
from tep.backends.toy import toy_tokenizer

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                 "maximum": 99},
                                           "s": {"type": "string", "maxLength": 8}},
          "required": ["n", "s"], "additionalProperties": False}
BODIES = [{"guided_json": SCHEMA}, None, {"guided_regex": "[a-z]{3,9}"}, None,
          {"guided_choice": ["left", "right"]}, {"guided_json": SCHEMA}]
SEEDS = [11, 12, 13, 14, 15, 16]
MAX_TOKENS = 40


def _run(model: ToyBackend, idx: list[int]) -> dict[int, list[int]]:
    """Run sequences ``idx`` together until each ends (EOS or MAX_TOKENS)."""
    tok = toy_tokenizer(model.vocab_size)
    prompt = list(b"Answer: ")
    ctx = {i: list(prompt) for i in idx}
    out: dict[int, list[int]] = {i: [] for i in idx}
    cons = {i: make_constraint(parse_structured(BODIES[i], "completions").constraint, tok)
            if BODIES[i] else None for i in idx}
    live = list(idx)
    masks = StepMasks(model.vocab_size)     # the engine's recipe: start, forward, finish
    while live:
        masks.start(len(live), [(r, cons[i]) for r, i in enumerate(live)
                                if cons[i] is not None])
        logits = np.stack([model._logits(ctx[i]) for i in live]).astype(np.float32)
        bm = masks.finish().bitmask
        if bm is None:
            assert all(cons[i] is None for i in live)
            bm = np.full((len(live), (model.vocab_size + 31) // 32), -1, np.int32)
        toks = sample_masked(logits, bm, seed=[SEEDS[i] for i in live],
                             step=[len(out[i]) for i in live], temperature=0.9)
        nxt = []
        for i, t in zip(live, toks.tolist()):
            c = cons[i]
            assert c is None or c.accept(t)
            out[i].append(t)
            ctx[i].append(t)
            if t != 256 and len(out[i]) < MAX_TOKENS:
                nxt.append(i)
        live = nxt
    masks.close()
    return out


def test_mixed_batch_equals_alone():
    model = ToyBackend(vocab_size=257)
    together = _run(model, list(range(len(BODIES))))
    for i in range(len(BODIES)):
        assert _run(model, [i])[i] == together[i], i
    # and the constrained ones obey their constraints
    for i, body in enumerate(BODIES):
        toks = together[i]
        if body is None:
            continue
        assert toks[-1] == 256
        text = bytes(toks[:-1]).decode()
        if "guided_json" in body:
            jsonschema.validate(json.loads(text), SCHEMA)
        elif "guided_regex" in body:
            assert re.fullmatch(body["guided_regex"], text)
        else:
            assert text in body["guided_choice"]


def test_a_constrained_row_changes_only_its_own_tokens():
    """Removing the constraint from row 0 changes row 0's tokens but no other row's."""
    model = ToyBackend(vocab_size=257)
    base = _run(model, [0, 1, 3])
    BODIES_0 = BODIES[0]
    try:
        BODIES[0] = None
        free = _run(model, [0, 1, 3])
    finally:
        BODIES[0] = BODIES_0
    assert free[0] != base[0]
    assert free[1] == base[1] and free[3] == base[3]
