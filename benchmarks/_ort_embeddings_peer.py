"""ONNX Runtime (CPU) embeddings peer for bench_peers_embeddings.py — runs in the PEER venv.

Never imported by tep: torch, onnx and onnxruntime live only in the peer interpreter
(``.venv-peers``). The benchmark starts this file as a subprocess and talks JSON lines over
stdin/stdout, so the two contenders can be timed in interleaved rounds:

  -> {"cmd": "init", "model_dir": ..., "onnx": path, "sentences": [...], "threads": [1, 2]}
  <- {"ok": true, "versions": {...}, "exported": bool, "providers": [...]}
  -> {"cmd": "round", "batch": b, "threads": t, "n_sent": k}
  <- {"seconds": total, "calls": [seconds per call, ...]}
  -> {"cmd": "one", "index": i, "threads": t, "reps": r}   <- {"calls": [...]}  (sentence i alone)
  -> {"cmd": "vectors", "n_sent": k}                        (float32 [k, 384], base64)
  -> {"cmd": "quit"}

The graph is exported once from the same safetensors weights (Hugging Face ``BertModel``
through ``torch.onnx.export``, dynamic batch and sequence axes) and cached at ``onnx``.
Each call is what fastembed / Infinity do per request: tokenise with the same
``tokenizer.json`` (padding to the longest in the batch, truncation at 256), run the
session with input_ids / attention_mask / token_type_ids, mean-pool over the mask, L2
normalise. One InferenceSession per thread count: intra_op_num_threads = t,
inter_op_num_threads = 1, sequential execution, ORT_ENABLE_ALL graph optimisations.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _export(model_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    bert.requires_grad_(False)  # weights become graph constants

    class Graph(torch.nn.Module):  # keyword arguments: forward's positional order varies
        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            return bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids).last_hidden_state

    model = Graph().eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    types = torch.zeros_like(ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.inference_mode():
        torch.onnx.export(
            model, (ids, mask, types), str(tmp), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                          ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
            do_constant_folding=True)
    tmp.replace(out)


class Peer:
    def __init__(self, cfg: dict) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.np = np
        model_dir = Path(cfg["model_dir"])
        onnx_path = Path(cfg["onnx"])
        self.exported = False
        if not onnx_path.is_file():
            _export(model_dir, onnx_path)
            self.exported = True
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.enable_truncation(max_length=int(cfg.get("max_len", 256)))
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in each batch
        self.tok = tok
        self.sentences = cfg["sentences"]
        self.sessions = {}
        for t in cfg["threads"]:
            so = ort.SessionOptions()
            so.intra_op_num_threads = int(t)
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[int(t)] = ort.InferenceSession(str(onnx_path), so,
                                                         providers=["CPUExecutionProvider"])
        import onnxruntime
        import tokenizers
        self.versions = {"onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__,
                         "numpy": np.__version__}
        try:
            import torch
            self.versions["torch (export only)"] = torch.__version__
        except ImportError:
            pass

    def embed(self, texts: list[str], threads: int):
        np = self.np
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        hidden = self.sessions[threads].run(
            None, {"input_ids": ids, "attention_mask": mask,
                   "token_type_ids": np.zeros_like(ids)})[0]
        m = mask[:, :, None].astype(np.float32)
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def round(self, batch: int, threads: int, n_sent: int) -> dict:
        s = self.sentences[:n_sent]
        calls = []
        t_all = time.perf_counter()
        for i in range(0, len(s), batch):
            t0 = time.perf_counter()
            self.embed(s[i:i + batch], threads)
            calls.append(time.perf_counter() - t0)
        return {"seconds": time.perf_counter() - t_all, "calls": calls}


def main() -> int:
    peer = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "init":
                peer = Peer(msg)
                reply = {"ok": True, "versions": peer.versions, "exported": peer.exported}
            elif cmd == "round":
                reply = peer.round(int(msg["batch"]), int(msg["threads"]), int(msg["n_sent"]))
            elif cmd == "one":
                text, t = peer.sentences[int(msg["index"])], int(msg["threads"])
                calls = []
                for _ in range(int(msg.get("reps", 1))):
                    t0 = time.perf_counter()
                    peer.embed([text], t)
                    calls.append(time.perf_counter() - t0)
                reply = {"calls": calls}
            elif cmd == "vectors":
                v = peer.embed(peer.sentences[:int(msg["n_sent"])], min(peer.sessions))
                reply = {"shape": list(v.shape),
                         "b64": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            elif cmd == "quit":
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as e:  # reported to the benchmark, which prints "peer unavailable"
            reply = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
