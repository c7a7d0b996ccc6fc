"""``POST /v1/completions``: parse, admit, run one backend call per choice, answer JSON or
stream ``text_completion`` chunks."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, Iterable

from tep import errors as E
from tep.backend import Completion, StreamSink
from tep.backend.interface import _overrides
from tep.obs.telemetry import RequestRecord
from tep.serving import calls as C
from tep.serving import prepare as P
from tep.serving.bridge import StreamBridge
from tep.serving.replies import Reply, StreamReply, json_reply
from tep.serving.sse import sse, sse_text_template
from tep.serving.state import ServerState
from tep.serving.stream import ChunkRenderer, first_event, stream_reply
from tep.wire.completions import CompletionRequest, parse_completion_request
from tep.wire.shapes import completion_logprobs, new_id, now, usage
from tep.wire.values import parse_json_body

__all__ = ["completions"]


async def completions(state: ServerState, rec: RequestRecord,
                      read_body: Callable[[], Awaitable[bytes]]) -> Reply | StreamReply:
    """``POST /v1/completions``."""
    backend = state.backend
    rid = rec.request_id = new_id("cmpl")
    body = parse_json_body(await read_body())
    req = parse_completion_request(body, rid)
    rec.model, rec.sampling = req.model, req.sampling
    C.check_model(state, req.model)
    req.structured = await P.parse_structure(state, body, "completions")
    C.check_max_tokens(state, req.model, req.sampling.max_tokens, "max_tokens")
    s = req.sampling
    texts = any(isinstance(p, str) for p in req.prompts)
    if texts and not backend.supports_tokenize():
        raise E.BadRequestError(C.TOKEN_IDS_ONLY.format(param="prompt"), param="prompt")
    if req.echo and not backend.supports_detokenize() and \
            not all(isinstance(p, str) for p in req.prompts):
        raise E.NotSupportedError("'echo' with token-ID prompts needs a backend with a "
                                  "detokenize hook", param="echo")
    if req.echo and s.logprobs is not None and not backend.supports_prompt_logprobs():
        raise E.BadRequestError("'echo' with 'logprobs' needs the prompt's logprobs, which "
                                "this backend does not compute", param="echo")
    cancel = await C.admit(state, rec)
    try:
        # token-ID prompts need no tokenizer: no trip through the pool for them
        prompt_ids = (await C.call(state, rid, cancel, "tokenize", C.tokenize_all, backend,
                                   req.model, req.prompts)
                      if texts else req.prompts)
        rec.prompt_tokens = sum(len(x) for x in prompt_ids)
        echoes: list[tuple[str, list]] = []
        if req.echo:
            for p, ids in zip(req.prompts, prompt_ids):
                echoes.append(await C.call(state, rid, cancel, "detokenize", C.echo_parts,
                                           backend, req.model, p, ids, s.logprobs))
        if req.stream:
            return await _stream(state, rec, req, rid, prompt_ids, echoes, cancel)
        return await _complete(state, rec, req, rid, prompt_ids, echoes, cancel)
    except BaseException:
        C.release(state, cancel)
        raise


async def _complete(state: ServerState, rec: RequestRecord, req: CompletionRequest,
                    rid: str, prompt_ids: list[list[int]], echoes: list,
                    cancel: threading.Event) -> Reply:
    backend, s, n = state.backend, req.sampling, req.wire.n
    submit = getattr(backend, "submit", None)   # a non-blocking entry (tep.engine)
    own = submit is None and _overrides(backend, "generate_from_tokens")
    token_text = backend._token_text_fn(req.model)
    # one matcher per choice, compiled in the worker pool (not on the loop)
    cons = await P.prepared_constraints(state, req.structured.constraint,
                                        len(prompt_ids) * n) if submit is not None else None
    try:
        jobs = []
        for ids in prompt_ids:
            for j in range(n):
                if s.max_tokens == 0:
                    jobs.append(asyncio.sleep(0, Completion(finish_reason="length")))
                elif submit is not None:
                    sk = s.for_choice(j)
                    jobs.append(C.submit_choice(
                        rid, cancel, "generation",
                        StreamSink(sk, cancel=cancel, token_text=token_text,
                                   prompt_tokens=len(ids)),
                        lambda sink, done, ids=ids, sk=sk, c=_nth(cons, len(jobs)): submit(
                            req.model, ids, sk, sink, done,
                            constraint=c or req.structured.constraint)))
                else:
                    jobs.append(C.call(state, rid, cancel, "generation",
                                       backend.generate_from_tokens, req.model, ids,
                                       s.for_choice(j)))
        results, cut = await C.gather_choices(state, rec, cancel, jobs)
    finally:
        C.release(state, cancel)
    choices = []
    completion_tokens = 0
    for k, c in enumerate(results):
        if own:
            c = C.replay(s, c, token_text=token_text)
        if cut[k]:
            c.finish_reason = "length"
        if s.logprobs is not None and state.events.enabled:
            state.events.steps(rid, k, 0, c.logprobs or [])
        echo_text, echo_lp = echoes[k // n] if req.echo else ("", [])
        completion_tokens += c.completion_tokens if c.completion_tokens is not None \
            else len(c.token_ids)
        lp = None
        if s.logprobs is not None:
            lp = completion_logprobs(echo_lp, 0)
            gen = completion_logprobs(c.logprobs or [], len(echo_text))
            for key in lp:
                lp[key] += gen[key]
        choices.append({"index": k, "text": echo_text + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason})
    prompt_tokens = sum(len(x) for x in prompt_ids)
    rec.completion_tokens = completion_tokens
    return json_reply({"id": rid, "object": "text_completion", "created": now(),
                       "model": req.model,
                       "system_fingerprint": C.fingerprint(state, req.model),
                       "choices": choices,
                       "usage": usage(prompt_tokens, completion_tokens)})


def _nth(items: list | None, k: int) -> Any:
    """Choice ``k``'s prepared matcher (None when the backend compiles its own)."""
    return items[k] if items else None


