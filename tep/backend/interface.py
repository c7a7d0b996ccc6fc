"""The Backend interface a model author subclasses.

A backend is synchronous Python: the server calls it from a worker thread (never on the
event loop), so it may block, run numpy, or call GIL-releasing kernels. Streaming methods
push tokens into a sink (:mod:`tep.backend.sinks`); the sink's return value (and its
``cancelled`` flag) tells the backend when to stop: the client went away, ``max_tokens``
was reached, or a stop string / stop token ended the text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from tep.backend.results import Completion, TokenLogprob
from tep.backend.sinks import ChatStreamSink, StreamSink, current_cancel

if TYPE_CHECKING:  # pragma: no cover
    from tep.backend.sampling import Sampling
    from tep.wire.chat import ChatRequest

__all__ = ["Backend"]


def _overrides(obj: object, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Backend, name)


class Backend:
    """Subclass this to serve a model. Every method has a safe default, so a bare
    ``Backend()`` serves: no models, 501 for chat and embeddings.

    Write either ``generate_stream_from_tokens`` or ``generate_from_tokens`` (the other is
    derived), and likewise ``chat_completion_stream`` or ``chat_completion``. Methods are
    called from worker threads, possibly concurrently for different requests.
    """

    def list_models(self) -> list[str]:
        """Model IDs this backend serves (``GET /v1/models``). Default: none."""
        return []

    def context_size(self, model: str) -> int | None:
        """The most tokens (prompt + completion) one sequence of ``model`` may hold, or
        None if unbounded/unknown. Bounds ``max_tokens`` unless the server sets
        ``max_tokens_limit``. Default: None."""
        return None

    def device_kind(self) -> str:
        """What the model runs on ("cpu", "cuda", ...), for logs and events."""
        return "cpu"

    def fingerprint(self, model: str) -> str | None:
        """``system_fingerprint`` of ``model``'s answers: a short string that changes
        whenever the same request could give other tokens (weights, code, settings that
        change the arithmetic); see :func:`tep.backend.fingerprint.fingerprint_of`.
        Called per request: compute it once. Default: None (the field is null)."""
        return None

    # ---- completions
    def generate_from_tokens(self, model: str, token_ids: list[int],
                             sampling: "Sampling") -> Completion:
        """Generate one choice for a token-ID prompt. Default: run
        :meth:`generate_stream_from_tokens` into a collecting sink."""
        if not _overrides(self, "generate_stream_from_tokens"):
            return Completion(finish_reason="stop")
        sink = StreamSink(sampling, cancel=current_cancel.get(),
                          token_text=self._token_text_fn(model), prompt_tokens=len(token_ids))
        self.generate_stream_from_tokens(model, token_ids, sampling, sink)
        return sink.result()

    def generate_stream_from_tokens(self, model: str, token_ids: list[int],
                                    sampling: "Sampling", sink: StreamSink) -> None:
        """Stream one choice: call ``sink.emit_token(piece, token_id=...)`` per token and
        return when it says False or generation ends. Default: send the result of
        :meth:`generate_from_tokens` as one piece (or nothing if neither is written)."""
        if _overrides(self, "generate_from_tokens"):
            sink.emit_completion(self.generate_from_tokens(model, token_ids, sampling))

    # ---- chat
    def supports_chat(self) -> bool:
        """Whether ``/v1/chat/completions`` is served (501 otherwise)."""
        return False

    def chat_completion(self, req: "ChatRequest") -> Completion:
        """Answer a chat request (``req.messages``, ``req.sampling``); the chat template is
        the backend's. Default: run :meth:`chat_completion_stream` into a collecting sink."""
        if not _overrides(self, "chat_completion_stream"):
            return Completion(finish_reason="stop", prompt_tokens=0)
        sink = ChatStreamSink(req.sampling, cancel=current_cancel.get(),
                              token_text=self._token_text_fn(req.model))
        self.chat_completion_stream(req, sink)
        return sink.result()

    def chat_completion_stream(self, req: "ChatRequest", sink: ChatStreamSink) -> None:
        """Stream a chat answer into ``sink``. Default: send :meth:`chat_completion`'s
        result as one piece (or nothing if neither is written)."""
        if _overrides(self, "chat_completion"):
            sink.emit_completion(self.chat_completion(req))

    # ---- embeddings
    def supports_embeddings(self) -> bool:
        """Whether ``/v1/embeddings`` is served (501 otherwise)."""
        return False

    def generate_embeddings(self, model: str, token_ids: list[int]) -> Any:
        """One pooled vector (float32 [D]) for one token-ID input. Default: empty."""
        import numpy as np

        return np.zeros(0, dtype=np.float32)

    def generate_embeddings_batch(self, model: str, token_ids: list[list[int]]) -> Any:
        """One pooled vector per input: a sequence of B float32 [D] vectors (or an array
        [B, D]). The server calls this once per request, so a backend can run the inputs
        as one ragged batch. Default: :meth:`generate_embeddings` per input."""
        return [self.generate_embeddings(model, x) for x in token_ids]

    def embedding_dimensions(self, model: str) -> int | None:
        """The length D of this model's embeddings, or None if unknown (then a
        ``dimensions`` request is checked against each returned vector)."""
        return None

    # ---- text hooks (optional)
    def tokenize(self, model: str, text: str) -> list[int]:
        """Text -> token IDs. Without it, text prompts are a 400 ("this server takes
        token IDs"). May take a keyword ``add_special: bool`` (add BOS and the like), which
        ``/tokenize`` then passes when a client sets it."""
        raise NotImplementedError

    def detokenize(self, model: str, token_ids: list[int]) -> str:
        """Token IDs -> text (for ``echo``, logprob alternatives given as IDs and
        ``/detokenize``). May take a keyword ``special: bool`` (spell out special tokens),
        which ``/detokenize`` passes as True."""
        raise NotImplementedError

    def token_bytes(self, model: str, token_ids: list[int]) -> list[bytes]:
        """Each token's own bytes (``/tokenize`` with ``with_pieces``; a byte-level token
        may hold part of a UTF-8 character). Default: :meth:`detokenize` of each token
        alone, UTF-8 encoded."""
        return [self.detokenize(model, [t]).encode("utf-8") for t in token_ids]

    def apply_chat_template(self, req: "ChatRequest") -> str:
        """The prompt text a chat request renders to, exactly as chat generation would
        tokenize it: ``req.messages`` through the backend's chat template with the
        generation prompt, and the tools of ``req.structured`` as the chat path shows them
        to the model. Answers ``/apply-template`` and is what ``/v1/messages/count_tokens``
        and ``/tokenize`` (with ``messages``) count. Default: 501."""
        from tep.errors import NotSupportedError

        raise NotSupportedError("This backend does not expose its chat template",
                                code="chat_template_not_supported")

    def supports_chat_template(self) -> bool:
        """True when :meth:`apply_chat_template` is implemented."""
        return _overrides(self, "apply_chat_template")

    def prompt_logprobs(self, model: str, token_ids: list[int],
                        top_n: int) -> list[TokenLogprob]:
        """Logprobs of a prompt's own tokens, for ``echo`` with ``logprobs``: one entry per
        token, the first with ``logprob=None`` (nothing precedes it), each later one the
        model's log-probability of that token given the ones before, with its ``top_n``
        most likely alternatives. Without it, such a request is a 400."""
        raise NotImplementedError

    def supports_prompt_logprobs(self) -> bool:
        """True when :meth:`prompt_logprobs` is implemented."""
        return _overrides(self, "prompt_logprobs")

    def supports_constraints(self) -> bool:
        """Whether this backend honours structured-output constraints
        (``response_format``, ``guided_*``, forced tool calls). When False, a request with
        one is a 400 naming the field, never silently ignored. Default: False."""
        return False

    def supports_tokenize(self) -> bool:
        """True when :meth:`tokenize` is implemented."""
        return _overrides(self, "tokenize")

    def supports_detokenize(self) -> bool:
        """True when :meth:`detokenize` is implemented."""
        return _overrides(self, "detokenize")

    def _token_text_fn(self, model: str) -> Callable[[int], str] | None:
        if not self.supports_detokenize():
            return None
        return lambda tid: self.detokenize(model, [tid])
