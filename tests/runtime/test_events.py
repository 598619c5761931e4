"""Event store: append/query, restart, threads, group commit, and durability across
SIGKILL, on SQLite and on a real PostgreSQL server (``pg_url``, see conftest.py)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from bastion.errors import BastionError
from bastion.store import events as ev
from bastion.store.events import EventStore


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """An event store URL of each backend, for a fresh, empty store."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'e.db'}"
    return request.getfixturevalue("pg_url")


def _run_threads(n: int, work) -> None:
    threads = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_append_query_count_and_filters(url):
    s = EventStore(url)
    a = s.append(ev.PREDICTION, {"label": 3, "p": [0.1, float("nan")]}, client_id="c1",
                 request_id="r1", model_version=2)
    b = s.append(ev.FEEDBACK, {"label": 3}, request_id="r1")
    ids = s.append_many([{"kind": ev.ALERT, "payload": {"m": "x"}, "client_id": "c2"},
                         {"kind": ev.AUDIT, "payload": {"why": "y"}}])
    assert a < b < ids[0] < ids[1]
    assert s.count() == 4
    assert s.count(kinds=[ev.PREDICTION, ev.FEEDBACK]) == 2
    (p,) = s.query(kinds=ev.PREDICTION)
    assert p.payload == {"label": 3, "p": [0.1, None]}  # NaN stored as null (valid JSON)
    assert p.client_id == "c1" and p.request_id == "r1" and p.model_version == "2"
    assert p.at.endswith("+00:00")
    assert [e.id for e in s.query(request_id="r1")] == [a, b]
    assert [e.id for e in s.query(request_id=["r1", "zz"])] == [a, b]
    assert [e.id for e in s.query(after_id=b)] == ids
    assert [e.id for e in s.query(after_id=a, before_id=ids[0])] == [b, ids[0]]
    assert [e.id for e in s.query(client_id="c2")] == [ids[0]]
    assert [e.id for e in s.query(limit=2, newest_first=True)] == [ids[1], ids[0]]
    assert [e.id for e in s.recent(ev.PREDICTION, 5)] == [a]
    assert s.query(since=time.time() + 60) == []
    assert s.count(since=time.time() - 60, until=time.time() + 60) == 4
    assert s.last_id() == ids[1]
    assert s.get_state("missing", 7) == 7
    s.set_state("k", {"a": [1, 2]})
    s.set_state("k", {"a": [3]})  # replaces
    assert s.get_state("k") == {"a": [3]}
    assert s.query(kinds=[]) == [] and s.count(request_id=[]) == 0
    assert s.append_many([]) == []
    s.close()
    with pytest.raises(BastionError, match="closed"):
        s.append(ev.AUDIT, {})
    with pytest.raises(BastionError, match="closed"):
        s.count()


