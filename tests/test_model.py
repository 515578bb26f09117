"""The promise, model-checked: random interleavings of accepts, flushes, crashes and faults.

A hypothesis state machine drives the real buffer, journal, flusher and store
(on SQLite, and on MariaDB flushing over one and over two connections in
parallel) and keeps a reference model of what was acknowledged. Faults are
injected at every store call (before it runs, or after it ran: the database
did the work but the service hears it failed; with two connections also in
one shard only, while the other writes) and at every journal write, fsync,
file creation and directory fsync, with every class of error: transient,
lost connection, row, needs-an-operator, unclassified, and exceptions that
are not database errors at all.

Checked after every step:
- a refused batch changed nothing in the buffer;
- rows never regress: a row's arrival stamp never goes down, and a row never
  changes without a newer stamp; session counters never decrease.
Checked at the end, once the faults stop and everything is flushed:
- every acknowledged record is in its table or in the dead-letter table;
- each row equals the newest acknowledged update (session counters: the
  largest acknowledged), unless that update was dead-lettered;
- nothing refused ever reaches the database.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from persistence.buffer import Buffer, BufferFull
from persistence.config import BufferSettings
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher, FlushFailed
from persistence.journal import JournalError
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, Record, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.store import (
    ConnectionLost,
    OperatorError,
    RowError,
    TransientError,
    UnclassifiedError,
)
from tests.conftest import Database, make_settings
from tests.faults import FaultyFiles, FaultyStore, commits, statement_matches, writes_to

SESSION_IDS = [str(uuid.UUID(int=n + 1)) for n in range(3)]
# Tasks of the last session id wait for a session that never comes.
ORPHAN_SESSION = str(uuid.UUID(int=99))
TASK_IDS = [f"task-{n}" for n in range(6)]
SESSION_SCHEMA = build_session_schema(("pending", "processing", "completed", "failed"))
TASK_SCHEMA = build_task_schema(("pending", "processing", "completed", "failed"))
STATUSES = ("pending", "processing", "completed", "failed")
ERRORS = {
    "transient": lambda: TransientError("injected: lock wait timeout", 1205),
    "connection_lost": lambda: ConnectionLost("injected: server has gone away", 2006),
    "row": lambda: RowError("injected: data too long", 1406),
    "operator": lambda: OperatorError("injected: table is read only", 1036),
    "unclassified": lambda: UnclassifiedError("injected: TypeError"),
    "not_a_database_error": lambda: RuntimeError("injected: a bug"),
}
TARGETS = {
    "upsert sessions": writes_to("translation_sessions"),
    "upsert tasks": writes_to("translation_tasks"),
    # With two connections, only the shard that holds this key fails; the other commits.
    "upsert one task": writes_to("translation_tasks", TASK_IDS[0]),
    "session lookup": statement_matches("SELECT session_id FROM translation_sessions"),
    "dead letters": statement_matches("persistence_dead_letters"),
    "commit": commits(),
    "connect": lambda name, args: name == "connection",
}
JOURNAL_FAULTS = ("write", "short_write", "fsync", "open", "fsync_dir")
TABLES = ("persistence_dead_letters", "translation_tasks", "translation_sessions")
ORPHAN_TIMEOUT = 1000.0


def model_machine(
    db: Database, root: Path, journaled: bool, connections: int
) -> type[RuleBasedStateMachine]:
    """The state machine class for one database, durability mode and number of flush
    connections."""
    runs = itertools.count()
    markers = itertools.count()

    class Promise(RuleBasedStateMachine):
        @initialize()
        def start(self) -> None:
            run = next(runs)
            for table in TABLES:
                self_execute(db, f"DELETE FROM {table}")
            (root / f"run-{run}").mkdir()
            self.settings = make_settings(
                root / f"run-{run}", database={**db.settings, "flush_connections": connections}
            )
            self.store = FaultyStore(self.settings.database)
            self.store.prepare()
            self.files = FaultyFiles()
            self.journal_dir = root / f"journal-{run}"
            self.now = time.time()
            self.acked: dict[str, dict[str, list[Record]]] = {SESSIONS.name: {}, TASKS.name: {}}
            self.refused_markers: set[str] = set()
            self.seen: dict[str, dict[str, tuple[int, Any]]] = {SESSIONS.name: {}, TASKS.name: {}}
            self._boot()

        def _boot(self) -> None:
            self.durable = DurableBuffer(Buffer(60, 1 << 30))
            if journaled:
                self.files.armed.clear()  # a start-up failure is fatal, not what is tested
                self.durable.open_journal(self.journal_dir, self.files)
                assert self.durable.journal is not None
                self.durable.journal.recovery_pause = 0.0
            self.flusher = Flusher(
                self.durable,
                self.store,
                BufferSettings(
                    orphan_task_timeout=ORPHAN_TIMEOUT,
                    retry_backoff_initial=0.01,
                    isolate_after_failures=2,
                ),
                wall_clock=lambda: self.now,
            )

        # --- intake ---------------------------------------------------------------------

        @rule(
            picks=st.lists(
                st.tuples(
                    st.sampled_from(SESSION_IDS),
                    st.sampled_from(STATUSES),
                    st.integers(0, 50),
                    st.integers(0, 50),
                ),
                min_size=1,
                max_size=4,
            )
        )
        def accept_sessions(self, picks: list[tuple[str, str, int, int]]) -> None:
            items = [
                {
                    "session_id": sid,
                    "filename": f"m{next(markers)}",
                    "file_path": "/f.xlsx",
                    "status": status,
                    "llm_provider": "openai",
                    "metadata": {"n": done},
                    "total_tasks": total,
                    "completed_tasks": done,
                }
                for sid, status, total, done in picks
            ]
            self._accept(SESSIONS, SESSION_SCHEMA.load(items), "filename")

        @rule(
            picks=st.lists(
                st.tuples(
                    st.sampled_from(TASK_IDS),
                    st.sampled_from([*SESSION_IDS, ORPHAN_SESSION]),
                    st.sampled_from(STATUSES),
                ),
                min_size=1,
                max_size=6,
            )
        )
        def accept_tasks(self, picks: list[tuple[str, str, str]]) -> None:
            items = [
                {
                    "task_id": tid,
                    "session_id": sid,
                    "batch_id": "b",
                    "sheet_name": "s",
                    "row_index": 1,
                    "column_name": "c",
                    "source_text": "src",
                    "target_text": f"m{next(markers)}",
                    "status": status,
                }
                for tid, sid, status in picks
            ]
            self._accept(TASKS, TASK_SCHEMA.load(items), "target_text")

        def _accept(self, kind: RecordType, records: list[Record], marker: str) -> None:
            before = self._buffer_snapshot()
            try:
                self.durable.add(kind, records)
            except (BufferFull, JournalError):
                assert self._buffer_snapshot() == before, "a refused batch changed the buffer"
                self.refused_markers.update(r[marker] for r in records)
                return
            for record in records:
                self.acked[kind.name].setdefault(record[kind.key], []).append(dict(record))

        def _buffer_snapshot(self) -> Any:
            buffer = self.durable.buffer
            with buffer._lock:
                return {name: dict(records) for name, records in buffer._records.items()}

        # --- flushing, time, crashes ----------------------------------------------------

        @rule()
        def flush(self) -> None:
            with contextlib.suppress(FlushFailed):  # the model allows any flush to fail
                self.flusher.flush_once()
            self._check_rows_never_regress()

        @rule()
        def time_passes(self) -> None:
            self.now += ORPHAN_TIMEOUT + 1  # tasks waiting for their session expire

        if journaled:

            @rule()
            def crash_and_recover(self) -> None:
                """kill -9: memory is gone, the journal's files stay; a new process adopts."""
                self.durable.close()
                self._boot()

            @rule(operation=st.sampled_from(JOURNAL_FAULTS))
            def journal_fault(self, operation: str) -> None:
                self.files.arm(operation)

        # --- database faults ------------------------------------------------------------

        @rule(
            where=st.sampled_from(sorted(TARGETS)),
            error=st.sampled_from(sorted(ERRORS)),
            times=st.integers(1, 3),
            after=st.booleans(),
        )
        def store_fault(self, where: str, error: str, times: int, after: bool) -> None:
            self.store.fail_when(TARGETS[where], ERRORS[error](), times=times, after=after)

        # --- invariants -----------------------------------------------------------------

        @invariant()
        def limits_hold(self) -> None:
            counts = self.durable.buffer.counts()
            assert counts["in_flight"] == 0  # every flush ended its batch

        def _check_rows_never_regress(self) -> None:
            for kind in (SESSIONS, TASKS):
                for key, row in read_rows(db, kind).items():
                    stamp = row[ORDER_COLUMN]
                    previous = self.seen[kind.name].get(key)
                    if previous is not None:
                        old_stamp, old_row = previous
                        assert stamp >= old_stamp, f"{kind.name} {key} went back in time"
                        if stamp == old_stamp and kind is TASKS:
                            assert row == old_row, f"task {key} changed without a newer stamp"
                        if kind is SESSIONS:
                            for column in SESSIONS.never_decrease:
                                assert (row[column] or 0) >= (old_row[column] or 0)
                    self.seen[kind.name][key] = (stamp, row)

        def teardown(self) -> None:
            if not hasattr(self, "store"):
                return
            try:
                self._settle_and_check()
            finally:
                self.durable.close()
                self.store.close()

        def _settle_and_check(self) -> None:
            self.store.clear()
            self.files.armed.clear()
            self.now += ORPHAN_TIMEOUT + 1
            for _ in range(6):
                try:
                    self.flusher.flush_once(final=True)
                except FlushFailed:
                    continue
                counts = self.durable.buffer.counts()
                if not counts["sessions"] + counts["tasks"]:
                    break
            counts = self.durable.buffer.counts()
            assert counts["sessions"] + counts["tasks"] == 0, f"left in the buffer: {counts}"
            self._check_rows_never_regress()
            dead = read_dead_letters(db)
            for kind in (SESSIONS, TASKS):
                rows = read_rows(db, kind)
                for key, updates in self.acked[kind.name].items():
                    check_key(kind, key, updates, rows.get(key), dead.get((kind.name, key)))
            markers = {r["filename"] for r in read_rows(db, SESSIONS).values()}
            markers |= {r["target_text"] for r in read_rows(db, TASKS).values()}
            markers |= {r.get("filename") or r.get("target_text") for r in dead.values()}
            assert not markers & self.refused_markers, "a refused record reached the database"

    return Promise


