"""One process's service: buffer, journal, store, flusher, health, scheduler, control channel.

Threading contract
------------------
Constructing a :class:`PersistenceService` starts no thread, opens no
connection and touches no file. :meth:`start` and :meth:`stop` are called
once each, by the process that serves requests (gunicorn's
``post_worker_init`` and ``worker_exit`` hooks, or ``python wsgi.py``).
Every other method may be called from any request or control thread; each
delegates to an object whose own contract covers concurrency, and the
refusal counters have a lock of their own.

Whole-service views: with several gunicorn workers, :meth:`flush`,
:meth:`stats` and :meth:`health_report` ask the other workers over the
control channel (:mod:`persistence.control`) and combine their answers.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from persistence import stats as stats_module
from persistence.buffer import Buffer, BufferFull
from persistence.config import Settings, describe
from persistence.control import ControlServer, ask_peers
from persistence.errors import ApiError, ServiceUnavailable
from persistence.fastpath import compile_loader
from persistence.flusher import Flusher, FlushFailed, iso, utc_now
from persistence.health import HealthMonitor
from persistence.intake import validate_batch
from persistence.journal import Journal, RecoveryReport
from persistence.records import SESSIONS, TASKS, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.store import Store, StoreError
from schedules import FLUSH_JOB, build_scheduler, next_run_time, run_soon

log = logging.getLogger(__name__)

# How many ids a shutdown that loses records names in the log.
LOST_IDS_LOGGED = 10
# How long a worker waits for its peers: a flush may take a while, a count may not.
PEER_FLUSH_TIMEOUT = 120.0
PEER_QUERY_TIMEOUT = 0.5
# Why records were refused, as counted in /stats "refused".
REFUSAL_REASONS = (
    "malformed",
    "unsupported_media_type",
    "too_large",
    "invalid",
    "buffer_full",
    "journal_error",
)


class PersistenceService:
    """The service of one process; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = Buffer(settings.buffer.hard_limit, settings.buffer.hard_limit_bytes)
        self.store = Store(settings.database)
        self.flusher = Flusher(self.buffer, self.store, settings.buffer)
        self.health = HealthMonitor(self.store, settings.health)
        self.schemas = {
            SESSIONS.name: build_session_schema(settings.validation.session_statuses),
            TASKS.name: build_task_schema(settings.validation.task_statuses),
        }
        self.loaders = {name: compile_loader(schema) for name, schema in self.schemas.items()}
        self.scheduler: BackgroundScheduler | None = None
        self.control: ControlServer | None = None
        self.recovery: RecoveryReport | None = None
        self._refused: Counter[str] = Counter()
        self._refused_records: Counter[str] = Counter()
        self._refused_lock = threading.Lock()
        self._wake_pending = threading.Event()
        self._started = time.monotonic()
        self._shutdown_begun = threading.Lock()
        self._shutdown_flush: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------

    def start(self, control_dir: Path | None = None) -> None:
        """Recover the journal, create the tables, start the scheduler and control threads.

        ``control_dir`` (given by gunicorn.conf.py) is where this worker's control
        socket goes, shared with the other workers of the same master.
        """
        log.info(
            "persistence service starting; database: %s; durability: %s; settings from %s",
            describe(self.settings),
            self.settings.buffer.durability,
            self.settings.source,
        )
        if self.settings.buffer.durability == "journal":
            self._open_journal()
        try:
            self.store.prepare()
        except StoreError as exc:
            # Keep serving: records are buffered and written once the database is back.
            log.error(
                "could not prepare the tables at start (%s); the first flush will try again", exc
            )
        # A flush is CPU work in Python (PyMySQL builds its statements): with Python's
        # default 5 ms GIL slices request threads wait behind it. Shorter slices keep intake
        # p99 during a flush near its idle value (docs/PERFORMANCE.md).
        sys.setswitchinterval(self.settings.service.gil_switch_interval)
        self.scheduler = build_scheduler(
            self.flusher.flush_if_due,
            self.settings.buffer.flush_interval,
            self.health.refresh,
            self.settings.health.check_interval,
        )
        self.scheduler.start()
        if control_dir is not None:
            self.control = ControlServer(control_dir, self._answer_peer)
            self.control.start()
        counts = self.buffer.counts()
        if counts["sessions"] + counts["tasks"]:
            self._wake_flusher()  # write what the journal brought back without waiting

    def begin_shutdown(self) -> None:
        """Start writing everything buffered now, on a thread of its own, and return.

        Called as soon as the process is told to stop, while it still finishes the
        requests in flight: the bulk of the buffer is written in parallel with them
        instead of after them. :meth:`stop` waits for this flush, then writes what those
        requests added. Idempotent and non-blocking (a lock taken without waiting, a
        thread started). It starts a thread, so a signal handler should not call it
        directly; gunicorn's worker calls it from its main loop right after the signal.
        """
        if not self._shutdown_begun.acquire(blocking=False):
            return
        log.info("stopping: writing the buffer now, while the requests in flight finish")
        # A failure is logged by the flusher and leaves the records buffered for stop().
        self._shutdown_flush = threading.Thread(
            target=self.worker_flush, name="shutdown-flush", daemon=True
        )
        self._shutdown_flush.start()

    def stop(self) -> None:
        """Stop the threads, write everything buffered, close the journal and the pool."""
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
            self.scheduler = None
        if self._shutdown_flush is not None:
            self._shutdown_flush.join()
        journal = self.buffer.journal
        try:
            # In memory mode a task still waiting for its session has no later chance:
            # it goes to the dead letters. The journal keeps it for the next start.
            result = self.flusher.flush_once(final=journal is None)
            log.info(
                "shutdown flush wrote %d sessions and %d tasks",
                result.sessions_written,
                result.tasks_written,
            )
        except FlushFailed as exc:
            log.error("shutdown flush failed: %s", exc)
        try:
            self._report_leftovers(journal is not None)
        finally:
            if journal is not None:
                try:
                    journal.close()
                except OSError as exc:
                    log.error("closing the journal failed: %s", exc)
            self.store.close()

    def _report_leftovers(self, journaled: bool) -> None:
        """Say what the shutdown flush could not write (e.g. the database is down)."""
        counts = self.buffer.counts()
        if not counts["sessions"] + counts["tasks"]:
            return
        if journaled:
            log.error(
                "%d sessions and %d tasks could not be written; they stay in the "
                "journal for the next start",
                counts["sessions"],
                counts["tasks"],
            )
        else:
            log.error(
                "%d sessions and %d tasks could not be written and are LOST; first ids: %s",
                counts["sessions"],
                counts["tasks"],
                self.buffer.sample_keys(LOST_IDS_LOGGED),
            )

    def _open_journal(self) -> None:
        journal = Journal(self.settings.buffer.journal_dir)
        journal.open()
        self.buffer.journal = journal
        report = RecoveryReport()
        for entry in journal.recover(report):
            self.buffer.replay(entry)
        self.buffer.snapshot_to_journal()
        journal.forget_adopted(report)
        self.recovery = report
        if report.directories:
            counts = self.buffer.counts()
            log.warning(
                "journal recovery: %d journals of stopped processes, %d frames, %d records "
                "(%d sessions and %d tasks after merging), %d torn and %d corrupt frames "
                "skipped",
                report.directories,
                report.frames,
                report.records,
                counts["sessions"],
                counts["tasks"],
                report.torn,
                report.corrupt,
            )

    # --- intake -------------------------------------------------------------------------

    def accept(self, kind: RecordType, body: Any) -> int:
        """Validate a batch body and buffer its records, all or none; return the count."""
        try:
            records = validate_batch(
                kind,
                body,
                self.schemas[kind.name],
                self.settings.buffer.max_batch_size,
                self.loaders[kind.name],
            )
        except ApiError as exc:
            self.count_refused("invalid" if exc.status == 422 else "malformed", body, kind)
            raise
        try:
            ready = self.buffer.add(kind, records)
        except BufferFull as exc:
            self.count_refused("buffer_full", body, kind)
            raise ServiceUnavailable(
                f"The buffer is full: {exc}; nothing of this batch was kept. Retry later.",
                retry_after=self._retry_after(),
            ) from None
        except OSError as exc:
            self.count_refused("journal_error", body, kind)
            log.error("journal write failed: %s", exc)
            raise ServiceUnavailable(
                f"The batch could not be written to the journal ({exc.strerror or exc}); "
                "it may be sent again safely.",
                retry_after=self._retry_after(),
            ) from None
        if ready >= self.settings.buffer.max_buffer_size:
            self._wake_flusher()
        return len(records)

    def count_refused(self, reason: str, body: Any = None, kind: RecordType | None = None) -> None:
        """Count a refused batch, and its records when the body could be read."""
        items = body.get(kind.plural) if kind and isinstance(body, dict) else None
        with self._refused_lock:
            self._refused[reason] += 1
            self._refused_records[reason] += len(items) if isinstance(items, list) else 0

    # --- whole-service views ------------------------------------------------------------

    def flush(self) -> dict[str, Any]:
        """Write what every worker holds, ignoring any backoff; 503 if any write failed."""
        started = time.perf_counter()
        results = self._flush_everywhere()
        workers = len(results)
        if workers > 1 and any(r.get("tasks_waiting") for r in results):
            # A task may wait in one worker for a session another worker has just written.
            results = [{**r, "tasks_waiting": 0} for r in results] + self._flush_everywhere()
        total = {
            key: sum(r.get(key, 0) for r in results)
            for key in ("sessions_written", "tasks_written", "dead_lettered", "tasks_waiting")
        }
        total["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        total["workers"] = workers
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            counts = self.stats()["buffer"]
            raise ServiceUnavailable(
                f"Writing to the database failed: {errors[0]}. The records stay buffered.",
                retry_after=self._retry_after(),
                status="error",
                sessions_buffered=counts["sessions_count"],
                tasks_buffered=counts["tasks_count"],
                **total,
            )
        return total

    def _flush_everywhere(self) -> list[dict[str, Any]]:
        return [self.worker_flush(), *ask_peers(self.control, "flush", PEER_FLUSH_TIMEOUT)]

    def health_report(self) -> tuple[bool, dict[str, Any]]:
        healthy = self.health.database_healthy()
        reports = [self.worker_buffer(), *ask_peers(self.control, "buffer", PEER_QUERY_TIMEOUT)]
        reports = [r for r in reports if "error" not in r]
        report: dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "database": "healthy" if healthy else "unhealthy",
            "database_driver": self.store.driver,
            "buffer": {
                "sessions_count": sum(r["sessions_count"] for r in reports),
                "tasks_count": sum(r["tasks_count"] for r in reports),
                "last_flush": max(
                    (r["last_flush"] for r in reports if r["last_flush"]), default=None
                ),
            },
            "workers": len(reports),
        }
        if not healthy:
            report["database_error"] = self.health.last_error
        return healthy, report

    def stats(self) -> dict[str, Any]:
        peers = ask_peers(self.control, "stats", PEER_QUERY_TIMEOUT * 4)
        answered = [p for p in peers if "error" not in p]
        combined = stats_module.combine([self.worker_stats(), *answered])
        combined["workers"]["unreachable"] = len(peers) - len(answered)
        return combined

    # --- this worker only ---------------------------------------------------------------

    def worker_flush(self) -> dict[str, Any]:
        try:
            result = self.flusher.flush_once()
        except FlushFailed as exc:
            return {"error": str(exc)}
        return {
            "sessions_written": result.sessions_written,
            "tasks_written": result.tasks_written,
            "dead_lettered": result.dead_lettered,
            "tasks_waiting": result.tasks_waiting,
        }

    def worker_buffer(self) -> dict[str, Any]:
        counts = self.buffer.counts()
        return {
            "sessions_count": counts["sessions"],
            "tasks_count": counts["tasks"],
            "last_flush": iso(self.flusher.stats.last_flush_time),
        }

    def worker_stats(self) -> dict[str, Any]:
        counts = self.buffer.counts()
        buffered = counts["sessions"] + counts["tasks"]
        buf = self.settings.buffer
        flush = self.flusher.stats
        received = self.buffer.received()
        with self._refused_lock:
            refused = {
                reason: {"batches": self._refused[reason], "records": self._refused_records[reason]}
                for reason in REFUSAL_REASONS
            }
        journal = self.buffer.journal
        return {
            "buffer": {
                "sessions_count": counts["sessions"],
                "tasks_count": counts["tasks"],
                "total_count": buffered,
                "capacity": buf.max_buffer_size,
                "usage_percent": round(100 * buffered / buf.max_buffer_size, 2),
                "in_flight": counts["in_flight"],
                "tasks_waiting_for_session": counts["waiting"],
                "bytes": counts["bytes"],
                "hard_limit": buf.hard_limit,
                "hard_limit_bytes": buf.hard_limit_bytes,
            },
            "flush_info": {
                "last_flush_time": iso(flush.last_flush_time),
                "next_flush_time": iso(next_run_time(self.scheduler, FLUSH_JOB)),
                "flush_count_today": flush.flushes_today(utc_now()),
                "average_flush_duration_ms": (
                    round(flush.total_duration_ms / flush.flush_count, 3)
                    if flush.flush_count
                    else 0.0
                ),
                "total_flush_duration_ms": round(flush.total_duration_ms, 3),
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
                    round((flush.sessions_written + flush.tasks_written) / flush.flush_count, 2)
                    if flush.flush_count
                    else 0.0
                ),
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "sessions_received": received["sessions"],
                "tasks_received": received["tasks"],
            },
            "dead_letters": {
                "sessions": flush.dead_lettered[SESSIONS.name],
                "tasks": flush.dead_lettered[TASKS.name],
                "by_reason": dict(flush.dead_letter_reasons),
            },
            "refused": refused,
            "journal": {
                "durability": buf.durability,
                "fsyncs": journal.fsyncs if journal else 0,
                "recovered": self.recovery.as_dict() if self.recovery else {},
            },
            "database": {"driver": self.store.driver},
            "worker": {"pid": os.getpid()},
            "timestamp": iso(utc_now()),
        }

    def _answer_peer(self, op: str) -> dict[str, Any]:
        answers = {
            "flush": self.worker_flush,
            "stats": self.worker_stats,
            "buffer": self.worker_buffer,
        }
        if op not in answers:
            return {"error": f"unknown operation {op!r}"}
        return answers[op]()

    # --- helpers ------------------------------------------------------------------------

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
