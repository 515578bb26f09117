"""Moving records from the buffer to the database, and the statistics of doing so.

Threading contract
------------------
:meth:`Flusher.flush_once` may be called from any thread (the scheduler's
jobs, a ``POST /flush`` request, the shutdown path). Flushes never overlap:
``_flush_lock`` serialises them, and a caller waits for a running flush to
finish before starting its own, so a flush that returns has written
everything that was buffered when it was called (tasks still waiting for
their session aside). The buffer's lock is only taken inside
:class:`~persistence.durable.DurableBuffer` calls, never around I/O.

Inside one flush, the rows of each record type are written by up to
``database.flush_connections`` shards at once (:attr:`Store.write_connections`:
always one on SQLite), the calling thread writing the first and one short-lived
thread each of the others; the flush waits for every shard to end before it
goes on, so at most ``flush_connections - 1`` extra threads exist, and only
while a flush writes. Shards record what they resolve in the batch's
:class:`_Owned` and count it in :class:`FlushStats`, both under locks of their
own.

Ownership
---------
A flush drains the buffer into an :class:`_Owned` batch and owns every
record of it until the record is resolved: written (the commit returned),
dead-lettered (the dead letter's commit returned), or put back into the
buffer. Whatever ends the flush — success, a database error of any class,
an unexpected exception — every record not resolved goes back into the
buffer, where newer updates that arrived meanwhile win. The journal's
segments of the batch are deleted only when every record was resolved and
every record put back on the way was journaled again.

What one flush does
-------------------
1. Sessions are written first, then tasks whose session is in the database.
   Tasks whose session is not there yet go back to the buffer and wait; after
   ``buffer.orphan_task_timeout`` seconds they are dead-lettered. Every shard
   of the sessions has ended before the tasks are sorted and written.
2. The rows of a type are sorted by key and cut into contiguous key ranges of
   equal size, one per shard; each shard writes its range over a connection of
   its own, in key order, in transactions of at most
   ``database.max_rows_per_transaction`` rows (one ``executemany`` + commit
   each); the rows of each transaction are resolved as soon as its commit
   returns. A batch holds one record per key, so no two shards write the same
   row, and a key's updates keep their order across flushes (flushes never
   overlap). Key order makes concurrent writers lock rows in the same order
   and keeps their transactions small, so they conflict less; contiguous
   ranges put each shard's rows in a part of the primary key of its own, so
   a flush's shards seldom wait on each other's locks (a deadlock between
   them is retried like any conflict).
3. A transaction that loses a race with another writer (deadlock, or a Galera
   certification conflict: :class:`~persistence.store.errors.Conflict`) is
   retried at once, up to ``database.conflict_retries`` times; each conflict is
   counted and logged at WARNING. After that the flush ends like for any
   transient error.
4. The error decides the rest (:mod:`persistence.store.errors`):
   - a row error splits the rows in halves until the bad ones are isolated;
     the good rows are written, the bad ones dead-lettered;
   - a transient error ends the flush: what is unresolved goes back and the
     flusher backs off (exponential, full jitter); scheduled flushes wait it
     out, ``POST /flush`` and shutdown do not. When the error said the database
     could not be reached, the backoff ends as soon as a health probe that
     started after the failure finds a writable server
     (:meth:`Flusher.database_back`);
   - an error that needs an operator does the same, and is reported on
     ``/health`` and ``/stats`` until a flush succeeds;
   - an unclassified error or a lost connection is retried like a transient
     one; once flushes have failed ``buffer.isolate_after_failures`` times in
     a row with it while the database answers probes, the rows are split like
     for a row error, so one row the server cannot take never blocks the rest.
5. A shard that fails stops; the other shards finish their ranges (what they
   commit is resolved and counted), then the flush ends with the failure that
   says most (an interruption, then a fault of the service itself, then an
   error that needs an operator, else the first shard's); the others are
   logged. Only what no shard resolved goes back to the buffer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from itertools import pairwise
from operator import itemgetter
from typing import TYPE_CHECKING

from persistence.config import BufferSettings
from persistence.durable import DurableBuffer
from persistence.records import ORDER_COLUMN, RECORD_TYPES, SESSIONS, TASKS, Record, RecordType
from persistence.store import (
    Conflict,
    ConnectionLost,
    DeadLetter,
    OperatorError,
    RowError,
    ServerNotReady,
    Store,
    StoreError,
    UnclassifiedError,
)
from persistence.store.errors import SERVER_UNAVAILABLE

if TYPE_CHECKING:
    from persistence.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# Conflicting writers that retried in step would collide again: each retry of a conflict
# waits a random time up to this many seconds times its attempt number.
CONFLICT_JITTER = 0.01


@dataclass(frozen=True)
class FlushResult:
    sessions_written: int
    tasks_written: int
    dead_lettered: int
    tasks_waiting: int
    duration_ms: float


class FlushFailed(Exception):
    """A flush ended early; what it did not resolve is buffered again.

    ``result`` counts what the flush did resolve before it failed (rows
    committed, dead letters written).
    """

    def __init__(self, message: str, result: FlushResult) -> None:
        super().__init__(message)
        self.result = result


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


class FlushStats:
    """Counters of the flushes of this process, also counted in ``metrics`` when given.

    The shards of a flush count rows, transactions and conflicts from their own
    threads: every change takes ``_lock``. Readers (``/stats``) read single
    attributes without it.
    """

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self._lock = threading.Lock()
        self.metrics = metrics
        self.started_at = utc_now()
        self.last_flush_time: datetime | None = None
        self.last_error: str | None = None
        self.last_error_category: str | None = None
        self.last_error_time: datetime | None = None
        self.flush_count = 0
        self.failed_flush_count = 0
        self.total_duration_ms = 0.0
        self.sessions_written = 0
        self.tasks_written = 0
        self.dead_lettered = {SESSIONS.name: 0, TASKS.name: 0}
        self.dead_letter_reasons: Counter[str] = Counter()
        # Transactions committed, and deadlocks or certification conflicts met.
        self.transactions = 0
        self.conflicts = 0
        self._day: date = self.started_at.date()
        self._flushes_that_day = 0

    def add_written(self, kind: RecordType, count: int) -> None:
        """Count rows as soon as their commit returned, whatever the flush does next."""
        with self._lock:
            if kind is SESSIONS:
                self.sessions_written += count
            else:
                self.tasks_written += count
        if self.metrics is not None:
            self.metrics.written(kind.name, count)

    def add_transaction(self) -> None:
        with self._lock:
            self.transactions += 1

    def add_dead_letter(self, kind: RecordType, reason: str) -> None:
        with self._lock:
            self.dead_lettered[kind.name] += 1
            self.dead_letter_reasons[reason] += 1
        if self.metrics is not None:
            self.metrics.dead_letter(kind.name, reason)

    def add_conflict(self) -> None:
        with self._lock:
            self.conflicts += 1
        if self.metrics is not None:
            self.metrics.conflict()

    def record_success(self, duration_ms: float, at: datetime) -> None:
        with self._lock:
            if at.date() != self._day:
                self._day, self._flushes_that_day = at.date(), 0
            self.flush_count += 1
            self._flushes_that_day += 1
            self.total_duration_ms += duration_ms
            self.last_flush_time = at
        if self.metrics is not None:
            self.metrics.flush_succeeded(duration_ms)

    def flushes_today(self, now: datetime) -> int:
        """Successful flushes since midnight UTC of ``now``."""
        with self._lock:
            return self._flushes_that_day if now.date() == self._day else 0

    def record_failure(self, error: str, category: str, at: datetime) -> None:
        with self._lock:
            self.failed_flush_count += 1
            self.last_error, self.last_error_category, self.last_error_time = error, category, at
        if self.metrics is not None:
            self.metrics.flush_failed(category)


class _Owned:
    """The records of one drained batch that the flush has not resolved yet.

    The shards of a flush resolve disjoint keys from their own threads through
    :meth:`committed` and :meth:`refuse`, which take ``_lock``; everything else
    is read and changed by the flush's own thread while no shard runs.
    """

    def __init__(self, sessions: dict[str, Record], tasks: dict[str, Record]) -> None:
        self._lock = threading.Lock()
        self.records = {SESSIONS.name: sessions, TASKS.name: tasks}
        self.written = {SESSIONS.name: 0, TASKS.name: 0}
        self.written_sessions: set[str] = set()
        self.refused: list[DeadLetter] = []
        self.dead_lettered = 0
        self.waiting = 0
        # False once a record put back could not be journaled again.
        self.journaled = True

    def resolve(self, kind: RecordType, keys: list[str]) -> None:
        with self._lock:
            records = self.records[kind.name]
            for key in keys:
                records.pop(key, None)

    def committed(self, kind: RecordType, keys: list[str]) -> None:
        """The rows of ``keys`` are in the database: their commit returned."""
        with self._lock:
            records = self.records[kind.name]
            for key in keys:
                records.pop(key, None)
            self.written[kind.name] += len(keys)
            if kind is SESSIONS:
                self.written_sessions.update(keys)

    def refuse(self, letter: DeadLetter) -> None:
        """The database refused this record for good: dead-letter it after the shards end."""
        with self._lock:
            self.refused.append(letter)

    def unresolved(self) -> int:
        return sum(len(records) for records in self.records.values())

    def result(self, started: float) -> FlushResult:
        return FlushResult(
            self.written[SESSIONS.name],
            self.written[TASKS.name],
            self.dead_lettered,
            self.waiting,
            _ms_since(started),
        )


class Flusher:
    """Drains the buffer into the store; see the module docstring for the contract."""

    def __init__(
        self,
        durable: DurableBuffer,
        store: Store,
        settings: BufferSettings,
        probe: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """``wall_clock`` (seconds since the epoch) measures how long tasks waited for
        their session; by default the arrival clock's, on which their stamps were made."""
        self.durable = durable
        self.store = store
        self.settings = settings
        self.stats = FlushStats(metrics)
        self._probe = probe
        self._clock = clock
        self._wall_clock = wall_clock or (lambda: durable.clock.now_us() / 1e6)
        self._flush_lock = threading.Lock()
        self._failures_in_a_row = 0
        self._retry_at = 0.0
        # When the last failure said the database could not be reached (clock()), else None.
        self._unreachable_since: float | None = None
        # The error of the last failed flush when it needs an operator; None once one succeeds.
        self.operator_error: str | None = None

    @property
    def failures_in_a_row(self) -> int:
        return self._failures_in_a_row

    def backoff_remaining(self) -> float:
        """Seconds before scheduled flushes try the database again (0 when not backing off)."""
        return max(0.0, self._retry_at - self._clock())

    def database_back(self, probe_started: float) -> bool:
        """A health probe that started at ``probe_started`` (on ``clock``) found a writable
        server: end the backoff if the last flush failed because the database could not
        be reached before that probe began. Whether it ended one (then flush soon).

        Called from the probing thread; reads and writes two floats the flusher only
        replaces whole, so no lock is needed.
        """
        since = self._unreachable_since
        if since is None or probe_started < since or self._retry_at <= self._clock():
            return False
        self._retry_at, self._unreachable_since = 0.0, None
        log.info("the database is back; flushes resume without waiting for the backoff")
        return True

    def flush_if_due(self) -> FlushResult | None:
        """The scheduled flush: skipped while backing off after a failure."""
        if self.backoff_remaining() > 0:
            log.debug("flush skipped: backing off %.1f s more", self.backoff_remaining())
            return None
        try:
            return self.flush_once()
        except FlushFailed:
            return None  # already logged; the records are buffered again

    def flush_once(self, final: bool = False) -> FlushResult:
        """Write everything buffered now. Raises :class:`FlushFailed` if the flush ends early.

        ``final`` (at shutdown) dead-letters tasks whose session is not in the database
        instead of keeping them: nothing would be left to write them later.
        """
        with self._flush_lock:
            started = time.perf_counter()
            batch = self.durable.drain()
            owned = _Owned(batch.of(SESSIONS), batch.of(TASKS))
            resolved = False
            try:
                if len(batch):
                    self._write(owned, final)
                resolved = owned.journaled and not owned.unresolved()
            except Exception as exc:
                self._put_back_unresolved(owned)
                message = self._on_failure(exc)
                raise FlushFailed(message, owned.result(started)) from exc
            except BaseException:
                self._put_back_unresolved(owned)
                raise
            finally:
                self.durable.finish(batch, resolved)
            result = owned.result(started)
            if len(batch):
                self._failures_in_a_row, self._retry_at, self.operator_error = 0, 0.0, None
                self._unreachable_since = None
                self.stats.record_success(result.duration_ms, utc_now())
                log.info(
                    "flush wrote %d sessions, %d tasks in %.0f ms (%d waiting for their "
                    "session, %d dead-lettered)",
                    result.sessions_written,
                    result.tasks_written,
                    result.duration_ms,
                    result.tasks_waiting,
                    result.dead_lettered,
                )
            return result

    # --- one flush --------------------------------------------------------------------------

    def _write(self, owned: _Owned, final: bool) -> None:
        isolate = self._isolating()
        self._write_rows(SESSIONS, list(owned.records[SESSIONS.name].values()), owned, isolate)
        ready, waiting, expired = self._sort_tasks(owned, final)
        self._write_rows(TASKS, ready, owned, isolate)
        self._dead_letter(owned, owned.refused + expired)
        if waiting:
            owned.journaled &= self.durable.put_back(TASKS, waiting, waiting=True)
            owned.resolve(TASKS, list(waiting))
            owned.waiting = len(waiting)

    def _sort_tasks(
        self, owned: _Owned, final: bool
    ) -> tuple[list[Record], dict[str, Record], list[DeadLetter]]:
        """Split tasks into ready (session in the database), still waiting, and expired.

        A task's wait is counted from its arrival stamp, a wall-clock time, so it
        survives restarts in journal mode.
        """
        tasks = owned.records[TASKS.name]
        timeout = self.settings.orphan_task_timeout
        unknown = {t["session_id"] for t in tasks.values()} - owned.written_sessions
        known = owned.written_sessions | self.store.existing_sessions(unknown)
        ready: list[Record] = []
        waiting: dict[str, Record] = {}
        expired: list[DeadLetter] = []
        now_us = self._wall_clock() * 1_000_000
        for key, task in tasks.items():
            sid = task["session_id"]
            if sid in known:
                ready.append(task)
            elif final:
                reason = f"the service stopped while the task waited for session {sid}"
                expired.append(DeadLetter(TASKS, task, None, reason, "shutdown"))
            elif now_us - task[ORDER_COLUMN] >= timeout * 1_000_000:
                reason = f"session {sid} was not found in the database within {timeout:g} s"
                expired.append(DeadLetter(TASKS, task, None, reason, "session_not_found"))
            else:
                waiting[key] = task
        return ready, waiting, expired

    def _write_rows(
        self, kind: RecordType, rows: list[Record], owned: _Owned, isolate: bool
    ) -> None:
        """Upsert ``rows`` sorted by key, one contiguous key range per write connection,
        the ranges at the same time; return when every range has ended."""
        rows = sorted(rows, key=itemgetter(kind.key))
        shards = min(self.store.write_connections, len(rows))
        if shards <= 1:
            self._write_shard(kind, rows, owned, isolate)
            return
        bounds = [len(rows) * index // shards for index in range(shards + 1)]
        _run_together(
            [
                partial(self._write_shard, kind, rows[start:end], owned, isolate)
                for start, end in pairwise(bounds)
            ]
        )

    def _write_shard(
        self, kind: RecordType, rows: list[Record], owned: _Owned, isolate: bool
    ) -> None:
        """Upsert ``rows`` (sorted by key) in order, in transactions of at most
        ``database.max_rows_per_transaction`` rows, each resolved when it commits."""
        size = self.store.settings.max_rows_per_transaction
        for start in range(0, len(rows), size):
            self._write_chunk(kind, rows[start : start + size], owned, isolate)

    def _write_chunk(
        self, kind: RecordType, rows: list[Record], owned: _Owned, isolate: bool
    ) -> None:
        """Upsert ``rows`` in one transaction; split them to isolate rows the database refuses.

        Rows are resolved as soon as their commit returns. Row errors are always
        isolated; unclassified errors and lost connections only when ``isolate``
        (they have failed flushes often enough) and the database still answers a
        probe once a single row is left. Any other error propagates.
        """
        if not rows:
            return
        try:
            self._upsert(kind, rows)
        except RowError as exc:
            if len(rows) == 1:
                self._refuse(owned, kind, rows[0], exc, "refused_by_database")
                return
        except (UnclassifiedError, ConnectionLost) as exc:
            if not isolate:
                raise
            if len(rows) == 1:
                if not self._probe():
                    raise  # the database itself is in trouble, not this row
                self._refuse(owned, kind, rows[0], exc, f"{exc.category}_error")
                return
        else:
            owned.committed(kind, [row[kind.key] for row in rows])
            self.stats.add_written(kind, len(rows))
            return
        middle = len(rows) // 2
        self._write_chunk(kind, rows[:middle], owned, isolate)
        self._write_chunk(kind, rows[middle:], owned, isolate)

    def _upsert(self, kind: RecordType, rows: list[Record]) -> None:
        """One transaction; a conflict is retried at once ``database.conflict_retries`` times."""
        retries = self.store.settings.conflict_retries
        for attempt in range(retries + 1):
            try:
                self.store.upsert(kind, rows)
            except Conflict as exc:
                self.stats.add_conflict()
                if attempt == retries:
                    raise
                log.warning(
                    "conflict writing %d %s (%s); retrying at once (retry %d of %d)",
                    len(rows),
                    kind.plural,
                    exc,
                    attempt + 1,
                    retries,
                )
                time.sleep(random.uniform(0, CONFLICT_JITTER * (attempt + 1)))  # noqa: S311
            else:
                self.stats.add_transaction()
                return

    def _refuse(
        self, owned: _Owned, kind: RecordType, row: Record, exc: StoreError, reason: str
    ) -> None:
        log.warning(
            "%s %s refused by the database (%s): %s", kind.name, row[kind.key], exc.category, exc
        )
        owned.refuse(DeadLetter(kind, row, exc.code, str(exc), reason))

    def _dead_letter(self, owned: _Owned, letters: list[DeadLetter]) -> None:
        """Write ``letters``; if that fails, put their records back to try again later."""
        if not letters:
            return
        try:
            self.store.add_dead_letters(letters)
        except StoreError as exc:
            log.error(
                "could not write %d dead letters (%s); keeping them buffered", len(letters), exc
            )
            for kind in RECORD_TYPES:
                records = {
                    letter.record[kind.key]: letter.record
                    for letter in letters
                    if letter.kind is kind
                }
                owned.journaled &= self.durable.put_back(kind, records)
                owned.resolve(kind, list(records))
            return
        for letter in letters:
            owned.resolve(letter.kind, [letter.record[letter.kind.key]])
            self.stats.add_dead_letter(letter.kind, letter.reason)
        owned.dead_lettered += len(letters)

    # --- failures ---------------------------------------------------------------------------

    def _put_back_unresolved(self, owned: _Owned) -> None:
        """Return every record the flush did not resolve (memory only: the batch's journal
        segments are kept, and they hold these records)."""
        for kind in RECORD_TYPES:
            self.durable.put_back(kind, owned.records[kind.name], journal=False)

    def _isolating(self) -> bool:
        """Whether this flush splits batches on unclassified errors and lost connections."""
        return self._failures_in_a_row >= self.settings.isolate_after_failures and self._probe()

    def _on_failure(self, exc: Exception) -> str:
        """Back off, record and log a failed flush; return its message."""
        if isinstance(exc, StoreError):
            message, category = str(exc), exc.category
        else:
            # Not a database error: a fault of the service itself. Keep the data, say so.
            log.exception("flush failed unexpectedly")
            message, category = f"{type(exc).__name__}: {exc}", "unexpected"
        self.operator_error = message if isinstance(exc, OperatorError) else None
        unreachable = isinstance(exc, ServerNotReady) or (
            isinstance(exc, StoreError) and exc.code in SERVER_UNAVAILABLE
        )
        self._unreachable_since = self._clock() if unreachable else None
        self._failures_in_a_row += 1
        cap = min(
            self.settings.retry_backoff_max,
            self.settings.retry_backoff_initial * 2 ** (self._failures_in_a_row - 1),
        )
        delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
        self._retry_at = self._clock() + delay
        self.stats.record_failure(message, category, utc_now())
        counts = self.durable.buffer.counts()
        # Losing races to other writers is expected when several instances write the
        # same rows: it is retried like the rest, and not an error of this service.
        log.log(
            logging.WARNING if isinstance(exc, Conflict) else logging.ERROR,
            "flush failed (%s: %s); %d sessions and %d tasks stay buffered; next try in %.1f s",
            category,
            message,
            counts["sessions"],
            counts["tasks"],
            delay,
        )
        return message


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _run_together(jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` at the same time, the first on this thread and each other one on a
    thread of its own, and return when every one has ended.

    Whatever happens (a job failing, this thread interrupted), no job is still
    running when this returns or raises, so the caller may hand back what the
    jobs did not resolve. Raises the failure that says most
    (:func:`_most_telling`).
    """
    failures: list[BaseException | None] = [None] * len(jobs)

    def run(index: int) -> None:
        try:
            jobs[index]()
        except BaseException as exc:  # noqa: BLE001 - raised on the flush's thread below
            failures[index] = exc

    started: list[threading.Thread] = []
    try:
        for index in range(1, len(jobs)):
            helper = threading.Thread(
                target=run, args=(index,), name=f"flush-shard-{index}", daemon=True
            )
            helper.start()
            started.append(helper)
        run(0)
    finally:
        for helper in started:
            helper.join()
    raised = [exc for exc in failures if exc is not None]
    if raised:
        raise _most_telling(raised)


def _most_telling(failures: list[BaseException]) -> BaseException:
    """The failure a flush ends with when several shards failed; the others are logged.

    In this order: an interruption (not an :class:`Exception`), a fault of the
    service itself (not a :class:`StoreError`: kept for its traceback), an
    error that needs an operator (reported on ``/health``), else the first
    shard's.
    """

    def rank(exc: BaseException) -> int:
        if not isinstance(exc, Exception):
            return 0
        if not isinstance(exc, StoreError):
            return 1
        return 2 if isinstance(exc, OperatorError) else 3

    chosen = min(failures, key=rank)
    for other in failures:
        if other is chosen:
            continue
        if isinstance(other, StoreError):
            log.warning("another shard of the flush failed too (%s): %s", other.category, other)
        else:
            log.error("another shard of the flush failed too", exc_info=other)
    return chosen
