"""Server settings (from keyword arguments or ``TEP_*`` environment variables) and
loading a backend from a ``module:Class`` string."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ServerConfig", "load_backend", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "tep.backends.toy:ToyEngineBackend"
# the values of ServerConfig.event_loop (tep serve's loop; auto = uvloop when installed)
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _bool(v: str) -> bool:
    if v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {v!r}")


def _keys(v: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in v.split(",") if k.strip())


@dataclass
class ServerConfig:
    """Settings of one app.

    Attributes:
        max_concurrency: threads in the backend pool = requests whose backend work runs at
            once (a request with ``n`` choices uses up to ``n`` of the threads).
        max_queue: requests that may wait for a free slot when all ``max_concurrency`` are
            busy; past that a request gets 429 with ``Retry-After``. 0 = no waiting.
        max_body_bytes: largest accepted request body (413 above). Token-ID prompts are
            ~6 bytes per token in JSON, so the default fits millions of tokens.
        chat_max_tokens: ``max_tokens`` of a chat request that does not set one.
        max_tokens_limit: most tokens one request may ask for (400 above); 0 = the
            backend's context size for the model when it reports one
            (``Backend.context_size``), else ``DEFAULT_MAX_TOKENS_LIMIT``.
        api_keys: accepted keys (``TEP_API_KEYS`` is a comma list). When any key is set,
            every ``/v1`` request needs ``Authorization: Bearer <key>`` (401 otherwise).
        generation_timeout: seconds a completion/chat request may generate before it is
            ended with ``finish_reason: "length"`` (0 = no limit).
        retry_after: seconds sent in ``Retry-After`` with a 429.
        events_jsonl: path of the JSONL run-events file (None = no events, no file I/O).
            ``{worker}`` and ``{pid}`` in the path are replaced per process.
        metrics: serve ``GET /metrics`` and record Prometheus metrics.
        max_num_seqs, max_batch_tokens: engine backends (a :class:`tep.engine.Model`
            served by :class:`tep.engine.EngineBackend`): most sequences in one model
            step, and most tokens fed in one step (prompt chunks included).
        grammar_compile_timeout: seconds a request's structured-output grammar (schema,
            regex, Lark grammar, tools) may take to compile in the worker pool; longer is
            a 400 naming the field (0 = no limit).
        stream_buffer_events: most stream events (tokens) an engine stream may hold for a
            client that is not reading; when a stream's buffer is full its sequence is
            cancelled and the stream ends with an error event.
        stream_stall_timeout: seconds a stream may have unread events before its
            sequence is cancelled (the client stopped reading; 0 = never).
        speculative: engine backends: draft source of speculative decoding, "off",
            "ngram" (prompt/history lookup) or "draft" (``draft_model``, a smaller GGUF).
        draft_model: the draft model's GGUF path (``speculative="draft"``).
        num_speculative_tokens: most draft tokens per sequence per step (K, 1..64;
            adapted per sequence from its acceptance; a request may lower it).
        speculative_acceptance: "exact" (seeded outputs are the same as without
            speculation) or "rejection" (draft-model drafts accepted with min(1, p/q):
            the target's distribution, not its seeded tokens).
        overlap: engine backends: "on" starts a steady decode step's model forward
            while the previous step's tokens are delivered (same tokens; worth it where
            the forward leaves a core free, e.g. on a GPU), "off" runs them in turn.
        event_loop: the asyncio event loop ``tep serve`` runs hypercorn on: "uvloop"
            (libuv; its socket writes and cross-thread wake-ups are C, which leaves more
            of the cores to the model), "asyncio" (the standard library's), or "auto"
            (uvloop when it is installed). Apps run another way (``quart run``, Ray
            Serve) keep the loop their runner chose.
        fast_path: answer ``POST`` on the inference routes in an ASGI layer in front of
            Quart (:mod:`tep.server.fastpath`; same answers, less overhead). Quart's own
            ``before_request``/``after_request`` hooks and extensions do not see those
            requests; False routes them through Quart.
        ui: serve the chat page (``tep/server/static/chat.html``) at ``GET /``; off,
            ``/`` is a 404 like any unknown path (``--no-ui``, ``TEP_UI=0``).
        responses_store: the SQLite file of stored responses (``POST /v1/responses``
            with ``store``); None = ``$XDG_DATA_HOME/tep/responses.sqlite3`` (else
            ``~/.local/share/tep/...``); ``":memory:"`` keeps nothing.
        responses_max_rows, responses_max_age: the store's bounds: most responses kept
            (oldest dropped first) and the age in seconds past which one is dropped;
            applied on every write.
    """

    max_concurrency: int = field(default=8, metadata={
        "help": "backend threads per process = requests running at once"})
    max_queue: int = field(default=256, metadata={
        "help": "requests that may wait for a backend thread, per process; past that 429"})
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata={
        "help": "largest request body in bytes (413 above)"})
    chat_max_tokens: int = field(default=256, metadata={
        "help": "max_tokens of chat requests that set none"})
    max_tokens_limit: int = field(default=0, metadata={
        "help": "most tokens one request may ask for (0 = the model's context size, "
                "else 1048576)"})
    api_keys: tuple[str, ...] = field(default=(), metadata={"cli": False})
    generation_timeout: float = field(default=0.0, metadata={
        "help": "seconds a completion may generate before it ends with finish_reason "
                "'length' (0 = no limit)"})
    retry_after: int = field(default=1, metadata={"help": "seconds in Retry-After of a 429"})
    events_jsonl: str | None = field(default=None, metadata={
        "help": "write run events (JSONL) to this file"})
    max_num_seqs: int = field(default=256, metadata={
        "help": "engine backends: most sequences per model step"})
    max_batch_tokens: int = field(default=2048, metadata={
        "help": "engine backends: most tokens fed per model step, prompt chunks included"})
    grammar_compile_timeout: float = field(default=5.0, metadata={
        "help": "seconds a structured-output grammar may take to compile (400 above; "
                "0 = no limit)"})
    stream_buffer_events: int = field(default=4096, metadata={
        "help": "most unread events one stream may buffer before its sequence is "
                "cancelled"})
    stream_stall_timeout: float = field(default=30.0, metadata={
        "help": "seconds a stream's client may read nothing while events wait before its "
                "sequence is cancelled (0 = never)"})
    responses_store: str | None = field(default=None, metadata={
        "help": "SQLite file of stored /v1/responses (':memory:' keeps nothing; "
                "default $XDG_DATA_HOME/tep/responses.sqlite3, else "
                "~/.local/share/tep/responses.sqlite3)"})
    responses_max_rows: int = field(default=100_000, metadata={
        "help": "most stored responses kept; the oldest are pruned on write"})
    responses_max_age: float = field(default=30 * 86400.0, metadata={
        "help": "seconds a stored response is kept; older ones are pruned on write"})
    speculative: str = field(default="off", metadata={
        "help": "engine backends: speculative decoding draft source: off, ngram or draft"})
    draft_model: str | None = field(default=None, metadata={
        "help": "speculative draft: the draft model's GGUF path"})
    num_speculative_tokens: int = field(default=4, metadata={
        "help": "speculative decoding: most draft tokens per sequence per step (1..64)"})
    speculative_acceptance: str = field(default="exact", metadata={
        "help": "speculative decoding: exact (seeded outputs unchanged) or rejection "
                "(draft-model drafts; the target's distribution)"})
    overlap: str = field(default="off", metadata={
        "help": "engine backends: on = run the next decode step's forward while this "
                "step's tokens are delivered; off = one after the other"})
    event_loop: str = field(default="auto", metadata={
        "help": "tep serve's event loop: uvloop, asyncio, or auto (uvloop when installed)"})
    metrics: bool = field(default=True, metadata={"cli": False})
    fast_path: bool = field(default=True, metadata={"cli": False})
    # "negate": the CLI option is --no-<name>, which sets it False
    ui: bool = field(default=True, metadata={
        "cli": "negate", "help": "do not serve the chat page at / (it is then a 404)"})

    DEFAULT_MAX_TOKENS_LIMIT = 1 << 20

    # how each field is read from its TEP_<NAME> variable
    _PARSE = {"api_keys": _keys, "events_jsonl": str, "speculative": str,
              "draft_model": str, "speculative_acceptance": str, "overlap": str,
              "event_loop": str,
              "generation_timeout": float, "metrics": _bool,
              "grammar_compile_timeout": float, "stream_stall_timeout": float,
              "fast_path": _bool, "ui": _bool, "responses_store": str,
              "responses_max_age": float}

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        """Defaults, then ``TEP_<FIELD>`` variables, then ``overrides`` (None = unset)."""
        cfg = cls()
        cfg.explicit = set()   # the settings given (by environment or argument), not defaults
        for f in fields(cls):
            env = os.environ.get("TEP_" + f.name.upper())
            if env not in (None, ""):
                cfg.explicit.add(f.name)
                try:
                    setattr(cfg, f.name, cls._PARSE.get(f.name, int)(env))
                except ValueError as e:
                    raise ValueError(f"TEP_{f.name.upper()}: {e}") from None
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown tep setting(s): {', '.join(sorted(unknown))}")
        for k, v in overrides.items():
            if v is not None:
                cfg.explicit.add(k)
                setattr(cfg, k, tuple(v) if k == "api_keys" else v)
        if cfg.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if cfg.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if cfg.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if cfg.chat_max_tokens < 1:
            raise ValueError("chat_max_tokens must be >= 1")
        if cfg.max_tokens_limit < 0:
            raise ValueError("max_tokens_limit must be >= 0 (0 = from the backend)")
        if cfg.generation_timeout < 0:
            raise ValueError("generation_timeout must be >= 0 (0 = no limit)")
        if cfg.max_num_seqs < 1 or cfg.max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be >= 1")
        if cfg.grammar_compile_timeout < 0 or cfg.stream_stall_timeout < 0:
            raise ValueError("grammar_compile_timeout and stream_stall_timeout must be >= 0 "
                             "(0 = no limit)")
        if cfg.stream_buffer_events < 16:
            raise ValueError("stream_buffer_events must be >= 16")
        if cfg.responses_max_rows < 1 or not cfg.responses_max_age > 0:
            raise ValueError("responses_max_rows must be >= 1 and responses_max_age > 0")
        if cfg.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if cfg.speculative not in ("off", "ngram", "draft"):
            raise ValueError(f"speculative must be off, ngram or draft, got {cfg.speculative!r}")
        if cfg.overlap not in ("on", "off"):
            raise ValueError(f"overlap must be on or off, got {cfg.overlap!r}")
        if cfg.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be {', '.join(EVENT_LOOPS[:-1])} or "
                             f"{EVENT_LOOPS[-1]}, got {cfg.event_loop!r}")
        if cfg.speculative_acceptance not in ("exact", "rejection"):
            raise ValueError(f"speculative_acceptance must be exact or rejection, got "
                             f"{cfg.speculative_acceptance!r}")
        if not 1 <= cfg.num_speculative_tokens <= 64:
            raise ValueError("num_speculative_tokens must be in [1, 64]")
        if cfg.speculative == "draft" and not cfg.draft_model:
            raise ValueError("speculative 'draft' needs --draft-model PATH (a GGUF)")
        if cfg.speculative_acceptance == "rejection" and cfg.speculative != "draft":
            raise ValueError("speculative_acceptance 'rejection' needs speculative 'draft' "
                             "(n-gram drafts have no distribution)")
        return cfg

    def responses_store_path(self) -> str:
        """The responses store file (see ``responses_store``)."""
        from tep.serving.response_store import default_store_path

        return self.responses_store or default_store_path()

    def speculative_config(self, load_draft: Any = None) -> Any:
        """The engine's :class:`tep.engine.speculative.SpecConfig` for these settings
        (None when off); ``load_draft(path)`` builds the draft model."""
        if self.speculative == "off":
            return None
        from tep.engine.speculative import SpecConfig

        draft = None
        if self.speculative == "draft":
            if load_draft is None:
                raise ValueError("speculative 'draft' is served by the llamacpp backend "
                                 "(it loads --draft-model)")
            draft = load_draft(self.draft_model)
        return SpecConfig(mode=self.speculative, k=self.num_speculative_tokens,
                          acceptance=self.speculative_acceptance, draft_model=draft)

    def all_api_keys(self) -> tuple[str, ...]:
        """Every accepted key, empty = no auth."""
        return tuple(dict.fromkeys(k for k in self.api_keys if k))

    def public(self) -> dict[str, Any]:
        """The settings as a JSON-able dict with the keys left out (for run_start)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "api_keys"}
        out["api_keys"] = len(self.all_api_keys())
        return out


