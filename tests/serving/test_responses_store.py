"""The SQLite store behind ``POST /v1/responses`` (tep.serving.response_store), checked
against the file itself with plain ``sqlite3``: rows written whole, owners isolated,
conversations rebuilt from rows, pruning by rows and by age, concurrent writers (tasks of
one process and separate processes sharing the file), and files it must refuse."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from support.process import child_env, obey_file_modes

from tep.serving.response_store import (MEMORY, ResponseStore, StoredResponse, StoreError,
                                        default_store_path)


def _resp(rid: str, prev: str | None = None, owner: str = "", n_in: int = 2, n_out: int = 1,
          created: float | None = None) -> StoredResponse:
    return StoredResponse(
        id=rid, owner=owner, previous_id=prev,
        created_at=time.time() if created is None else created,
        body={"id": rid, "object": "response", "status": "completed"},
        input_items=[{"id": f"{rid}-in{k}", "type": "message", "k": k} for k in range(n_in)],
        output_items=[{"id": f"{rid}-out{k}", "type": "message", "k": k}
                      for k in range(n_out)])


def _run(coro):
    return asyncio.run(coro)


def test_default_path_follows_xdg():
    assert default_store_path({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == \
        "/x/tep/responses.sqlite3"
    assert default_store_path({"HOME": "/h"}) == "/h/.local/share/tep/responses.sqlite3"


def test_round_trip_owner_and_conversation(tmp_path):
    path = str(tmp_path / "sub" / "r.sqlite3")   # the folder is created
    store = ResponseStore(path)
    store.open()

    async def go():
        await store.save(_resp("resp_a"))
        await store.save(_resp("resp_b", prev="resp_a", n_in=1, n_out=2))
        await store.save(_resp("resp_x", owner="key-other"))
        got = await store.get("resp_b", "")
        assert got["id"] == "resp_b" and [o["id"] for o in got["output"]] == \
            ["resp_b-out0", "resp_b-out1"]
        assert await store.get("resp_b", "key-other") is None      # another owner
        assert await store.get("resp_x", "") is None
        conv = await store.conversation("resp_b", "")
        assert [i["id"] for i in conv] == ["resp_a-in0", "resp_a-in1", "resp_a-out0",
                                           "resp_b-in0", "resp_b-out0", "resp_b-out1"]
        assert await store.conversation("resp_b", "key-other") is None
        with pytest.raises(OverflowError):       # reading stops past the byte bound
            await store.conversation("resp_b", "", max_bytes=100)
        page = await store.input_items("resp_a", "", limit=1, order="asc")
        assert [i["id"] for i in page.data] == ["resp_a-in0"] and page.has_more
        page = await store.input_items("resp_a", "", limit=5, order="asc", after="resp_a-in0")
        assert [i["id"] for i in page.data] == ["resp_a-in1"] and not page.has_more
        page = await store.input_items("resp_a", "", limit=5)      # desc by default
        assert [i["id"] for i in page.data] == ["resp_a-in1", "resp_a-in0"]
        with pytest.raises(KeyError):
            await store.input_items("resp_a", "", after="nope")
        assert await store.delete("resp_a", "key-other") is False
        assert await store.delete("resp_a", "") is True
        assert await store.delete("resp_a", "") is False
        with pytest.raises(LookupError) as e:                      # a broken chain
            await store.conversation("resp_b", "")
        assert e.value.args[0] == "resp_a"

    _run(go())
    store.close()
    # what is in the file, read independently: no items left of resp_a
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sorted(r[0] for r in con.execute("SELECT id FROM responses")) == ["resp_b", "resp_x"]
    assert con.execute("SELECT count(*) FROM items").fetchone()[0] == 3 + 3   # resp_b: 1 in + 2 out; resp_x: 2 + 1
    con.close()


def test_pruned_by_rows_and_age(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    store = ResponseStore(path, max_rows=5, max_age_s=3600)
    store.open()

    async def go():
        for i in range(12):
            await store.save(_resp(f"resp_{i}"))
        assert await store.count() == 5
        assert await store.get("resp_6", "") is None and await store.get("resp_7", "")
        await store.save(_resp("resp_old", created=time.time() - 7200))  # pruned at once
        assert await store.get("resp_old", "") is None

    _run(go())
    store.close()
    con = sqlite3.connect(path)
    seqs = {r[0] for r in con.execute("SELECT seq FROM responses")}
    assert {r[0] for r in con.execute("SELECT DISTINCT response_seq FROM items")} == seqs
    con.close()


def test_memory_store_keeps_nothing(tmp_path):
    store = ResponseStore(MEMORY)
    store.open()

    async def go():
        await store.save(_resp("resp_a"))
        assert await store.get("resp_a", "") is None
        assert await store.conversation("resp_a", "") is None

    _run(go())
    assert not store.enabled


def test_concurrent_writes_to_one_conversation_keep_every_row(tmp_path):
    """200 tasks continue the same response at once: every response is there with all
    of its items, in order, none mixed with another's."""
    store = ResponseStore(str(tmp_path / "r.sqlite3"))
    store.open()

    async def go():
        await store.save(_resp("resp_root"))
        await asyncio.gather(*[store.save(_resp(f"resp_{i}", prev="resp_root", n_in=3 + i % 5,
                                                n_out=1 + i % 3)) for i in range(200)])
        for i in range(200):
            conv = await store.conversation(f"resp_{i}", "")
            assert [c["id"] for c in conv] == \
                ["resp_root-in0", "resp_root-in1", "resp_root-out0"] + \
                [f"resp_{i}-in{k}" for k in range(3 + i % 5)] + \
                [f"resp_{i}-out{k}" for k in range(1 + i % 3)]

    _run(go())
    store.close()


