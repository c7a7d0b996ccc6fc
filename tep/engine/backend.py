"""``EngineBackend``: a :class:`tep.Backend` that serves a :class:`tep.engine.Model`
through the continuous-batching :class:`~tep.engine.engine.Engine`.

The server sees an ordinary backend (list_models, tokenize, chat, embeddings), plus a
non-blocking entry: :meth:`EngineBackend.submit` queues a sequence and returns at once;
the engine thread drives the sink and calls ``on_done`` when the sequence ends. The
server's handlers use it when a backend has it, so a stream costs no worker thread. The
blocking ``generate_stream_from_tokens`` / ``chat_completion_stream`` still work (they
wait on an event), for callers that are threads themselves.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple, Sequence

from tep.backend import Backend, ChatStreamSink, StreamSink
from tep.engine.embed_batcher import EmbedBatcher
from tep.engine.engine import Engine, EngineStats
from tep.errors import BadRequestError
from tep.wire.chat import text_message

__all__ = ["EngineBackend", "PreparedChat"]

OnDone = Callable[[BaseException | None], None]


def _takes(fn: Any, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (optional model hooks' extras)."""
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class PreparedChat(NamedTuple):
    """A chat request made ready for the engine (:meth:`EngineBackend.prepare_chat`).

    Attributes:
        token_ids: the rendered, tokenized prompt.
        max_tokens: the answer length to use: the request's, or, when it set none, the
            server's default cut to what the context has left.
    """

    token_ids: list[int]
    max_tokens: int