def self_execute(db: Database, sql: str) -> None:
    existing = {
        row[0]
        for row in db.query(
            "SHOW TABLES"
            if db.driver == "mysql"
            else "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    if sql.split()[-1] in existing:
        db.execute(sql)


def read_rows(db: Database, kind: RecordType) -> dict[str, dict[str, Any]]:
    columns = ", ".join(kind.columns)
    rows = db.query(f"SELECT {columns} FROM {kind.table}")
    out = {}
    for values in rows:
        row = dict(zip(kind.columns, values, strict=True))
        for column in kind.json_columns:
            if isinstance(row[column], str):
                row[column] = orjson.loads(row[column])
        out[row[kind.key]] = row
    return out


def read_dead_letters(db: Database) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (record_type, key): orjson.loads(payload)
        for record_type, key, payload in db.query(
            "SELECT record_type, record_key, payload FROM persistence_dead_letters"
        )
    }


def check_key(
    kind: RecordType,
    key: str,
    updates: list[Record],
    row: dict[str, Any] | None,
    dead: dict[str, Any] | None,
) -> None:
    """The row holds the newest acknowledged update, or that update is a dead letter."""
    newest = max(updates, key=lambda r: r[ORDER_COLUMN])
    compared = [c for c in kind.columns if c not in kind.never_decrease]
    if row is not None and all(row[c] == newest[c] for c in compared):
        for column in kind.never_decrease:
            largest = max(u[column] for u in updates)
            if dead is None:
                assert row[column] == largest, f"{kind.name} {key}.{column}"
            else:  # a dead-lettered update's counters may not have reached the row
                assert newest[column] <= row[column] <= largest, f"{kind.name} {key}.{column}"
        return
    assert dead is not None, f"{kind.name} {key}: newest update neither written nor dead-lettered"
    assert dead[ORDER_COLUMN] == newest[ORDER_COLUMN], (
        f"{kind.name} {key}: the dead letter is not the newest update"
    )


def run_model(db: Database, tmp_path: Path, durability: str, connections: int) -> None:
    machine = model_machine(db, tmp_path, durability == "journal", connections)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25 if db.driver == "mysql" else 60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.parametrize("durability", ["memory", "journal"])
def test_every_acknowledged_record_lands_whatever_fails(
    db: Database, tmp_path: Path, durability: str
) -> None:
    run_model(db, tmp_path, durability, connections=1)


@pytest.mark.mysql
@pytest.mark.parametrize("db", ["mysql"], indirect=True)  # SQLite writes over one connection
@pytest.mark.parametrize("durability", ["memory", "journal"])
def test_every_acknowledged_record_lands_when_flushes_write_over_two_connections(
    db: Database, tmp_path: Path, durability: str
) -> None:
    run_model(db, tmp_path, durability, connections=2)
