"""The flusher's ownership of a drained batch, and what each class of database error does.

Faults are injected into a real store (SQLite and MariaDB) at its one gate to the
driver, ``Store._run``, or by breaking the real database (a dropped table, a
trigger that signals an error code).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from persistence.buffer import Buffer
from persistence.config import BufferSettings
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher, FlushFailed
from persistence.journal import RecoveryReport, read_segment
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS
from persistence.service import PersistenceService
from persistence.store import TransientError, UnclassifiedError
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
    assert (result.tasks_written, result.dead_lettered) == (39, 1)
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
