"""Stored Responses (``POST /v1/responses`` with ``store: true``) in an SQLite file.

One :class:`ResponseStore` per process. Every statement runs on the store's own thread
(never on the event loop); the loop awaits the result. Writes that queue up while one
transaction runs are committed together in the next one (group commit), and every write
transaction also prunes the store to its bounds. The file is in WAL mode, so several
processes (``tep serve --workers N``) share it: each has its own connection and thread,
SQLite's file lock orders their transactions, and readers never wait for a writer.

Layout (``meta.schema`` = ``tep-responses-1``)::

    responses(seq INTEGER PRIMARY KEY, id TEXT UNIQUE, owner TEXT, previous_id TEXT,
              created_at REAL, body TEXT)       -- the response object without "output"
    items(response_seq, kind, position, id, body) -- kind 0 = input item, 1 = output item

A response and its items are written in one transaction, so a reader sees all of them or
none. A conversation (``previous_response_id``) is rebuilt from these rows by walking
``previous_id`` links; nothing about it is kept in process memory.

Bounds: at most ``max_rows`` responses (the oldest go first) and none older than
``max_age_s`` seconds; both are applied on every write. ``owner`` is the API key's
principal ID (``""`` without keys): a response is visible only to its owner.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

__all__ = ["ResponseStore", "StoreError", "StoredResponse", "ItemPage", "default_store_path",
           "MEMORY", "SCHEMA"]

log = logging.getLogger("tep.responses")

MEMORY = ":memory:"
"""The store path that keeps nothing."""

SCHEMA = "tep-responses-1"

# The longest conversation rebuilt from previous_response_id links (a guard, not a limit
# one reaches in practice: each link is a stored response, bounded by max_rows).
MAX_CHAIN = 100_000
# Most queued operations run in one round of the store thread (one transaction).
_BATCH = 256
# How long a statement waits for another process's write lock before failing.
_BUSY_MS = 10_000

_DDL = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS responses(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
    " owner TEXT NOT NULL, previous_id TEXT, created_at REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS responses_created ON responses(created_at)",
    "CREATE TABLE IF NOT EXISTS items(response_seq INTEGER NOT NULL, kind INTEGER NOT NULL,"
    " position INTEGER NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,"
    " PRIMARY KEY(response_seq, kind, position)) WITHOUT ROWID",
)
INPUT, OUTPUT = 0, 1


class StoreError(Exception):
    """The store file cannot be used (corrupt, not a tep store, read-only, ...)."""


def default_store_path(env: dict[str, str] | None = None) -> str:
    """``$XDG_DATA_HOME/tep/responses.sqlite3``, else ``~/.local/share/tep/...``."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "tep", "responses.sqlite3")


@dataclass
class StoredResponse:
    """What one stored response is made of.

    Attributes:
        id: ``resp_...``.
        owner: principal ID of the key that made it (``""`` without keys).
        previous_id: the ``previous_response_id`` it continued, or None.
        created_at: Unix time (s).
        body: the response object without ``output`` (JSON-able).
        input_items: the request's own input items (with ids), in order.
        output_items: the response's output items, in order.
    """

    id: str
    owner: str
    previous_id: str | None
    created_at: float
    body: dict
    input_items: list[dict]
    output_items: list[dict]


class ItemPage(NamedTuple):
    """One page of a response's input items."""

    data: list[dict]
    has_more: bool


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Op(NamedTuple):
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: Future