# Short names for the backends tep ships (``tep serve --backend toy``).
BACKEND_ALIASES = {"toy": DEFAULT_BACKEND, "bert": "tep.backends.bert:MiniLMBackend",
                   "llamacpp": "tep.backends.llamacpp:LlamaCppBackend"}


def resolve_backend_spec(spec: str | None = None) -> Any:
    """The object a backend spec names, imported but not called: ``"module:Attr"``, a
    short name from ``BACKEND_ALIASES``, or None for ``$TEP_BACKEND`` / the toy backend."""
    spec = spec or os.environ.get("TEP_BACKEND") or DEFAULT_BACKEND
    spec = BACKEND_ALIASES.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"backend must be 'module:Attr' or one of "
                         f"{', '.join(BACKEND_ALIASES)}, got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def load_backend(spec: str | None = None) -> Any:
    """Build a backend from a spec (see :func:`resolve_backend_spec`); the attribute is
    called with no arguments when it is a class or factory."""
    from tep.backend import Backend

    obj = resolve_backend_spec(spec)
    backend = obj() if callable(obj) and not isinstance(obj, Backend) and \
        not _is_engine_model(obj) else obj
    if not isinstance(backend, Backend) and _is_engine_model(backend):
        backend = _engine_backend(backend)
    if not isinstance(backend, Backend):
        raise TypeError(f"{spec or os.environ.get('TEP_BACKEND')} did not give a tep.Backend "
                        f"(got {type(backend).__name__})")
    return backend


def _is_engine_model(obj: Any) -> bool:
    """A tep.engine.Model instance (not a class): it has a batched forward."""
    return not isinstance(obj, type) and all(
        hasattr(obj, n) for n in ("forward", "release", "vocab_size", "list_models"))


def _engine_backend(model: Any) -> Any:
    from tep.engine import EngineBackend

    cfg = ServerConfig.from_env()
    return EngineBackend(model, max_num_seqs=cfg.max_num_seqs,
                         max_batch_tokens=max(cfg.max_batch_tokens, cfg.max_num_seqs),
                         speculative=cfg.speculative_config(), overlap=cfg.overlap == "on")
