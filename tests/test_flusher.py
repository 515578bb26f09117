"""The flusher's ownership of a drained batch, and what each class of database error does.

Faults are injected into a real store (SQLite and MariaDB) at its one gate to the
driver, ``Store._run``, or by breaking the real database (a dropped table, a
trigger that signals an error code).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from persistence.buffer import Buffer
from persistence.config import BufferSettings
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher, FlushFailed
from persistence.journal import RecoveryReport, read_segment
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, Record, RecordType
from persistence.service import PersistenceService
from persistence.store import OperatorError, Store, TransientError, UnclassifiedError
from tests.conftest import Database, make_settings
from tests.factories import new_session_id, session, task
from tests.faults import FaultyStore, writes_to

FLUSH_URL = "/api/v1/persistence/flush"
STATS_URL = "/api/v1/persistence/stats"


@pytest.fixture
def parts(
    tmp_path: Path, db: Database
) -> tuple[DurableBuffer, FaultyStore, Callable[..., Flusher]]:
    settings = make_settings(tmp_path, database=db.settings)
    store = FaultyStore(settings.database)
    store.prepare()
    durable = DurableBuffer(Buffer(100_000, 1 << 30))

    def flusher(**buffer: Any) -> Flusher:
        return Flusher(durable, store, BufferSettings(**{"retry_backoff_initial": 0.01, **buffer}))

    yield durable, store, flusher
    store.close()


def buffered(durable: DurableBuffer) -> dict[str, int]:
    counts = durable.buffer.counts()
    return {"sessions": counts["sessions"], "tasks": counts["tasks"]}


def test_an_unexpected_exception_puts_every_unwritten_record_back(parts: Any) -> None:
    durable, store, make = parts
    flusher = make()
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    durable.add(TASKS, [task(sid) for _ in range(5)])

    def broken(ids: Any) -> set[str]:
        raise RuntimeError("a bug between the two writes")

    store.existing_sessions = broken  # type: ignore[method-assign]
    with pytest.raises(FlushFailed) as failed:
        flusher.flush_once()
    assert failed.value.result.sessions_written == 1  # committed before the bug
    assert buffered(durable) == {"sessions": 0, "tasks": 5}
    assert durable.buffer.counts()["in_flight"] == 0
    assert flusher.stats.last_error_category == "unexpected"
    del store.existing_sessions
    assert flusher.flush_once().tasks_written == 5


def test_rows_committed_before_a_failure_are_counted(parts: Any) -> None:
    durable, store, make = parts
    flusher = make()
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    durable.add(TASKS, [task(sid)])
    store.fail_when(writes_to("translation_tasks"), TransientError("lock wait timeout"))
    with pytest.raises(FlushFailed) as failed:
        flusher.flush_once()
    assert (failed.value.result.sessions_written, failed.value.result.tasks_written) == (1, 0)
    assert flusher.stats.sessions_written == 1
    assert flusher.stats.failed_flush_count == 1


def test_an_unclassified_error_is_retried_then_isolated_to_its_row(
    parts: Any, db: Database
) -> None:
    durable, store, make = parts
    flusher = make(isolate_after_failures=2)
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    tasks = [task(sid) for _ in range(40)]
    durable.add(TASKS, tasks)
    bad = tasks[13]["task_id"]
    store.fail_when(writes_to("translation_tasks", bad), TypeError("cannot escape this value"))
    for _ in range(2):  # retried like a transient error first: nothing dead-lettered yet
        with pytest.raises(FlushFailed, match="TypeError"):
            flusher.flush_once()
        assert db.count("persistence_dead_letters") == 0
    result = flusher.flush_once()
    assert result.dead_lettered == 1
    # On MySQL the rows are split over two connections: the other half of the tasks
    # was written by the failed flushes already.
    assert flusher.stats.tasks_written == 39
    [(key, reason)] = db.query("SELECT record_key, error_message FROM persistence_dead_letters")
    assert key == bad
    assert "cannot escape this value" in reason
    assert flusher.stats.dead_letter_reasons == {"unclassified_error": 1}
    assert buffered(durable) == {"sessions": 0, "tasks": 0}


def test_a_lost_connection_is_not_blamed_on_a_row_while_the_database_is_down(
    parts: Any, db: Database
) -> None:
    durable, store, make = parts
    flusher = make(isolate_after_failures=1)
    flusher._probe = lambda: False  # the database does not answer probes
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    store.fail_when(writes_to("translation_sessions"), UnclassifiedError("gone"))
    for _ in range(3):
        with pytest.raises(FlushFailed):
            flusher.flush_once()
    assert db.count("persistence_dead_letters") == 0
    assert buffered(durable) == {"sessions": 1, "tasks": 0}


# --- flushing over two connections (MySQL; SQLite always writes over one) ----------------

on_mysql = pytest.mark.parametrize(
    "db", [pytest.param("mysql", marks=pytest.mark.mysql)], indirect=True
)


class SimultaneousWrites:
    """Stands in for ``store.upsert`` of tasks: each write waits until both shards are inside
    one (so they provably run at the same time), then runs the real one, or ``fail(keys)``
    raises instead for the shard it names."""

    def __init__(self, store: Store, fail: Callable[[list[str]], Exception | None]) -> None:
        self.real = store.upsert
        self.fail = fail
        self.both_writing = threading.Barrier(2, timeout=10)
        self.calls: list[tuple[int, list[str]]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: RecordType, records: Sequence[Record]) -> None:
        if kind is TASKS:
            keys = [record[TASKS.key] for record in records]
            with self._lock:
                self.calls.append((threading.get_ident(), keys))
            self.both_writing.wait()
            error = self.fail(keys)
            if error is not None:
                raise error
        self.real(kind, records)


def sessions_flushed_then_tasks(
    durable: DurableBuffer, flusher: Flusher, count: int
) -> tuple[list[str], list[str]]:
    """Write a session, then buffer ``count`` of its tasks: the lower and the upper half
    of their keys, the ranges the two shards of the next flush take."""
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    flusher.flush_once()
    tasks = [task(sid) for _ in range(count)]
    durable.add(TASKS, tasks)
    keys = sorted(t["task_id"] for t in tasks)
    return keys[: count // 2], keys[count // 2 :]


def written_tasks(db: Database) -> list[str]:
    return sorted(row[0] for row in db.query("SELECT task_id FROM translation_tasks"))


@on_mysql
def test_two_shards_write_contiguous_key_ranges_at_the_same_time(parts: Any, db: Database) -> None:
    durable, store, make = parts
    flusher = make()
    lower, upper = sessions_flushed_then_tasks(durable, flusher, 40)
    writes = SimultaneousWrites(store, lambda keys: None)
    store.upsert = writes  # type: ignore[method-assign]
    result = flusher.flush_once()  # a shard that waited for the other alone would time out
    assert result.tasks_written == 40
    assert sorted(keys for _, keys in writes.calls) == [lower, upper]
    assert len({thread for thread, _ in writes.calls}) == 2
    assert written_tasks(db) == lower + upper
    assert flusher.stats.transactions == 3  # the session, then one per shard


@on_mysql
def test_a_fault_in_one_shard_puts_back_only_its_range_while_the_other_commits(
    parts: Any, db: Database
) -> None:
    durable, store, make = parts
    flusher = make()
    lower, upper = sessions_flushed_then_tasks(durable, flusher, 40)
    writes = SimultaneousWrites(
        store,
        lambda keys: (
            TransientError("injected: lock wait timeout", 1205) if keys[0] in upper else None
        ),
    )
    store.upsert = writes  # type: ignore[method-assign]
    with pytest.raises(FlushFailed, match="lock wait timeout") as failed:
        flusher.flush_once()
    assert failed.value.result.tasks_written == 20
    assert flusher.stats.tasks_written == 20
    assert flusher.stats.last_error_category == "transient"
    assert written_tasks(db) == lower
    assert sorted(durable.buffer.sample_keys(100)["tasks"]) == upper
    assert durable.buffer.counts()["in_flight"] == 0
    del store.upsert
    assert flusher.flush_once().tasks_written == 20
    assert written_tasks(db) == lower + upper


@on_mysql
@pytest.mark.parametrize(
    ("error", "category"),
    [
        (OperatorError("injected: table is read only", 1036), "needs_operator"),
        (RuntimeError("injected: a bug"), "unexpected"),
    ],
)
def test_when_both_shards_fail_the_flush_ends_with_the_failure_that_says_most(
    parts: Any, db: Database, caplog: pytest.LogCaptureFixture, error: Exception, category: str
) -> None:
    durable, store, make = parts
    flusher = make()
    lower, upper = sessions_flushed_then_tasks(durable, flusher, 10)
    transient = TransientError("injected: lock wait timeout", 1205)
    writes = SimultaneousWrites(store, lambda keys: transient if keys[0] in lower else error)
    store.upsert = writes  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, "persistence.flusher"), pytest.raises(FlushFailed):
        flusher.flush_once()
    assert flusher.stats.last_error_category == category
    assert (flusher.operator_error is not None) == (category == "needs_operator")
    assert "another shard of the flush failed too (transient)" in caplog.text
    assert sorted(durable.buffer.sample_keys(100)["tasks"]) == lower + upper
    assert written_tasks(db) == []


@on_mysql
def test_two_shards_take_turns_on_a_pool_of_one_connection(tmp_path: Path, db: Database) -> None:
    """A pool smaller than the shards makes them wait for each other, never deadlock
    (the configuration refuses it; a store built without that check still works)."""
    settings = make_settings(tmp_path, database=db.settings).database
    store = Store(dataclasses.replace(settings, pool_size=1, max_rows_per_transaction=7))
    store.prepare()
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    flusher = Flusher(durable, store, BufferSettings())
    try:
        lower, upper = sessions_flushed_then_tasks(durable, flusher, 60)
        assert flusher.flush_once().tasks_written == 60
        assert written_tasks(db) == lower + upper
    finally:
        store.close()


def test_a_dropped_table_needs_an_operator_and_is_created_again(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(
        buffer={"flush_interval": 3600, "max_buffer_size": 100_000, "hard_limit": 200_000}
    )
    client = app.test_client()
    sid = new_session_id()
    client.post("/api/v1/persistence/sessions/batch", json={"sessions": [session(session_id=sid)]})
    assert client.post(FLUSH_URL).status_code == 200
    db.execute("DROP TABLE translation_tasks")
    client.post("/api/v1/persistence/tasks/batch", json={"tasks": [task(sid)]})
    service: PersistenceService = app.extensions["persistence"]
    service.store.prepare = lambda: None  # type: ignore[method-assign]  # no re-creation yet
    failed = client.post(FLUSH_URL)
    assert failed.status_code == 503
    health = client.get("/health")
    assert health.status_code == 503
    assert "need an operator" in health.get_json()["problems"][0]
    assert health.get_json()["database"] == "healthy"  # SELECT 1 works; writes do not
    stats = client.get(STATS_URL).get_json()["flush_info"]
    assert stats["last_error_category"] == "needs_operator"
    assert stats["needs_operator"]
    del service.store.prepare  # database.create_tables: the next write creates it again
    assert client.post(FLUSH_URL).get_json()["tasks_written"] == 1
    assert client.get("/health").status_code == 200
    assert db.count("translation_tasks") == 1


def test_a_failed_flush_in_journal_mode_keeps_every_segment(tmp_path: Path, db: Database) -> None:
    settings = make_settings(tmp_path, database=db.settings)
    store = FaultyStore(settings.database)
    store.prepare()
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    durable.open_journal(tmp_path / "journal")
    flusher = Flusher(durable, store, BufferSettings())
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    durable.add(TASKS, [task(sid, task_id="t")])
    store.fail_when(writes_to("translation_tasks"), RuntimeError("unexpected"))
    with pytest.raises(FlushFailed):
        flusher.flush_once()
    # What kill -9 would find now: the task is still in the journal.
    report = RecoveryReport()
    journaled = [
        r[TASKS.key]
        for path in (tmp_path / "journal").glob("w-*/seg-*.log")
        for entry in read_segment(path, report)
        if entry.kind is TASKS
        for r in entry.records
    ]
    assert "t" in journaled
    durable.close()
    store.close()


def test_stamps_start_above_the_newest_row_after_a_clock_step(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    """A row written before a restart with a clock that was ahead: a new update must win."""
    app = app_factory(start=False)
    sid = new_session_id()
    future = 10**17  # far beyond today's stamps
    db.execute(
        "INSERT INTO translation_sessions (session_id, filename, file_path, status, "
        f"llm_provider, {ORDER_COLUMN}) VALUES ('{sid}', 'a', 'b', 'processing', 'x', {future})"
    )
    service = app.extensions["persistence"]
    service.start()
    try:
        client = app.test_client()
        body = {"sessions": [session(session_id=sid, status="completed")]}
        assert client.post("/api/v1/persistence/sessions/batch", json=body).status_code == 200
        assert client.post(FLUSH_URL).status_code == 200
        assert db.query("SELECT status FROM translation_sessions WHERE session_id = ?", sid) == [
            ("completed",)
        ]
    finally:
        service.stop()


class _RefusingScheduler:
    """Stands for a scheduler that refuses new jobs (e.g. while it shuts down)."""

    def add_job(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the scheduler is shutting down")


def test_a_wake_up_that_cannot_be_scheduled_does_not_block_later_ones(
    app_factory: Callable[..., Flask],
) -> None:
    app = app_factory(buffer={"flush_interval": 3600, "max_buffer_size": 1, "hard_limit": 2000})
    service = app.extensions["persistence"]
    runtime = service.runtime
    real, runtime._scheduler = runtime._scheduler, _RefusingScheduler()
    try:
        runtime.wake_flusher()
    finally:
        runtime._scheduler = real
    client = app.test_client()
    sid = new_session_id()
    client.post("/api/v1/persistence/sessions/batch", json={"sessions": [session(session_id=sid)]})
    assert _wait(lambda: service.flusher.stats.sessions_written == 1), (
        "the size trigger no longer starts flushes"
    )


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