def test_bad_input_raises_bastion_errors(url):
    s = EventStore(url)
    with pytest.raises(BastionError, match="unknown event kind"):
        s.append("nonsense", {})
    with pytest.raises(BastionError, match="JSON"):
        s.append(ev.AUDIT, {"x": object()})
    with pytest.raises(BastionError, match="dict"):
        s.append(ev.AUDIT, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(BastionError, match="longer than 256"):
        s.append(ev.AUDIT, {}, client_id="c" * 257)
    with pytest.raises(BastionError, match="NUL"):
        s.append(ev.AUDIT, {}, request_id="a\x00b")
    with pytest.raises(BastionError, match="kind"):  # the whole batch is refused
        s.append_many([{"kind": ev.AUDIT}, {"payload": {}}])
    with pytest.raises(BastionError, match="ts"):
        s.append(ev.AUDIT, {}, ts=float("inf"))
    with pytest.raises(BastionError, match="limit"):
        s.query(limit=-1)
    with pytest.raises(BastionError, match="durability"):
        EventStore(url, durability="sometimes")
    assert s.count() == 0  # nothing half-written
    assert s.append(ev.AUDIT, {"s": "a\x00b"}) > 0  # NUL inside the JSON payload is fine
    assert s.query()[0].payload == {"s": "a\x00b"}


def test_unsupported_or_unreachable_urls_raise_bastion_errors(tmp_path):
    with pytest.raises(BastionError, match="unsupported"):
        EventStore("mysql://x")
    with pytest.raises(BastionError, match="cannot open the event store"):
        EventStore(f"postgresql://u@/db?host={tmp_path}")  # no server there
    with pytest.raises(BastionError, match="names no file"):
        EventStore("sqlite:///")


def test_wal_mode_synchronous_and_restart_loses_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    s = EventStore(url)
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default
    ids = [s.append(ev.PREDICTION, {"i": i}) for i in range(50)]
    s.close()
    s2 = EventStore(url, durability="normal")
    assert s2._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, opt-in
    got = s2.query(limit=None)
    assert [e.id for e in got] == ids and [e.payload["i"] for e in got] == list(range(50))
    assert s2.append(ev.AUDIT, {}) > ids[-1]


def test_restart_loses_nothing(url):
    s = EventStore(url)
    ids = [s.append(ev.PREDICTION, {"i": i}) for i in range(20)]
    s.set_state("cursor", 5)
    s.close()
    s2 = EventStore(url)
    got = s2.query(limit=None)
    assert [e.id for e in got] == ids and [e.payload["i"] for e in got] == list(range(20))
    assert s2.get_state("cursor") == 5
    assert s2.append(ev.AUDIT, {}) > ids[-1]


def test_many_threads_share_one_store(url):
    s = EventStore(url)

    def work(t: int) -> None:
        for i in range(25):
            s.append(ev.PREDICTION, {"t": t, "i": i}, client_id=f"c{t}")
            s.query(client_id=f"c{t}", limit=5)

    _run_threads(4, work)
    assert s.count() == 100
    assert all(s.count(client_id=f"c{t}") == 25 for t in range(4))


def test_concurrent_appends_get_distinct_ids_of_their_own(url):
    s = EventStore(url)
    got: dict[int, list[tuple[int, list[int]]]] = {}

    def work(t: int) -> None:
        mine = []
        for i in range(15):
            if i % 3 == 0:
                mine.append((i, s.append_many([{"kind": ev.PREDICTION, "client_id": f"c{t}",
                                                 "payload": {"t": t, "i": i, "j": j}}
                                                for j in range(3)])))
            else:
                mine.append((i, [s.append(ev.PREDICTION, {"t": t, "i": i, "j": 0},
                                          client_id=f"c{t}")]))
        got[t] = mine

    _run_threads(16, work)
    all_ids = [eid for mine in got.values() for _, ids in mine for eid in ids]
    assert len(all_ids) == len(set(all_ids)) == 16 * (5 * 3 + 10) == s.count()
    stored = {e.id: e for e in s.query(limit=None)}
    for t, mine in got.items():
        flat = [eid for _, ids in mine for eid in ids]
        assert flat == sorted(flat)  # a caller's later appends get later ids
        for i, ids in mine:
            assert ids == sorted(ids) and (len(ids) == 1 or ids == list(
                range(ids[0], ids[0] + len(ids))))  # one call's rows are contiguous
            for j, eid in enumerate(ids):  # each caller got the ids of its own rows
                e = stored[eid]
                assert (e.payload, e.client_id) == ({"t": t, "i": i, "j": j}, f"c{t}")


def _queue_behind_held_writer(s: EventStore, payloads: list[dict]) -> tuple[dict, dict]:
    """Start one append per payload while the test holds the writer lock: the first caller
    becomes the leader (blocked on the lock), the others queue behind it; then release."""
    results: dict[int, int] = {}
    errors: dict[int, BaseException] = {}

    def work(t: int) -> None:
        try:
            results[t] = s.append(ev.AUDIT, payloads[t])
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[t] = exc

    def wait_for(cond) -> None:
        deadline = time.time() + 20
        while not cond():
            assert time.time() < deadline, "callers did not queue"
            time.sleep(0.005)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(payloads))]
    with s._lock:
        threads[0].start()
        wait_for(lambda: s._leader)  # the first caller leads, alone
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(s._queue) == len(payloads) - 1)
    for t in threads:
        t.join()
    return results, errors


