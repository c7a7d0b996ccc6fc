"""The README's engine example runs as written (served through the app)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.http import client_for, post_json, post_stream

from tep.engine import EngineBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(# mybatched\.py.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


async def test_readme_engine_example_serves():
    code = _example()
    assert len(code.strip().splitlines()) <= 32
    ns: dict = {}
    exec(compile(code, "mybatched.py", "exec"), ns)
    be = EngineBackend(ns["BigramModel"](), max_num_seqs=8)
    async with client_for(be) as c:
        st, js = await post_json(c, "/v1/completions", {"model": "bigram", "prompt": "Hi",
                                                        "max_tokens": 12, "seed": 1})
        assert st == 200 and js["choices"][0]["finish_reason"] in ("stop", "length")
        st, ev, _ = await post_stream(c, "/v1/chat/completions", {
            "model": "bigram", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 12, "seed": 1})
        assert st == 200 and ev[-1] == "[DONE]"
        st, js2 = await post_json(c, "/v1/chat/completions", {
            "model": "bigram", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 12, "seed": 1})
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-1]
                       if e["choices"])
        assert text == js2["choices"][0]["message"]["content"]
    be.close()
