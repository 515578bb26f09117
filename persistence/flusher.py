"""Moving records from the buffer to the database, and the statistics of doing so.

Threading contract
------------------
:meth:`Flusher.flush_once` may be called from any thread (the scheduler's
jobs, a ``POST /flush`` request, the worker-exit hook). Flushes never
overlap: ``_flush_lock`` serialises them, and a caller waits for a running
flush to finish before starting its own, so a flush that returns has written
everything that was buffered when it was called (tasks still waiting for
their session aside). The buffer's lock is only
taken inside :class:`~persistence.buffer.Buffer` calls, never around I/O.

What one flush does
-------------------
1. ``Buffer.drain`` takes everything out (it stays counted as in flight).
2. Sessions are written first: one ``executemany`` + commit.
3. Tasks whose session is now in the database are written: one
   ``executemany`` + commit. Tasks whose session is not there yet go back
   to the buffer and wait; after ``buffer.orphan_task_timeout`` seconds
   they are dead-lettered.
4. A transient failure (connection, timeout, lock) puts the unwritten
   records back (newer updates that arrived meanwhile win) and starts an
   exponential backoff with full jitter; scheduled flushes wait it out,
   ``POST /flush`` and shutdown do not.
5. A row error (a value the database refuses) splits the batch in halves
   until the bad rows are isolated; the good rows are written and the bad
   ones go to ``persistence_dead_letters`` with the error.
6. ``Buffer.finish`` ends the flush: the batch stops counting against the
   hard limits and, in journal mode, the journal segments it came from go.
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

from persistence.buffer import Batch, Buffer
from persistence.config import BufferSettings
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, Record, RecordType
from persistence.store import DeadLetter, Store, StoreError

log = logging.getLogger(__name__)


class FlushFailed(Exception):
    """The database could not be written; the records are buffered again."""


@dataclass(frozen=True)
class FlushResult:
    sessions_written: int
    tasks_written: int
    dead_lettered: int
    tasks_waiting: int
    duration_ms: float


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds")


class FlushStats:
    """Counters of the flushes of this process (guarded by the flusher's lock)."""

    def __init__(self) -> None:
        self.started_at = utc_now()
        self.last_flush_time: datetime | None = None
        self.last_error: str | None = None
        self.last_error_time: datetime | None = None
        self.flush_count = 0
        self.failed_flush_count = 0
        self.total_duration_ms = 0.0
        self.sessions_written = 0
        self.tasks_written = 0
        self.dead_lettered = {SESSIONS.name: 0, TASKS.name: 0}
        self.dead_letter_reasons: Counter[str] = Counter()
        self._day: date = self.started_at.date()
        self._flushes_that_day = 0

    def record_success(self, result: FlushResult, at: datetime) -> None:
        if at.date() != self._day:
            self._day, self._flushes_that_day = at.date(), 0
        self.flush_count += 1
        self._flushes_that_day += 1
        self.total_duration_ms += result.duration_ms
        self.sessions_written += result.sessions_written
        self.tasks_written += result.tasks_written
        self.last_flush_time = at

    def flushes_today(self, now: datetime) -> int:
        """Successful flushes since midnight UTC of ``now``."""
        return self._flushes_that_day if now.date() == self._day else 0

    def record_failure(self, error: str, at: datetime) -> None:
        self.failed_flush_count += 1
        self.last_error, self.last_error_time = error, at


class Flusher:
    """Drains the buffer into the store; see the module docstring for the contract."""

    def __init__(
        self,
        buffer: Buffer,
        store: Store,
        settings: BufferSettings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.buffer = buffer
        self.store = store
        self.settings = settings
        self.stats = FlushStats()
        self._clock = clock
        self._wall_clock = wall_clock
        self._flush_lock = threading.Lock()
        self._failures_in_a_row = 0
        self._retry_at = 0.0

    def backoff_remaining(self) -> float:
        """Seconds before scheduled flushes try the database again (0 when not backing off)."""
        return max(0.0, self._retry_at - self._clock())

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
        """Write everything buffered now. Raises :class:`FlushFailed` if the database fails.

        ``final`` (at shutdown) dead-letters tasks whose session is not in the database
        instead of keeping them: nothing would be left to write them later.
        """
        with self._flush_lock:
            started = time.perf_counter()
            try:
                batch = self.buffer.drain()
            except OSError as exc:  # the journal could not start a new segment
                self.stats.record_failure(f"journal: {exc}", utc_now())
                raise FlushFailed(f"the journal could not be rotated: {exc}") from exc
            try:
                if not len(batch):
                    return FlushResult(0, 0, 0, 0, _ms_since(started))
                result = self._write(batch, started, final)
            except StoreError as exc:
                self._on_failure(exc)
                raise FlushFailed(str(exc)) from exc
            finally:
                self.buffer.finish(batch)
            self._failures_in_a_row, self._retry_at = 0, 0.0
            self.stats.record_success(result, utc_now())
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

    def _write(self, batch: Batch, started: float, final: bool) -> FlushResult:
        sessions, tasks = batch.of(SESSIONS), batch.of(TASKS)
        refused_sessions: list[DeadLetter] = []
        try:
            sessions_written = self._write_rows(SESSIONS, list(sessions.values()), refused_sessions)
            written_ids = set(sessions) - {d.record[SESSIONS.key] for d in refused_sessions}
            ready, waiting, expired = self._sort_tasks(tasks, written_ids, final)
        except StoreError:
            self.buffer.restore(SESSIONS, sessions)
            self.buffer.restore(TASKS, tasks)
            raise
        self._dead_letter(refused_sessions)

        refused_tasks: list[DeadLetter] = []
        try:
            tasks_written = self._write_rows(TASKS, ready, refused_tasks)
        except StoreError:
            self.buffer.restore(TASKS, {task[TASKS.key]: task for task in ready})
            self.buffer.restore(TASKS, waiting, waiting=True)
            self._dead_letter(expired)
            raise
        self.buffer.restore(TASKS, waiting, waiting=True)
        self._dead_letter(expired + refused_tasks)
        dead = len(refused_sessions) + len(expired) + len(refused_tasks)
        return FlushResult(sessions_written, tasks_written, dead, len(waiting), _ms_since(started))

    def _sort_tasks(
        self, tasks: dict[str, Record], sessions_written: set[str], final: bool
    ) -> tuple[list[Record], dict[str, Record], list[DeadLetter]]:
        """Split tasks into ready (session in the database), still waiting, and expired.

        A task's wait is counted from its arrival stamp, a wall-clock time, so it
        survives restarts in journal mode.
        """
        timeout = self.settings.orphan_task_timeout
        unknown = {t["session_id"] for t in tasks.values()} - sessions_written
        known = sessions_written | self.store.existing_sessions(unknown)
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

    def _write_rows(self, kind: RecordType, rows: list[Record], dead: list[DeadLetter]) -> int:
        """Upsert ``rows``; on a row error, bisect to isolate the bad rows into ``dead``.

        Returns how many rows were written. A transient error propagates: upserts are
        idempotent, so the caller may put every row back and write them again later.
        """
        if not rows:
            return 0
        try:
            self.store.upsert(kind, rows)
            return len(rows)
        except StoreError as exc:
            if not exc.row_error:
                raise
            if len(rows) == 1:
                log.warning("%s %s refused by the database: %s", kind.name, rows[0][kind.key], exc)
                dead.append(DeadLetter(kind, rows[0], exc.code, str(exc)))
                return 0
        middle = len(rows) // 2
        return self._write_rows(kind, rows[:middle], dead) + self._write_rows(
            kind, rows[middle:], dead
        )

    def _dead_letter(self, letters: list[DeadLetter]) -> None:
        """Write ``letters``; if that fails, buffer them again to retry."""
        if not letters:
            return
        try:
            self.store.add_dead_letters(letters)
        except StoreError as exc:
            log.error(
                "could not write %d dead letters (%s); keeping them buffered", len(letters), exc
            )
            for letter in letters:
                self.buffer.restore(letter.kind, {letter.record[letter.kind.key]: letter.record})
            return
        for letter in letters:
            self.stats.dead_lettered[letter.kind.name] += 1
            self.stats.dead_letter_reasons[letter.reason] += 1

    def _on_failure(self, exc: StoreError) -> None:
        self._failures_in_a_row += 1
        cap = min(
            self.settings.retry_backoff_max,
            self.settings.retry_backoff_initial * 2 ** (self._failures_in_a_row - 1),
        )
        delay = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
        self._retry_at = self._clock() + delay
        self.stats.record_failure(str(exc), utc_now())
        counts = self.buffer.counts()
        log.error(
            "flush failed (%s); %d sessions and %d tasks stay buffered; next try in %.1f s",
            exc,
            counts["sessions"],
            counts["tasks"],
            delay,
        )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
