"""The ``tep`` command (also ``python -m tep``).

    tep serve [--backend module:Class] [--host 127.0.0.1] [--port 8000] [--workers 1]
              [--max-concurrency 8] [--max-body-bytes N] [--chat-max-tokens N]
              [--api-key KEY] [--graceful-timeout 60] [--log-level info]
              [--toy-vocab-size V] [--toy-instant]

Serves on hypercorn. Settings travel to worker processes as ``TEP_*`` environment
variables, so ``--workers N`` (hypercorn's multiprocess runner, one backend per process)
sees the same configuration as a single process.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tep", description="Serve a Python model through the "
                                "OpenAI HTTP API.")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="serve a backend on hypercorn")
    s.add_argument("--backend", help="module:Class of a tep.Backend (default: $TEP_BACKEND, "
                   "else the toy backend)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="server processes (each loads "
                   "its own backend)")
    s.add_argument("--max-concurrency", type=int, help="backend threads per process "
                   "(default 8)")
    s.add_argument("--max-body-bytes", type=int, help="largest request body (default 32 MiB)")
    s.add_argument("--chat-max-tokens", type=int, help="max_tokens of chat requests that set "
                   "none (default 256)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--graceful-timeout", type=float, default=60.0,
                   help="seconds open streams get to finish at shutdown")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--toy-vocab-size", type=int, help="toy backend vocabulary size")
    s.add_argument("--toy-instant", action="store_true",
                   help="toy backend without model compute (measures the HTTP layer)")
    return p


_ENV = {"backend": "TEP_BACKEND", "max_concurrency": "TEP_MAX_CONCURRENCY",
        "max_body_bytes": "TEP_MAX_BODY_BYTES", "chat_max_tokens": "TEP_CHAT_MAX_TOKENS",
        "api_key": "TEP_API_KEY", "toy_vocab_size": "TEP_TOY_VOCAB_SIZE"}


def _worker_app():  # noqa: ANN202 - hypercorn loads this in each worker process
    from tep.app import create_app

    return create_app()


def serve(args: argparse.Namespace) -> int:
    """Run hypercorn with the app built from ``args``."""
    import asyncio

    from hypercorn.config import Config

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, env in _ENV.items():
        val = getattr(args, key)
        if val is not None:
            os.environ[env] = str(val)
    if args.toy_instant:
        os.environ["TEP_TOY_INSTANT"] = "1"

    cfg = Config()
    host = f"[{args.host}]" if ":" in args.host else args.host
    cfg.bind = [f"{host}:{args.port}"]
    cfg.workers = args.workers
    cfg.graceful_timeout = args.graceful_timeout
    cfg.loglevel = args.log_level.upper()
    cfg.accesslog = "-" if args.access_log else None
    cfg.application_path = "tep.cli:_worker_app()"

    if args.workers > 1:
        from hypercorn.run import run

        return run(cfg)

    from hypercorn.asyncio import serve as hypercorn_serve

    app = _worker_app()  # fail fast (bad --backend) before binding the port
    asyncio.run(hypercorn_serve(app, cfg))
    return 0


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
