"""Prometheus metrics of the service, exposed by ``GET /metrics`` (docs/OPERATIONS.md).

Counters are incremented where the event happens (the receiver, the
flusher); gauges describe a worker's state and are set by
:meth:`ServiceMetrics.refresh` from a :class:`WorkerState`, which the
scraping worker asks of itself and of every other worker (over the control
channel) right before it collects, so a scrape sees the state of now.

Under gunicorn, prometheus_client runs in its multiprocess mode:
gunicorn.conf.py creates a private directory when the master starts and
sets ``PROMETHEUS_MULTIPROC_DIR`` to it before any worker imports the
application; each worker's values live in memory-mapped files there, and a
scrape of any worker reads them all. Counters of workers that stopped keep
counting (they were counted); the gauges of a stopped worker are dropped
when gunicorn's ``child_exit`` hook calls prometheus_client's
``mark_process_dead``. Each
gauge says how the workers' values combine (``livesum``, ``livemax``,
``livemin``). Without that variable (the Flask test client, ``python
wsgi.py``) each :class:`ServiceMetrics` keeps its values in memory, in a
registry of its own.

Threading contract: prometheus_client's metrics are thread-safe; the
journal counters seen last are guarded by ``_lock``. Any thread may call
any method.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from persistence.receiver import REFUSAL_REASONS
from persistence.records import RECORD_TYPES

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The content type of the exposition (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Flush outcomes known in advance (each series starts at 0): success, then the error
#: categories of persistence.store.errors, and "unexpected" for a fault of the service.
FLUSH_OUTCOMES = (
    "ok",
    "transient",
    "connection_lost",
    "conflict",
    "server_not_ready",
    "needs_operator",
    "unclassified",
    "unexpected",
)
DEAD_LETTER_REASONS = (
    "refused_by_database",
    "unclassified_error",
    "connection_lost_error",
    "session_not_found",
    "shutdown",
)
FLUSH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class WorkerState:
    """What one worker's gauges show, read in one go (:meth:`Overview.worker_state`)."""

    buffered: dict[str, int]  # by record type name
    in_flight: int
    tasks_waiting: int
    buffered_bytes: int
    oldest_stamp_us: int | None  # arrival stamp of the oldest record held
    hard_limit_usage: float  # the larger of records/hard_limit and bytes/hard_limit_bytes
    database_up: bool
    failures_in_a_row: int
    needs_operator: bool
    journal_healthy: bool
    journal_fsyncs: int
    journal_failures: int
    clock_skew: float | None = None  # seconds this host is ahead of the database (None: unknown)


def multiprocess_directory() -> Path | None:
    """The directory of prometheus_client's multiprocess mode, when this process uses it.

    It does only if ``PROMETHEUS_MULTIPROC_DIR`` was set before prometheus_client
    was first imported (it chooses its mode then); otherwise this process keeps
    its values in memory and a warning says that ``/metrics`` covers it alone.
    """
    path = os.environ.get(MULTIPROCESS_ENV)
    if not path:
        return None
    if values.ValueClass is values.MutexValue:
        log.warning(
            "%s is set but prometheus_client was imported before it was (was the application "
            "preloaded?): /metrics covers this worker only",
            MULTIPROCESS_ENV,
        )
        return None
    return Path(path)