def _writer(path: str, tag: str, n: int) -> None:
    store = ResponseStore(path)
    store.open()

    async def go():
        await asyncio.gather(*[store.save(_resp(f"resp_{tag}{i}", prev="resp_root", n_in=4))
                               for i in range(n)])

    asyncio.run(go())
    store.close()


def test_processes_share_the_file(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    store = ResponseStore(path)
    store.open()
    _run(store.save(_resp("resp_root")))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 60)) for tag in "pq"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0

    async def go():
        assert await store.count() == 121
        for tag in "pq":
            for i in range(60):
                conv = await store.conversation(f"resp_{tag}{i}", "")
                assert [c["id"] for c in conv][3:] == \
                    [f"resp_{tag}{i}-in{k}" for k in range(4)] + [f"resp_{tag}{i}-out0"]

    _run(go())
    store.close()


def test_refuses_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database at all " * 500)
    with pytest.raises(StoreError, match="not a database"):
        ResponseStore(str(bad)).open()
    other = tmp_path / "other.sqlite3"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE responses(x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=str(other)):
        ResponseStore(str(other)).open()
    newer = tmp_path / "newer.sqlite3"
    s = ResponseStore(str(newer))
    s.open()
    s.close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value='tep-responses-99'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="tep-responses-99"):
        ResponseStore(str(newer)).open()


_RO_CHECK = """
import sys
from tep.serving.response_store import ResponseStore, StoreError
try:
    ResponseStore(sys.argv[1]).open()
except StoreError as e:
    print("REFUSED", e)
else:
    print("OPENED")
"""


def test_refuses_read_only_file(tmp_path):
    """A file the server may not write is refused when opened (checked from a child
    process that, as root, first gives up the capability to override file modes)."""
    path = tmp_path / "ro.sqlite3"
    s = ResponseStore(str(path))
    s.open()
    s.close()
    os.chmod(path, 0o444)
    r = subprocess.run([sys.executable, "-c", _RO_CHECK, str(path)], capture_output=True,
                       text=True, preexec_fn=obey_file_modes, timeout=60,
                       env=child_env())
    assert "REFUSED" in r.stdout, r.stdout + r.stderr
    assert "readonly" in r.stdout, r.stdout