class _Chunks(ChunkRenderer):
    """``text_completion`` chunks."""

    def __init__(self, req: CompletionRequest, rid: str, prompt_ids: list[list[int]],
                 echoes: list, fingerprint: str | None = None) -> None:
        self.req, self.rid, self.created = req, rid, now()
        self.fingerprint = fingerprint
        self.echoes = echoes
        self.n_choices = len(prompt_ids) * req.wire.n
        self.prompt_tokens = sum(len(x) for x in prompt_ids)
        self.include_usage = req.wire.include_usage
        self._usage_null = {"usage": None} if self.include_usage else {}
        self._want_lp = req.sampling.logprobs is not None
        n = req.wire.n
        self._echo_len = [len(echoes[k // n][0]) if req.echo else 0
                          for k in range(self.n_choices)]
        # the common chunk (a token's text, no logprobs) from a byte template
        self._plain = None if self._want_lp else sse_text_template(
            lambda k, text: self._payload(k, text, None, None))

    def _payload(self, k: int, text: str, lp: Any, finish: str | None) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.req.model, "system_fingerprint": self.fingerprint,
                "choices": [{"index": k, "text": text, "logprobs": lp,
                             "finish_reason": finish}], **self._usage_null}

    def _chunk(self, k: int, text: str, lps: list | None, finish: str | None,
               base: int) -> bytes:
        lp = completion_logprobs(lps, base) if self._want_lp and lps is not None else None
        return sse(self._payload(k, text, lp, finish))

    def opening(self) -> Iterable[bytes]:
        if self.req.echo:
            n = self.req.wire.n
            for k in range(self.n_choices):
                text, lps = self.echoes[k // n]
                yield self._chunk(k, text, lps, None, 0)

    def delta(self, k: int, text: str, lps: list | None) -> Iterable[bytes]:
        if self._plain is not None:
            return (self._plain(k, text),)
        return (self._chunk(k, text, lps, None, self._echo_len[k]),)

    def finish(self, k: int, reason: str) -> Iterable[bytes]:
        return (self._chunk(k, "", [], reason, self._echo_len[k]),)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return sse({"id": self.rid, "object": "text_completion", "created": self.created,
                    "model": self.req.model, "system_fingerprint": self.fingerprint,
                    "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})


async def _stream(state: ServerState, rec: RequestRecord, req: CompletionRequest, rid: str,
                  prompt_ids: list[list[int]], echoes: list,
                  cancel: threading.Event) -> StreamReply:
    backend, s, n = state.backend, req.sampling, req.wire.n
    token_text = backend._token_text_fn(req.model)
    bridge = StreamBridge(state.pool(), cancel, rid)
    submit = getattr(backend, "submit", None)   # a non-blocking entry (tep.engine)
    render = _Chunks(req, rid, prompt_ids, echoes, C.fingerprint(state, req.model))
    cons = await P.prepared_constraints(state, req.structured.constraint,
                                        render.n_choices) if submit is not None else None
    for k in range(render.n_choices):
        ids, sk = prompt_ids[k // n], s.for_choice(k % n)
        if s.max_tokens == 0:
            bridge.start(k, lambda on_delta, on_role, sk=sk: StreamSink(sk, cancel=cancel),
                         lambda sink: None)
            continue
        make = (lambda on_delta, on_role, sk=sk, ids=ids: StreamSink(
            sk, cancel=cancel, on_delta=on_delta, token_text=token_text,
            prompt_tokens=len(ids)))
        if submit is not None:
            bridge.start_submitted(k, make, lambda sink, done, sk=sk, ids=ids,
                                   c=_nth(cons, k): submit(
                req.model, ids, sk, sink, done, constraint=c or req.structured.constraint))
        else:
            bridge.start(k, make, lambda sink, sk=sk, ids=ids:
                         backend.generate_stream_from_tokens(req.model, ids, sk, sink))
    events, first = await first_event(state, bridge, C.deadline(state), "generation")
    return stream_reply(state, rec, bridge, events, first, render, "generation",
                        C.step_recorder(state, rid, render.n_choices, s.logprobs))
