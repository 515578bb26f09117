"""One process's service: buffer, store, flusher, health monitor and scheduler together.

Threading contract
------------------
Constructing a :class:`PersistenceService` starts no thread and opens no
connection. :meth:`start` and :meth:`stop` are called once each, by the
process that serves requests (gunicorn's ``post_worker_init`` and
``worker_exit`` hooks, or ``python wsgi.py``). Every other method may be
called from any request thread; each delegates to an object whose own
contract covers concurrency.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from persistence.buffer import Buffer, BufferFull
from persistence.config import Settings, describe
from persistence.errors import ApiError, ServiceUnavailable
from persistence.flusher import Flusher, FlushFailed, FlushResult, iso, utc_now
from persistence.health import HealthMonitor
from persistence.intake import validate_batch
from persistence.records import SESSIONS, TASKS, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.store import Store, StoreError
from schedules import FLUSH_JOB, build_scheduler, next_run_time, run_soon

log = logging.getLogger(__name__)

# How many ids a shutdown that loses records names in the log.
LOST_IDS_LOGGED = 10


class PersistenceService:
    """The service of one process; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = Buffer(settings.buffer.hard_limit)
        self.store = Store(settings.database)
        self.flusher = Flusher(self.buffer, self.store, settings.buffer)
        self.health = HealthMonitor(self.store, settings.health)
        self.schemas = {
            SESSIONS.name: build_session_schema(settings.validation.session_statuses),
            TASKS.name: build_task_schema(settings.validation.task_statuses),
        }
        self.scheduler: BackgroundScheduler | None = None
        self._refused: Counter[str] = Counter()
        self._refused_lock = threading.Lock()
        self._wake_pending = threading.Event()
        self._started = time.monotonic()

    def start(self) -> None:
        """Create the tables (when configured) and start the scheduler's threads."""
        log.info(
            "persistence service starting; database: %s; settings from %s",
            describe(self.settings),
            self.settings.source,
        )
        if self.settings.database.create_tables:
            try:
                self.store.create_schema()
            except StoreError as exc:
                # Keep serving: records are buffered and written once the database is back.
                log.error(
                    "could not create the tables at start (%s); the first flush will try again", exc
                )
                self.store.schema_pending = True
        buf = self.settings.buffer
        self.scheduler = build_scheduler(
            self.flusher.flush_if_due,
            buf.flush_interval,
            self.health.refresh,
            self.settings.health.check_interval,
        )
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler, write everything buffered, close the pool."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        try:
            result = self.flusher.flush_once(final=True)
            log.info(
                "shutdown flush wrote %d sessions and %d tasks",
                result.sessions_written,
                result.tasks_written,
            )
        except FlushFailed as exc:
            counts = self.buffer.counts()
            log.error(
                "shutdown flush failed (%s): %d sessions and %d tasks are LOST; first ids: %s",
                exc,
                counts["sessions"],
                counts["tasks"],
                self.buffer.sample_keys(LOST_IDS_LOGGED),
            )
        finally:
            self.store.close()

    def accept(self, kind: RecordType, body: Any) -> int:
        """Validate a batch body and buffer its records, all or none; return the count."""
        try:
            records = validate_batch(
                kind, body, self.schemas[kind.name], self.settings.buffer.max_batch_size
            )
            ready = self.buffer.add(kind, records)
        except ApiError:
            self._count_refused("invalid")
            raise
        except BufferFull as exc:
            self._count_refused("buffer_full")
            raise ServiceUnavailable(
                f"The buffer is full ({exc.held} records held, hard limit {exc.limit}); "
                "nothing of this batch was kept. Retry later.",
                retry_after=self._retry_after(),
            ) from None
        if ready >= self.settings.buffer.max_buffer_size:
            self._wake_flusher()
        return len(records)

    def flush(self) -> FlushResult:
        """Write everything buffered now (``POST /flush``), ignoring any backoff."""
        try:
            return self.flusher.flush_once()
        except FlushFailed as exc:
            counts = self.buffer.counts()
            raise ServiceUnavailable(
                f"Writing to the database failed: {exc}. The records stay buffered.",
                retry_after=self._retry_after(),
                status="error",
                sessions_buffered=counts["sessions"],
                tasks_buffered=counts["tasks"],
            ) from None

    def health_report(self) -> tuple[bool, dict[str, Any]]:
        healthy = self.health.database_healthy()
        counts = self.buffer.counts()
        report = {
            "status": "healthy" if healthy else "unhealthy",
            "database": "healthy" if healthy else "unhealthy",
            "database_driver": self.store.driver,
            "buffer": {
                "sessions_count": counts["sessions"],
                "tasks_count": counts["tasks"],
                "last_flush": iso(self.flusher.stats.last_flush_time),
            },
        }
        if not healthy:
            report["database_error"] = self.health.last_error
        return healthy, report

    def stats(self) -> dict[str, Any]:
        counts = self.buffer.counts()
        buffered = counts["sessions"] + counts["tasks"]
        capacity = self.settings.buffer.max_buffer_size
        flush = self.flusher.stats
        written = flush.sessions_written + flush.tasks_written
        received = self.buffer.received()
        with self._refused_lock:
            refused = dict(self._refused)
        return {
            "buffer": {
                "sessions_count": counts["sessions"],
                "tasks_count": counts["tasks"],
                "total_count": buffered,
                "capacity": capacity,
                "usage_percent": round(100 * buffered / capacity, 2),
                "in_flight": counts["in_flight"],
                "tasks_waiting_for_session": counts["waiting"],
                "hard_limit": self.settings.buffer.hard_limit,
            },
            "flush_info": {
                "last_flush_time": iso(flush.last_flush_time),
                "next_flush_time": iso(next_run_time(self.scheduler, FLUSH_JOB)),
                "flush_count_today": flush.flush_count_today,
                "average_flush_duration_ms": (
                    round(flush.total_duration_ms / flush.flush_count, 3)
                    if flush.flush_count
                    else 0.0
                ),
                "failed_flush_count": flush.failed_flush_count,
                "last_error": flush.last_error,
                "last_error_time": iso(flush.last_error_time),
                "retry_in_seconds": round(self.flusher.backoff_remaining(), 3),
            },
            "performance": {
                "total_sessions_written": flush.sessions_written,
                "total_tasks_written": flush.tasks_written,
                "total_flush_count": flush.flush_count,
                "average_batch_size": (
                    round(written / flush.flush_count, 2) if flush.flush_count else 0.0
                ),
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "sessions_received": received["sessions"],
                "tasks_received": received["tasks"],
            },
            "dead_letters": {
                "sessions": flush.dead_lettered[SESSIONS.name],
                "tasks": flush.dead_lettered[TASKS.name],
            },
            "refused_batches": {
                "invalid": refused.get("invalid", 0),
                "buffer_full": refused.get("buffer_full", 0),
            },
            "database": {"driver": self.store.driver},
            "timestamp": iso(utc_now()),
        }

    def _wake_flusher(self) -> None:
        """Ask for a flush on a scheduler thread; at most one such request is pending."""
        if self.scheduler is None or self._wake_pending.is_set():
            return
        self._wake_pending.set()
        run_soon(self.scheduler, self._size_triggered_flush, "size-triggered flush")

    def _size_triggered_flush(self) -> None:
        self._wake_pending.clear()
        self.flusher.flush_if_due()

    def _retry_after(self) -> int:
        """Seconds a client should wait: the backoff if any, else a few seconds."""
        wait = self.flusher.backoff_remaining() or min(self.settings.buffer.flush_interval, 5)
        return max(1, round(wait))

    def _count_refused(self, reason: str) -> None:
        with self._refused_lock:
            self._refused[reason] += 1
