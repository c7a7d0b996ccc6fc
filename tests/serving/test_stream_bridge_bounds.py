"""The stream bridge's bounds for a client that stops reading, driven directly: an engine
thread (which never waits for one client) hands events with ``wait=False`` while the stream
reader stops taking them.

- Once ``buffer_events`` are unread the request's cancel flag is set at once (the engine
  drops the sequence at its next step); what was buffered still reaches the reader, then a
  ``StreamStalled`` error event (code ``stream_stalled``) ends the stream.
- With a large buffer, unread events older than ``stall_timeout`` do the same.
- A reader that keeps up is never cut, however many events pass.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tep.serving.bridge import DeltaEvent, ErrorEvent, FinishEvent, StreamBridge, StreamStalled


async def _scenario(buffer_events: int, stall: float, n_events: int, read_first: int,
                    pause: float, produce_every: float = 0.0):
    cancel = threading.Event()
    bridge = StreamBridge(ThreadPoolExecutor(1), cancel, "t")
    bridge.watch(buffer_events, stall)
    produced = [0]

    def engine():   # stops as the engine does: at the cancel flag
        for i in range(n_events):
            if cancel.is_set():
                break
            bridge._put(DeltaEvent(0, "x", []), wait=False)
            produced[0] += 1
            if produce_every:
                time.sleep(produce_every)
        bridge._put(FinishEvent(0, "length", produced[0], 1), wait=False)

    bridge._running = 1
    threading.Thread(target=engine, daemon=True).start()
    got: list = []
    cancelled_at = None
    it = bridge.events().__aiter__()
    t0 = time.monotonic()
    async for ev in it:
        got.append(ev)
        if len(got) == read_first:
            await asyncio.sleep(pause)      # the client stops reading
        if cancel.is_set() and cancelled_at is None:
            cancelled_at = time.monotonic() - t0
    return got, produced[0], cancel.is_set(), bridge.stalled


def test_full_buffer_cancels_at_once_and_ends_with_stream_stalled():
    got, produced, cancelled, why = asyncio.run(
        _scenario(buffer_events=64, stall=0, n_events=1_000_000, read_first=5, pause=0.5))
    assert cancelled and "buffer is full" in why
    assert produced < 64 + 5 + 200            # bounded: not a million
    deltas = [e for e in got if type(e) is DeltaEvent]
    assert len(deltas) == produced            # what was buffered was delivered
    assert type(got[-1]) is ErrorEvent and type(got[-1].exc) is StreamStalled
    assert got[-1].exc.code == "stream_stalled" and got[-1].exc.status == 408


def test_unread_events_past_the_stall_timeout_cancel():
    t0 = time.monotonic()
    got, produced, cancelled, why = asyncio.run(
        _scenario(buffer_events=1_000_000, stall=0.3, n_events=100_000, read_first=3,
                  pause=1.5, produce_every=0.002))
    assert cancelled and "read nothing for 0.3 s" in why
    assert produced < 100_000
    assert type(got[-1]) is ErrorEvent and type(got[-1].exc) is StreamStalled
    assert time.monotonic() - t0 < 10


def test_a_reader_that_keeps_up_is_never_cut():
    # an engine-like producer (it lets go of the GIL between steps) at up to ~5000
    # events/s, more than the default buffer holds, read by a client that keeps up (the
    # default bound leaves room for a loop stalled by a loaded machine)
    got, produced, cancelled, why = asyncio.run(
        _scenario(buffer_events=4096, stall=2.0, n_events=10_000, read_first=-1, pause=0,
                  produce_every=0.0002))
    assert why is None and not cancelled, why
    assert produced == 10_000 and type(got[-1]) is FinishEvent


def test_a_reader_is_not_cut_by_a_producer_that_keeps_the_gil():
    # an instant engine: it never lets go of the GIL by itself, so the loop only runs
    # when the interpreter's switch interval (5 ms) forces it - long enough for it to run
    # thousands of events ahead of a reader that keeps up. Half a buffer behind, the
    # bridge hands the GIL to the loop, so the reader is never cut.
    got, produced, cancelled, why = asyncio.run(
        _scenario(buffer_events=256, stall=0, n_events=20_000, read_first=-1, pause=0))
    assert why is None and not cancelled, why
    assert produced == 20_000 and type(got[-1]) is FinishEvent


def test_a_loop_that_never_drains_costs_the_engine_one_wait():
    # the loop stops running callbacks (here: never started); an engine thread that
    # finds its streams half a buffer behind waits for it once (50 ms), not per event
    # and not per stream
    loop = asyncio.new_event_loop()
    try:
        async def make():
            return StreamBridge(ThreadPoolExecutor(1), threading.Event(), "t")
        bridges = [loop.run_until_complete(make()) for _ in range(4)]
        for b in bridges:
            b.watch(64, 0)
        t0 = time.monotonic()
        for _ in range(63):
            for b in bridges:
                b._put(DeltaEvent(0, "x", []), wait=False)
        took = time.monotonic() - t0
        assert 0.04 < took < 0.5, took
        assert not any(b.cancel.is_set() for b in bridges)
        bridges[0]._put(DeltaEvent(0, "x", []), wait=False)   # the 64th: buffer full
        assert bridges[0].cancel.is_set() and "buffer is full" in bridges[0].stalled
    finally:
        loop.close()
