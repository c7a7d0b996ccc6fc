"""The ``tep`` command (also ``python -m tep``).

    tep serve [--backend module:Attr] [--host 127.0.0.1] [--port 8000] [--workers 1]
              [--max-concurrency 8] [--max-queue 256] [--max-body-bytes N]
              [--chat-max-tokens N] [--generation-timeout SECONDS]
              [--api-key KEY ...] [--events-jsonl PATH] [--no-metrics]
              [--graceful-timeout 60] [--log-level info]
              [--max-num-seqs 256] [--max-batch-tokens 2048]
              [--toy-vocab-size V] [--toy-instant]

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

log = logging.getLogger("tep.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tep", description="Serve a Python model through the "
                                "OpenAI HTTP API.")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="serve a backend on hypercorn")
    s.add_argument("--backend", help="module:Attr of a tep.Backend or a tep.engine.Model "
                   "(default: $TEP_BACKEND, else the toy model on the engine)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="server processes (each loads "
                   "its own backend)")
    s.add_argument("--max-concurrency", type=int, help="backend threads per process = "
                   "requests running at once (default 8)")
    s.add_argument("--max-queue", type=int, help="requests that may wait for a backend "
                   "thread, per process; past that: 429 with Retry-After (default 256)")
    s.add_argument("--retry-after", type=int, help="seconds in the Retry-After header of "
                   "a 429 (default 1)")
    s.add_argument("--max-body-bytes", type=int, help="largest request body (default 32 MiB)")
    s.add_argument("--chat-max-tokens", type=int, help="max_tokens of chat requests that set "
                   "none (default 256)")
    s.add_argument("--generation-timeout", type=float, help="seconds a completion may "
                   "generate before it ends with finish_reason 'length' (default: no limit)")
    s.add_argument("--api-key", action="append", help="require 'Authorization: Bearer KEY' "
                   "on /v1 routes; repeat for several keys (or set TEP_API_KEYS=k1,k2, "
                   "which keeps keys out of the process list)")
    s.add_argument("--events-jsonl", help="write run events (JSONL) to this file")
    s.add_argument("--no-metrics", action="store_true", help="no Prometheus metrics, "
                   "/metrics answers 501")
    s.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds open streams get to finish at shutdown")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--max-num-seqs", type=int, help="engine backends: most sequences per "
                   "model step (default 256; $TEP_MAX_NUM_SEQS)")
    s.add_argument("--max-batch-tokens", type=int, help="engine backends: most tokens fed "
                   "per model step, prompt chunks included (default 2048; "
                   "$TEP_MAX_BATCH_TOKENS)")
    s.add_argument("--toy-vocab-size", type=int, help="toy backend vocabulary size")
    s.add_argument("--toy-instant", action="store_true",
                   help="toy backend without model compute (measures the HTTP layer)")
    return p


_ENV = {"backend": "TEP_BACKEND", "max_concurrency": "TEP_MAX_CONCURRENCY",
        "max_queue": "TEP_MAX_QUEUE", "retry_after": "TEP_RETRY_AFTER",
        "max_body_bytes": "TEP_MAX_BODY_BYTES", "chat_max_tokens": "TEP_CHAT_MAX_TOKENS",
        "generation_timeout": "TEP_GENERATION_TIMEOUT", "events_jsonl": "TEP_EVENTS_JSONL",
        "toy_vocab_size": "TEP_TOY_VOCAB_SIZE", "max_num_seqs": "TEP_MAX_NUM_SEQS",
        "max_batch_tokens": "TEP_MAX_BATCH_TOKENS"}


def _worker_app():  # noqa: ANN202 - also loadable by hypercorn as "tep.cli:_worker_app()"
    from tep.app import create_app

    return create_app()


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
    cfg.application_path = "tep.cli:_worker_app()"
    return cfg


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")


def serve(args: argparse.Namespace) -> int:
    """Run hypercorn with the app built from ``args``."""
    import asyncio

    _setup_logging(args.log_level)
    for key, env in _ENV.items():
        val = getattr(args, key)
        if val is not None:
            os.environ[env] = str(val)
    if args.api_key:
        if any("," in k for k in args.api_key):
            print("tep serve: an API key may not contain ','", file=sys.stderr)
            return 2
        os.environ["TEP_API_KEYS"] = ",".join(args.api_key)
    if args.no_metrics:
        os.environ["TEP_METRICS"] = "0"
    if args.toy_instant:
        os.environ["TEP_TOY_INSTANT"] = "1"

    cfg = _hypercorn_config(args)
    if args.workers > 1:
        return _supervise(args, cfg)

    from hypercorn.asyncio import serve as hypercorn_serve

    app = _worker_app()  # fail fast (bad --backend) before binding the port
    # hypercorn handles SIGTERM/SIGINT here: stop accepting, wait up to graceful_timeout
    # for open connections, then run the app's shutdown (which writes run_end).
    asyncio.run(hypercorn_serve(app, cfg))
    return 0


# --------------------------------------------------------------------------- workers

def _check_backend_importable() -> None:
    """Import the backend's module and attribute without instantiating it (the
    supervisor must not load a model it never uses)."""
    import importlib

    from tep.config import DEFAULT_BACKEND

    spec = os.environ.get("TEP_BACKEND") or DEFAULT_BACKEND
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"backend must be 'module:Class', got {spec!r}")
    if not hasattr(importlib.import_module(module_name), attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")


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


def _supervise(args: argparse.Namespace, cfg: Any) -> int:
    import multiprocessing
    import shutil
    import signal
    import time
    from multiprocessing.connection import wait

    try:
        _check_backend_importable()
    except Exception as e:
        print(f"tep serve: cannot load the backend: {e}", file=sys.stderr)
        return 1
    if os.environ.get("TEP_EVENTS_JSONL"):
        os.environ["TEP_EVENTS_JSONL"] = _per_worker_events_path(os.environ["TEP_EVENTS_JSONL"])
    own_dir = _prepare_metrics_dir()
    sockets = cfg.create_sockets()
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
    for sock in sockets.insecure_sockets + sockets.secure_sockets:
        sock.close()
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

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the supervisor
    os.environ["TEP_WORKER_ID"] = str(index)      # decides; {worker} in the events path
    _setup_logging(log_level)
    app = _worker_app()
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

    asyncio.run(worker_serve(wrap_app(app, cfg.wsgi_max_body_size, "asgi"), cfg,
                             sockets=sockets, shutdown_trigger=stop_requested))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tep`` script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        if args.workers < 1:
            print("tep serve: --workers must be >= 1", file=sys.stderr)
            return 2
        return serve(args)
    _parser().print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
