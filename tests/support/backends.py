"""Backends used by the server tests (pure Python, no kernels), importable by a live
server as ``support.backends:Name`` with this directory on PYTHONPATH.

ScriptBackend behaviour is keyed on the prompt / last chat message:
  token 1 / "boom"        -> raise RuntimeError before any token
  token 2 / "boom-later"  -> emit 3 tokens, then raise RuntimeError
  token 3 / "slow"        -> one token per 20 ms until stopped; records how it stopped
  token 4 / "eos"         -> 5 tokens then emit_finish("stop")
  token 5 / "bad"         -> raise tep.errors.BadRequestError(param="prompt")
otherwise a deterministic function of (prompt, seed, step).
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

import tep
from tep.errors import BadRequestError

_ALPHA = "abcdefghijklmnopqrstuvwxyz "


def _mix(*xs: int) -> int:
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def record(event: dict) -> None:
    """Append an event to $TEP_TEST_EVENTS (a JSONL file) and to ScriptBackend.events."""
    ScriptBackend.events.append(event)
    path = os.environ.get("TEP_TEST_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


class ScriptBackend(tep.Backend):
    """Deterministic pure-Python backend with byte-level tokenize/detokenize."""

    events: list = []
    threads: set = set()

    def list_models(self):
        return ["script", "other/model"]

    def supports_chat(self):
        return True

    def supports_embeddings(self):
        return True

    def embedding_dimensions(self, model):
        return 8

    def tokenize(self, model, text):
        return list(text.encode("utf-8"))

    def detokenize(self, model, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def prompt_logprobs(self, model, token_ids, top_n):
        """-0.25 for every prompt token after the first (which has none)."""
        return [tep.TokenLogprob(token=self.detokenize(model, [t]),
                                 logprob=None if i == 0 else -0.25, token_id=t,
                                 top=None if i == 0 else [(self.detokenize(model, [t]), -0.25)]
                                 [:top_n])
                for i, t in enumerate(token_ids)]

    def _token(self, key: int, sampling, step: int) -> int:
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        if sampling.temperature == 0:
            seed = 0
        return ord(_ALPHA[_mix(key, seed, step) % len(_ALPHA)])

    def _run(self, key: int, mode: str, sampling, sink, threshold: int | None = None):
        if mode == "boom":
            raise RuntimeError("boom: secret internal detail")
        if mode == "bad":
            raise BadRequestError("the script backend rejects this prompt", param="prompt")
        ScriptBackend.threads.add(threading.current_thread().name)
        step = 0
        started = time.monotonic()
        while step < sampling.max_tokens or mode == "slow":
            if mode == "boom-later" and step == 3:
                raise RuntimeError("boom later: secret internal detail")
            if mode == "eos" and step == 5:
                sink.emit_finish("stop")
                return
            tok = self._token(key, sampling, step)
            kw = {}
            if sampling.logprobs is not None:
                alt = ord("z") if tok != ord("z") else ord("y")
                kw = {"logprob": -0.5, "top_logprobs": [(tok, -0.5), (alt, -1.5)]}
            ok = sink.emit_token(chr(tok), token_id=tok, **kw)
            step += 1
            if not ok:
                if mode == "slow":
                    record({"mode": "slow", "stopped_after": step, "cancelled": sink.cancelled,
                            "start": started, "end": time.monotonic(),
                            "max_tokens": sampling.max_tokens})
                return
            if mode == "slow":
                time.sleep(0.02)
                if step > 5000:  # never run away in a broken test
                    return

    @staticmethod
    def _mode(ids) -> str:
        for tok, mode in ((1, "boom"), (2, "boom-later"), (3, "slow"), (4, "eos"), (5, "bad")):
            if tok in ids:
                return mode
        return "normal"

    def generate_stream_from_tokens(self, model, token_ids, sampling, sink):
        self._run(_mix(*token_ids), self._mode(token_ids), sampling, sink)

    def chat_completion_stream(self, req, sink):
        last = req.messages[-1].get("content") or ""
        if not isinstance(last, str):
            last = "".join(p.get("text", "") for p in last)
        mode = last if last in ("boom", "boom-later", "slow", "eos", "bad") else "normal"
        sink.prompt_tokens = sum(len(str(m.get("content") or "")) for m in req.messages)
        self._run(_mix(*last.encode()), mode, req.sampling, sink)

    def generate_embeddings(self, model, token_ids):
        if 1 in token_ids:
            raise RuntimeError("embedding boom")
        v = np.array([len(token_ids), sum(token_ids) % 97, 1, 2, 3, 4, 5, 6], dtype=np.float32)
        return v / np.linalg.norm(v)


class CompletionOnlyBackend(tep.Backend):
    """Writes only the non-streaming methods; streaming is derived by tep."""

    def list_models(self):
        return ["fixed"]

    def supports_chat(self):
        return True

    def generate_from_tokens(self, model, token_ids, sampling):
        text = "hello world STOP after"
        return tep.Completion(text=text, token_ids=list(range(10, 10 + len(text))),
                              finish_reason="stop")

    def chat_completion(self, req):
        return tep.Completion(text="fixed answer", token_ids=[1, 2], finish_reason="stop",
                              prompt_tokens=7)


class StreamOnlyNoDetok(tep.Backend):
    """Streams, no tokenize/detokenize hooks: text prompts must be refused."""

    def list_models(self):
        return ["ids-only"]

    def generate_stream_from_tokens(self, model, token_ids, sampling, sink):
        for i in range(sampling.max_tokens):
            if not sink.emit_token("x", token_id=120, logprob=-1.0,
                                   top_logprobs=[(120, -1.0), (121, -2.0)]):
                return


class BrokenModelsBackend(tep.Backend):
    """list_models raises: a 500 in the envelope, not a crash."""

    def list_models(self):
        raise RuntimeError("models exploded")