class ServiceMetrics:
    """The metrics of one worker; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        #: Where multiprocess values live; None: in memory, in :attr:`registry`.
        self.directory = directory
        self.registry = CollectorRegistry()
        registry = None if directory is not None else self.registry
        self._lock = threading.Lock()
        self._journal_seen = (0, 0)

        self.records_received = Counter(
            "persistence_records_received",
            "Records accepted by the API, by type (before merging updates of one row).",
            ["type"],
            registry=registry,
        )
        self.requests_refused = Counter(
            "persistence_requests_refused",
            "Requests refused with an error, by reason (as /stats refused.*.batches).",
            ["reason"],
            registry=registry,
        )
        self.records_refused = Counter(
            "persistence_records_refused",
            "Records in refused requests, by reason (as /stats refused.*.records).",
            ["reason"],
            registry=registry,
        )
        self.rows_written = Counter(
            "persistence_rows_written",
            "Rows upserted into the database, by type (after merging).",
            ["type"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "persistence_records_dead_lettered",
            "Records moved to the dead-letter table, by type and reason.",
            ["type", "reason"],
            registry=registry,
        )
        self.flushes = Counter(
            "persistence_flushes",
            "Flushes that had records to write, by outcome: ok, or the error category.",
            ["outcome"],
            registry=registry,
        )
        self.flush_seconds = Histogram(
            "persistence_flush_duration_seconds",
            "Duration of successful flushes that had records to write.",
            buckets=FLUSH_SECONDS_BUCKETS,
            registry=registry,
        )
        self.journal_fsyncs = Counter(
            "persistence_journal_fsyncs",
            "Journal fsyncs (buffer.durability: journal).",
            registry=registry,
        )
        self.journal_failures = Counter(
            "persistence_journal_failures",
            "Journal write or fsync failures.",
            registry=registry,
        )
        self.conflicts = Counter(
            "persistence_write_conflicts",
            "Deadlocks and certification conflicts met by flush transactions (each retried).",
            registry=registry,
        )

        def gauge(name: str, text: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=mode)

        self.workers = gauge("persistence_workers", "Worker processes running.", "livesum")
        self.buffered = gauge(
            "persistence_buffered_records",
            "Records in the buffers, by type (not counting those a flush has taken out).",
            "livesum",
            ("type",),
        )
        self.in_flight = gauge(
            "persistence_in_flight_records",
            "Records a running flush has taken out of the buffers and not resolved yet.",
            "livesum",
        )
        self.tasks_waiting = gauge(
            "persistence_tasks_waiting_for_session",
            "Buffered tasks whose session is not in the database yet.",
            "livesum",
        )
        self.buffered_bytes = gauge(
            "persistence_buffered_bytes",
            "Bytes of the records held (buffered and in flight), as compact JSON.",
            "livesum",
        )
        self.oldest_age = gauge(
            "persistence_oldest_buffered_record_age_seconds",
            "Age of the oldest record held (buffered or in flight) since it arrived; 0 if none.",
            "livemax",
        )
        self.hard_limit_usage = gauge(
            "persistence_buffer_hard_limit_usage_ratio",
            "What a worker holds over its hard limit (records or bytes, the larger); 1 refuses.",
            "livemax",
        )
        self.database_up = gauge(
            "persistence_database_up",
            "1 when the database answers the health probe (0 if any worker's probe fails).",
            "livemin",
        )
        self.failures_in_a_row = gauge(
            "persistence_flush_failures_in_a_row",
            "Flushes that failed in a row, the most of any worker (0 after a success).",
            "livemax",
        )
        self.needs_operator = gauge(
            "persistence_needs_operator",
            "1 when a worker's last flush failed with an error that needs an operator.",
            "livemax",
        )
        self.journal_healthy = gauge(
            "persistence_journal_healthy",
            "0 when a worker's journal cannot be written (batches get 503); 1 otherwise.",
            "livemin",
        )
        # Every worker of an instance measures the same host clock against the same server.
        self.clock_skew = gauge(
            "persistence_clock_skew_seconds",
            "This host's clock minus the database's, seconds (positive: ahead); 0 until measured.",
            "livemostrecent",
        )
        self._start_series()

    def _start_series(self) -> None:
        """Create every known series at 0, so that rate() and alerts see it from the start."""
        for kind in RECORD_TYPES:
            self.records_received.labels(kind.name)
            self.rows_written.labels(kind.name)
            self.buffered.labels(kind.name).set(0)
            for reason in DEAD_LETTER_REASONS:
                self.dead_lettered.labels(kind.name, reason)
        for reason in REFUSAL_REASONS:
            self.requests_refused.labels(reason)
            self.records_refused.labels(reason)
        for outcome in FLUSH_OUTCOMES:
            self.flushes.labels(outcome)
        self.workers.set(1)
        self.journal_healthy.set(1)

    # --- events -------------------------------------------------------------------------

    def received(self, kind_name: str, records: int) -> None:
        self.records_received.labels(kind_name).inc(records)

    def refused(self, reason: str, records: int) -> None:
        self.requests_refused.labels(reason).inc()
        if records:
            self.records_refused.labels(reason).inc(records)

    def written(self, kind_name: str, rows: int) -> None:
        self.rows_written.labels(kind_name).inc(rows)

    def dead_letter(self, kind_name: str, reason: str) -> None:
        self.dead_lettered.labels(kind_name, reason).inc()

    def flush_succeeded(self, duration_ms: float) -> None:
        self.flushes.labels("ok").inc()
        self.flush_seconds.observe(duration_ms / 1000)

    def flush_failed(self, category: str) -> None:
        self.flushes.labels(category).inc()

    def conflict(self) -> None:
        self.conflicts.inc()

    # --- state --------------------------------------------------------------------------

    def refresh(self, state: WorkerState) -> None:
        """Set this worker's gauges (and the journal counters) from ``state``."""
        for name, count in state.buffered.items():
            self.buffered.labels(name).set(count)
        self.in_flight.set(state.in_flight)
        self.tasks_waiting.set(state.tasks_waiting)
        self.buffered_bytes.set(state.buffered_bytes)
        age = 0.0
        if state.oldest_stamp_us is not None:
            age = max(0.0, time.time() - state.oldest_stamp_us / 1_000_000)
        self.oldest_age.set(age)
        self.hard_limit_usage.set(state.hard_limit_usage)
        self.database_up.set(1 if state.database_up else 0)
        self.failures_in_a_row.set(state.failures_in_a_row)
        self.needs_operator.set(1 if state.needs_operator else 0)
        self.journal_healthy.set(1 if state.journal_healthy else 0)
        if state.clock_skew is not None:
            self.clock_skew.set(state.clock_skew)
        # The journal counts for itself; the counters follow it by the difference since the
        # last refresh (an older state read by a slower refresh adds nothing).
        with self._lock:
            fsyncs, failures = self._journal_seen
            if state.journal_fsyncs > fsyncs:
                self.journal_fsyncs.inc(state.journal_fsyncs - fsyncs)
            if state.journal_failures > failures:
                self.journal_failures.inc(state.journal_failures - failures)
            self._journal_seen = (
                max(fsyncs, state.journal_fsyncs),
                max(failures, state.journal_failures),
            )

    def exposition(self) -> bytes:
        """The Prometheus text of every worker (multiprocess mode) or of this one."""
        if self.directory is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry)