def test_queued_callers_share_one_commit(url):
    s = EventStore(url)
    groups: list[int] = []
    commit = s._commit_rows

    def counting(group):
        groups.append(len(group))
        return commit(group)

    s._commit_rows = counting  # type: ignore[method-assign]
    results, errors = _queue_behind_held_writer(s, [{"t": t} for t in range(12)])
    assert not errors and len(set(results.values())) == 12
    assert sorted(groups) == [1, 11]  # the leader alone, then every queued caller at once
    assert {e.id: e.payload["t"] for e in s.query(limit=None)} == {
        eid: t for t, eid in results.items()}


def test_a_write_error_reaches_only_its_caller(url):
    s = EventStore(url)
    insert = s._insert

    def failing(conn, rows):
        if any('"boom"' in r[-1] for r in rows):
            raise sqlite3.OperationalError("simulated write failure")
        return insert(conn, rows)

    groups: list[int] = []
    commit = s._commit_rows

    def counting(group):
        groups.append(len(group))
        return commit(group)

    s._insert = failing  # type: ignore[method-assign]
    s._commit_rows = counting  # type: ignore[method-assign]
    payloads = [{"t": t} for t in range(8)]
    payloads[5] = {"t": 5, "x": "boom"}
    results, errors = _queue_behind_held_writer(s, payloads)
    assert groups == [1, 7] + [1] * 7  # the group of 7 failed, then each caller alone
    assert set(errors) == {5} and isinstance(errors[5], BastionError)
    assert "simulated write failure" in str(errors[5])
    assert set(results) == set(range(8)) - {5}
    assert sorted(e.payload["t"] for e in s.query(limit=None)) == [0, 1, 2, 3, 4, 6, 7]


def test_writers_of_two_stores_are_serialised(url):
    a, b = EventStore(url), EventStore(url, busy_timeout_ms=300)
    with a._tx():
        t0 = time.monotonic()
        with pytest.raises(BastionError, match="cannot write"):
            b.append(ev.AUDIT, {"who": "b"})  # waits for a's write transaction, then gives up
        assert time.monotonic() - t0 >= 0.25
    assert b.append(ev.AUDIT, {"who": "b"}) > 0
    assert [e.payload["who"] for e in a.query()] == ["b"]


_CHILD = """
import sys, threading
from bastion.store.events import EventStore
s = EventStore(sys.argv[1])
n_threads = int(sys.argv[2])
out = threading.Lock()

def work(t):
    i = 0
    while True:
        eid = s.append("prediction", {"i": i, "t": t})
        (fid,) = s.append_many([{"kind": "feedback", "payload": {"i": i, "t": t}}])
        with out:  # acknowledged only after the commits returned
            sys.stdout.write(f"{eid} {fid} {i} {t}\\n")
            sys.stdout.flush()
        i += 1

for t in range(n_threads - 1):
    threading.Thread(target=work, args=(t,), daemon=True).start()
work(n_threads - 1)
"""


@pytest.mark.parametrize("n_threads", [1, 8])
def test_sigkill_keeps_every_acknowledged_event(url, n_threads):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(n_threads)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    acked: list[tuple[int, int, int, int]] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            acked.append(tuple(map(int, line.split())))  # type: ignore[arg-type]
            if len(acked) >= 200:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # right after acknowledging
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 200
    s = EventStore(url)
    stored = {e.id: (e.kind, e.payload) for e in s.query(limit=None)}
    for eid, fid, i, t in acked:
        assert stored.get(eid) == (ev.PREDICTION, {"i": i, "t": t})
        assert stored.get(fid) == (ev.FEEDBACK, {"i": i, "t": t})
    assert len({a[0] for a in acked} | {a[1] for a in acked}) == 2 * len(acked)


def test_leases(url):
    a, b = EventStore(url), EventStore(url)
    assert a.acquire_lease("healing", "A", ttl_s=60)
    assert a.acquire_lease("healing", "A", ttl_s=60)  # re-entrant for its owner
    assert not b.acquire_lease("healing", "B", ttl_s=60)
    b.release_lease("healing", "B")  # not the owner: no effect
    assert not b.acquire_lease("healing", "B")
    a.release_lease("healing", "A")
    assert b.acquire_lease("healing", "B", ttl_s=0.0)
    assert a.acquire_lease("healing", "A")  # B's lease expired
