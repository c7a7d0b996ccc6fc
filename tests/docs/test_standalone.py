"""The repository stands alone: no source, test or doc cites a document that is not in it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# a path-like mention of a markdown file (a folder path, then a name ending in .md)
_MD = re.compile(r"(?<![\w/.-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)\b")


def _tracked() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [ROOT / f for f in out if f.endswith((".py", ".pyx", ".pxd", ".pyi", ".h", ".md",
                                                 ".toml", ".txt"))]


def test_every_cited_markdown_file_exists_in_the_repository():
    missing = []
    for path in _tracked():
        for m in _MD.finditer(path.read_text(errors="replace")):
            name = m.group(1)
            if name.startswith(("http", "www.")):
                continue
            candidates = [ROOT / name, path.parent / name, ROOT / "docs" / name,
                          ROOT / "benchmarks" / name, ROOT / "benchmarks" / "results" / name]
            if not any(c.exists() for c in candidates):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)
