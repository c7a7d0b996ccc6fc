"""tep.server.hardening: the loop-error handler logs a flood once per interval."""
from __future__ import annotations

import asyncio
import logging

from tep.server.hardening import QuietLoopErrors


def test_a_flood_of_loop_errors_is_logged_once_per_interval(caplog):
    loop = asyncio.new_event_loop()
    try:
        handler = QuietLoopErrors(interval_s=60.0)
        caplog.set_level(logging.ERROR)
        for _ in range(6000):  # e.g. accept() failing with EMFILE, once per client
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": OSError(24, "Too many open files")})
        records = [r for r in caplog.records if "accept" in r.getMessage()]
        assert len(records) == 1
        handler.interval_s = 0.0  # the interval is over: the repeats are summarised
        handler(loop, {"message": "socket.accept() out of system resource",
                       "exception": OSError(24, "Too many open files")})
        assert any("5999 more" in r.getMessage() for r in caplog.records)
    finally:
        loop.close()