class ResponseStore:
    """The responses table of one process.

    Args:
        path: the SQLite file (created with its folder if missing), or ``":memory:"``
            for a store that keeps nothing (:attr:`enabled` is False).
        max_rows: most responses kept (oldest pruned first).
        max_age_s: responses older than this many seconds are pruned.
    """

    def __init__(self, path: str, *, max_rows: int = 100_000,
                 max_age_s: float = 30 * 86400.0) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.enabled = path != MEMORY
        self._queue: "queue.SimpleQueue[_Op | None]" = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # (seconds, responses) per write transaction, when record_timings (benchmarks)
        self.write_seconds: list[tuple[float, int]] = []
        self.record_timings = False

    # ------------------------------------------------------------------ opening
    def open(self) -> None:
        """Open (or create) the file and check that it is a usable tep store; raises
        :class:`StoreError` with one line saying what is wrong. Called at server start,
        so a bad file stops the server instead of failing requests."""
        if not self.enabled or self._conn is not None:
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"responses store {self.path}: cannot create its folder: "
                             f"{e.strerror or e}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"responses store {self.path}: {e}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"responses store {self.path}: cannot use WAL mode "
                                 f"(journal_mode stays {mode!r})")
            conn.execute("PRAGMA synchronous=NORMAL")   # WAL: durable at checkpoints
            conn.execute("BEGIN IMMEDIATE")              # proves we may write
            try:
                for stmt in _DDL:
                    conn.execute(stmt)
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    n = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
                    if n:
                        raise StoreError(f"responses store {self.path}: has responses but "
                                         "no schema version; not a tep store")
                    conn.execute("INSERT INTO meta VALUES('schema', ?)", (SCHEMA,))
                elif row[0] != SCHEMA:
                    raise StoreError(f"responses store {self.path}: schema {row[0]!r}, "
                                     f"this tep reads {SCHEMA!r}")
                # a real write: a read-only file fails here, at start, not per request
                conn.execute("INSERT OR REPLACE INTO meta VALUES('opened_at', ?)",
                             (repr(time.time()),))
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise StoreError(f"responses store {self.path}: damaged ({problem})")
        except StoreError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"responses store {self.path}: {e}") from None
        self._conn = conn

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self.open()
                t = threading.Thread(target=self._run, name="tep-responses-store", daemon=True)
                t.start()
                self._thread = t

    def close(self) -> None:
        """Finish queued operations and close the file (idempotent)."""
        with self._lock:
            t, self._thread = self._thread, None
        if t is not None:
            self._queue.put(None)
            t.join(30)
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:  # pragma: no cover - closing is best effort
                pass
            self._conn = None

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            op = self._queue.get()
            if op is None:
                return
            batch = [op]
            stop = False
            while len(batch) < _BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            writes = [o for o in batch if o.write]
            if writes:
                self._write(conn, writes)
            for o in batch:
                if not o.write:
                    self._settle(o, conn)
            if stop:
                return

    @staticmethod
    def _settle(o: _Op, conn: sqlite3.Connection) -> None:
        if not o.future.set_running_or_notify_cancel():
            return
        try:
            o.future.set_result(o.fn(conn))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
            o.future.set_exception(e)

    def _write(self, conn: sqlite3.Connection, writes: list[_Op]) -> None:
        t0 = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [o.fn(conn) for o in writes]
            self._prune(conn)
            conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if len(writes) > 1:   # find the write that failed: the others still commit
                for o in writes:
                    self._write(conn, [o])
                return
            if writes[0].future.set_running_or_notify_cancel():
                writes[0].future.set_exception(e)
            return
        if self.record_timings:
            self.write_seconds.append((time.perf_counter() - t0, len(writes)))
        for o, r in zip(writes, results):
            if o.future.set_running_or_notify_cancel():
                o.future.set_result(r)

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Drop responses past the bounds (with their items), in the open transaction."""
        cutoff = time.time() - self.max_age_s
        top = conn.execute("SELECT max(seq) FROM responses").fetchone()[0] or 0
        where = "seq <= ? OR created_at < ?"
        args = (top - self.max_rows, cutoff)
        conn.execute(f"DELETE FROM items WHERE response_seq IN "
                     f"(SELECT seq FROM responses WHERE {where})", args)
        conn.execute(f"DELETE FROM responses WHERE {where}", args)

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], write: bool) -> Any:
        self._ensure_thread()
        fut: Future = Future()
        self._queue.put(_Op(fn, write, fut))
        return await asyncio.wrap_future(fut)

    # ------------------------------------------------------------------ operations
    async def save(self, r: StoredResponse) -> None:
        """Write one response and its items (one transaction, shared with whatever else
        is queued). Raises what SQLite raised when the write failed."""
        if not self.enabled:
            return
        body, ins, outs = _dumps(r.body), [(i.get("id", ""), _dumps(i)) for i in r.input_items], \
            [(i.get("id", ""), _dumps(i)) for i in r.output_items]

        def write(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "INSERT INTO responses(id, owner, previous_id, created_at, body) "
                "VALUES(?, ?, ?, ?, ?)", (r.id, r.owner, r.previous_id, r.created_at, body))
            seq = cur.lastrowid
            conn.executemany("INSERT INTO items VALUES(?, ?, ?, ?, ?)",
                             [(seq, INPUT, k, iid, b) for k, (iid, b) in enumerate(ins)] +
                             [(seq, OUTPUT, k, iid, b) for k, (iid, b) in enumerate(outs)])

        await self._call(write, True)

    async def get(self, rid: str, owner: str) -> dict | None:
        """The stored response object (``output`` rebuilt from its items), or None when
        there is none with this id for this owner."""
        if not self.enabled:
            return None

        def read(conn: sqlite3.Connection) -> dict | None:
            row = conn.execute("SELECT seq, body FROM responses WHERE id=? AND owner=?",
                               (rid, owner)).fetchone()
            if row is None:
                return None
            body = json.loads(row[1])
            body["output"] = [json.loads(b) for (b,) in conn.execute(
                "SELECT body FROM items WHERE response_seq=? AND kind=? ORDER BY position",
                (row[0], OUTPUT))]
            return body

        return await self._call(read, False)

    async def delete(self, rid: str, owner: str) -> bool:
        """Delete a response and its items; False when there is none for this owner."""
        if not self.enabled:
            return False

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT seq FROM responses WHERE id=? AND owner=?",
                               (rid, owner)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM items WHERE response_seq=?", (row[0],))
            conn.execute("DELETE FROM responses WHERE seq=?", (row[0],))
            return True

        return await self._call(write, True)

    async def conversation(self, rid: str, owner: str, *, max_bytes: int = 1 << 62
                           ) -> list[dict] | None:
        """The items of the conversation that ends with response ``rid``: for each
        response from the first one on, its input items then its output items. None when
        ``rid`` (for this owner) does not exist; :class:`LookupError` naming the missing
        response when an earlier one of the chain was deleted or pruned;
        :class:`OverflowError` when its items hold more than ``max_bytes`` of JSON (what
        one request may bring into memory stays bounded)."""
        if not self.enabled:
            return None

        def read(conn: sqlite3.Connection) -> list[dict] | None:
            chain = conn.execute(
                "WITH RECURSIVE chain(seq, id, prev, depth) AS ("
                " SELECT seq, id, previous_id, 0 FROM responses WHERE id=? AND owner=?"
                " UNION ALL SELECT r.seq, r.id, r.previous_id, c.depth + 1"
                " FROM responses r JOIN chain c ON r.id = c.prev"
                " WHERE r.owner=? AND c.depth < ?)"
                " SELECT seq, id, prev FROM chain ORDER BY depth DESC",
                (rid, owner, owner, MAX_CHAIN)).fetchall()
            if not chain:
                return None
            if chain[0][2] is not None:
                raise LookupError(chain[0][2])
            out: list[dict] = []
            size = 0
            for seq, _, _ in chain:
                for (b,) in conn.execute("SELECT body FROM items WHERE response_seq=? "
                                         "ORDER BY kind, position", (seq,)):
                    size += len(b)
                    if size > max_bytes:
                        raise OverflowError(size)
                    out.append(json.loads(b))
            return out

        return await self._call(read, False)

    async def input_items(self, rid: str, owner: str, *, limit: int = 20,
                          order: str = "desc", after: str | None = None
                          ) -> ItemPage | None:
        """A page of response ``rid``'s own input items (``order`` ``asc``/``desc`` by
        position, starting after the item with id ``after``), or None when the response
        does not exist for this owner. An ``after`` that is not one of its items gives
        :class:`KeyError`."""
        if not self.enabled:
            return None
        desc = order == "desc"

        def read(conn: sqlite3.Connection) -> ItemPage | None:
            row = conn.execute("SELECT seq FROM responses WHERE id=? AND owner=?",
                               (rid, owner)).fetchone()
            if row is None:
                return None
            seq = row[0]
            start = None
            if after is not None:
                r = conn.execute("SELECT position FROM items WHERE response_seq=? AND kind=?"
                                 " AND id=?", (seq, INPUT, after)).fetchone()
                if r is None:
                    raise KeyError(after)
                start = r[0]
            cond = "" if start is None else (" AND position < ?" if desc else " AND position > ?")
            args: tuple = (seq, INPUT) if start is None else (seq, INPUT, start)
            rows = conn.execute(
                f"SELECT body FROM items WHERE response_seq=? AND kind=?{cond} "
                f"ORDER BY position {'DESC' if desc else 'ASC'} LIMIT ?",
                (*args, limit + 1)).fetchall()
            return ItemPage([json.loads(b) for (b,) in rows[:limit]], len(rows) > limit)

        return await self._call(read, False)

    async def count(self) -> int:
        """How many responses the file holds (all owners; tests and benchmarks)."""
        if not self.enabled:
            return 0
        return await self._call(
            lambda conn: conn.execute("SELECT count(*) FROM responses").fetchone()[0], False)