class EngineBackend(Backend):
    """Serve ``model`` with continuous batching.

    Args:
        model: a :class:`tep.engine.Model` (optionally with the text, chat, prefix and
            embedding hooks).
        max_num_seqs: most sequences in one step (model slots).
        max_batch_tokens: most tokens fed per step (prompt chunks + decoded tokens).
        embed_wait_ms: how long a lone embeddings request may wait for others to join
            its batch (when the model has ``embed``).
        embed_max_batch: most inputs in one ``embed`` call.
        chat_prompt: optional ``f(messages) -> str`` used instead of ``model.chat_template``.
        speculative: a :class:`tep.engine.speculative.SpecConfig` (None = off).
        overlap: start a steady decode step's forward while the previous step's tokens
            are delivered (:class:`tep.engine.Engine`'s ``overlap``).
    """

    def __init__(self, model: Any, *, max_num_seqs: int = 64, max_batch_tokens: int = 2048,
                 embed_wait_ms: float = 2.0, embed_max_batch: int = 256,
                 chat_prompt: Callable[[list], str] | None = None,
                 record_steps: bool = False, speculative: Any = None,
                 overlap: bool = False) -> None:
        for name in ("vocab_size", "list_models", "forward", "release"):
            if not hasattr(model, name):
                raise TypeError(f"the model has no '{name}': it is not a tep.engine.Model")
        self.model = model
        self.engine = Engine(model, max_num_seqs=max_num_seqs,
                             max_batch_tokens=max_batch_tokens, record_steps=record_steps,
                             speculative=speculative, overlap=overlap)
        self._chat_prompt = chat_prompt
        self._embed = None
        if callable(getattr(model, "embed", None)):
            self._embed = EmbedBatcher(self._embed_locked, max_wait_ms=embed_wait_ms,
                                       max_batch=embed_max_batch)
        self._started = False
        self._lock = threading.Lock()

    def _embed_locked(self, model: str, inputs: list) -> Any:
        with self.engine.model_lock:   # never concurrently with forward
            return self.model.embed(inputs)

    # ---- lifecycle
    def _ensure_started(self) -> None:
        if not self._started:
            with self._lock:
                if not self._started:
                    self.engine.start()
                    self._started = True

    def close(self) -> None:
        """Stop the engine thread (live sequences are cancelled) and the embed batcher."""
        self.engine.stop()
        self._started = False
        if self._embed is not None:
            self._embed.stop()

    @property
    def stats(self) -> EngineStats:
        """The engine's counters (steps, tokens, prefix hits/misses, ...)."""
        return self.engine.stats

    # ---- metadata
    def list_models(self) -> list[str]:
        return list(self.model.list_models())

    def fingerprint(self, model: str) -> str | None:
        """The model's ``fingerprint()`` (optional hook), else None."""
        fp = getattr(self.model, "fingerprint", None)
        return fp() if callable(fp) else None

    def context_size(self, model: str) -> int | None:
        ctx = getattr(self.model, "context_size", None)
        return int(ctx) if ctx is not None else None

    def supports_chat(self) -> bool:
        return self._chat_prompt is not None or (
            getattr(self.model, "chat_template", None) is not None and self.supports_tokenize())

    def supports_constraints(self) -> bool:
        """True when the model gives an llguidance tokenizer (``structured_tokenizer()``),
        which turns grammars into token bitmasks over its vocabulary."""
        return callable(getattr(self.model, "structured_tokenizer", None))

    def supports_tokenize(self) -> bool:
        return callable(getattr(self.model, "tokenize", None))

    def supports_detokenize(self) -> bool:
        return callable(getattr(self.model, "detokenize", None))

    def supports_embeddings(self) -> bool:
        return self._embed is not None

    def embedding_dimensions(self, model: str) -> int | None:
        d = getattr(self.model, "embedding_dim", None)
        return int(d) if d is not None else None

    # ---- text
    def tokenize(self, model: str, text: str, add_special: bool | None = None) -> list[int]:
        """``add_special``: None = the model's default; True/False is passed to a model
        whose ``tokenize`` takes it (a model without special tokens adds none anyway)."""
        if add_special is not None and self._tokenize_takes_special():
            return [int(t) for t in self.model.tokenize(text, add_special=add_special)]
        return [int(t) for t in self.model.tokenize(text)]

    def _tokenize_takes_special(self) -> bool:
        return _takes(self.model.tokenize, "add_special")

    def detokenize(self, model: str, token_ids: list[int], special: bool = False) -> str:
        """``special``: spell out special tokens (passed to a model whose ``detokenize``
        takes it; generated text never shows them)."""
        self._check_ids(token_ids, "prompt")
        return self._detok(list(token_ids), special).decode("utf-8", errors="replace")

    def _detok(self, ids: list[int], special: bool) -> bytes:
        if special and _takes(self.model.detokenize, "special"):
            return bytes(self.model.detokenize(ids, special=True))
        return bytes(self.model.detokenize(ids))

    def token_bytes(self, model: str, token_ids: list[int]) -> list[bytes]:
        self._check_ids(token_ids, "tokens")
        return [self._detok([int(t)], True) for t in token_ids]

    def supports_chat_template(self) -> bool:
        return self.supports_chat()

    def apply_chat_template(self, req: Any) -> str:
        """The chat prompt text of ``req`` (what :meth:`submit_chat` tokenizes): with
        tools, the messages and tools as :func:`tep.structured.prepare_messages` gives
        them for this model's template."""
        if not self.supports_chat():
            from tep.errors import NotSupportedError

            raise NotSupportedError("This model has no chat template",
                                    code="chat_not_supported")
        st = getattr(req, "structured", None)
        if st is not None and st.tools is not None:
            from tep.structured import prepare_messages

            msgs, tools = prepare_messages(req.messages, st.tools,
                                           getattr(self.model, "chat_template", None))
        else:
            msgs, tools = req.messages, (req.raw or {}).get("tools")
        return self.chat_prompt_text(msgs, tools)

    def chat_prompt_text(self, messages: list[dict], tools: list | None = None) -> str:
        """The model's chat template (or ``chat_prompt``) rendered over ``messages`` with a
        generation prompt (a template error is a 400)."""
        msgs = [text_message(i, m) for i, m in enumerate(messages)]
        if self._chat_prompt is not None:
            return self._chat_prompt(msgs)
        from tep.engine.chat_template import TemplateError, render_chat

        try:
            return render_chat(self.model.chat_template, msgs, add_generation_prompt=True,
                               bos_token=getattr(self.model, "bos_token", "") or "",
                               eos_token=getattr(self.model, "eos_token", "") or "",
                               tools=tools)
        except TemplateError as e:
            raise BadRequestError(str(e), param="messages") from None

    def chat_prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The chat prompt's token IDs: :meth:`chat_prompt_text`, tokenized."""
        return self.tokenize("", self.chat_prompt_text(messages, tools))

    # ---- checks
    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        V = self.engine.vocab_size
        for t in ids:
            if not 0 <= int(t) < V:
                raise BadRequestError(f"token ID {int(t)} is outside the vocabulary [0, {V})",
                                      param=param)

    def _check_request(self, ids: Sequence[int], sampling: Any) -> None:
        if len(ids) == 0:
            raise BadRequestError("the prompt is empty: it must hold at least one token",
                                  param="prompt")
        self._check_ids(ids, "prompt")
        if sampling.logit_bias:
            self._check_ids(list(sampling.logit_bias), "logit_bias")
        if sampling.allowed_token_ids:
            self._check_ids(sampling.allowed_token_ids, "allowed_token_ids")
        ctx = getattr(self.model, "context_size", None)
        if ctx is not None and len(ids) + sampling.max_tokens > int(ctx):
            raise BadRequestError(
                f"This model's context is {int(ctx)} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens is {sampling.max_tokens} ({len(ids)} + "
                f"{sampling.max_tokens} > {int(ctx)}). Shorten the prompt or lower "
                f"max_tokens.", param="max_tokens", code="context_length_exceeded")

    # ---- the non-blocking entry
    def make_constraint(self, spec: Any) -> Any:
        """A :class:`tep.structured.Constraint` for ``spec`` over the model's vocabulary,
        probed a few tokens deep (a grammar the matcher cannot follow is a 400 naming
        ``spec.param`` here, before anything is queued). Blocking (milliseconds to seconds
        for a large grammar): the server calls it in its worker pool."""
        from tep.structured import make_constraint

        if not self.supports_constraints():
            raise BadRequestError("this model cannot constrain its output",
                                  param=spec.param, code="unsupported_parameter")
        return make_constraint(spec, self.model.structured_tokenizer(), check=True)

    def submit(self, model: str, token_ids: Sequence[int], sampling: Any, sink: StreamSink,
               on_done: OnDone, *, constraint: Any = None) -> None:
        """Queue one completion choice and return at once. The engine thread drives
        ``sink`` and calls ``on_done(None | exc)`` once; a bad request raises
        :class:`tep.errors.BadRequestError` here, before anything is queued.
        ``constraint``: a ready :class:`tep.structured.Constraint` (what the server passes:
        it builds them with :meth:`make_constraint` off the event loop), or a
        :class:`tep.structured.ConstraintSpec`, compiled here on the caller's thread."""
        self._check_request(token_ids, sampling)
        if sink.prompt_tokens is None:
            sink.prompt_tokens = len(token_ids)
        if constraint is not None and hasattr(constraint, "grammar"):
            constraint = self.make_constraint(constraint)
        self._ensure_started()
        self.engine.add_request(token_ids, sampling, sink, on_done, constraint=constraint)

    def prepare_chat(self, req: Any) -> PreparedChat:
        """Render and tokenize a chat request's prompt (tools written in when the template
        does not take them) and settle its answer length. Blocking (the template runs
        Jinja): the server calls it in its worker pool."""
        ids = self.tokenize("", self.apply_chat_template(req))
        raw = req.raw or {}
        max_tokens = req.sampling.max_tokens
        ctx = getattr(self.model, "context_size", None)
        if ctx is not None and raw.get("max_tokens") is None and \
                raw.get("max_completion_tokens") is None and len(ids) < int(ctx):
            # the server's default answer length, cut to what the context has left
            max_tokens = min(max_tokens, int(ctx) - len(ids))
        return PreparedChat(ids, max_tokens)

    def submit_chat(self, req: Any, sink: ChatStreamSink, on_done: OnDone) -> None:
        """:meth:`submit` for a chat request, prepared here (:meth:`prepare_chat`) on the
        caller's thread (the server prepares in its worker pool, then submits)."""
        prep = self.prepare_chat(req)
        req.sampling.max_tokens = prep.max_tokens
        sink.lower_max_tokens(prep.max_tokens)
        sink.prompt_tokens = len(prep.token_ids)
        st = getattr(req, "structured", None)
        self.submit(req.model, prep.token_ids, req.sampling, sink, on_done,
                    constraint=st.constraint if st is not None else None)

    def submit_embeddings(self, model: str, token_ids: list[list[int]],
                          on_done: Callable[[Any, BaseException | None], None]) -> None:
        """Queue an embeddings request; it joins the next ``embed`` batch.
        ``on_done(vectors | None, exc | None)`` runs on the batcher thread."""
        if self._embed is None:
            raise BadRequestError("this model has no embeddings")
        for x in token_ids:
            self._check_ids(x, "input")
        self._embed.submit(model, token_ids, on_done)

    # ---- the blocking Backend methods (a thread waits for the engine)
    def generate_stream_from_tokens(self, model: str, token_ids: list[int], sampling: Any,
                                    sink: StreamSink) -> None:
        self._wait(lambda done: self.submit(model, token_ids, sampling, sink, done), sink)

    def chat_completion_stream(self, req: Any, sink: ChatStreamSink) -> None:
        self._wait(lambda done: self.submit_chat(req, sink, done), sink)

    def generate_embeddings_batch(self, model: str, token_ids: list[list[int]]) -> Any:
        ev = threading.Event()
        box: list = [None, None]

        def done(vecs: Any, exc: BaseException | None) -> None:
            box[0], box[1] = vecs, exc
            ev.set()

        self.submit_embeddings(model, token_ids, done)
        ev.wait()
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _wait(self, start: Callable[[OnDone], None], sink: StreamSink) -> None:
        ev = threading.Event()
        box: list = [None]

        def done(exc: BaseException | None) -> None:
            box[0] = exc
            ev.set()

        start(done)
        while not ev.wait(0.05):
            if sink.cancelled:
                self.engine.wake()
        if box[0] is not None:
            raise box[0]
