"""What ``POST /flush``, ``/health`` and ``/stats`` answer: this worker's part, and the
whole service's when gunicorn runs several workers.

Each worker answers for itself (``worker_*``); the worker that received the
HTTP request asks its peers over the control channel
(:mod:`persistence.control`) and combines their answers with its own. Every
answer names the instance (``service.instance_id``): with several instances
behind a load balancer, it says which one answered (docs/SCALING.md).

Threading contract: every method may be called from any request or control
thread; each reads objects whose own contracts cover concurrency.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from persistence import stats as stats_module
from persistence.config import Settings
from persistence.control import ask_peers
from persistence.durable import DurableBuffer
from persistence.errors import ServiceUnavailable
from persistence.flusher import Flusher, FlushFailed, iso, utc_now
from persistence.health import HealthMonitor
from persistence.metrics import ServiceMetrics, WorkerState
from persistence.receiver import Receiver
from persistence.records import SESSIONS, TASKS
from persistence.runtime import WorkerRuntime
from persistence.store import Store

# How long a worker waits for its peers: a flush may take a while, a count may not.
PEER_FLUSH_TIMEOUT = 120.0
PEER_QUERY_TIMEOUT = 0.5
_FLUSH_TOTALS = ("sessions_written", "tasks_written", "dead_lettered", "tasks_waiting")


class Overview:
    """The whole-service answers of one worker, and its own part of them."""

    def __init__(
        self,
        settings: Settings,
        durable: DurableBuffer,
        store: Store,
        flusher: Flusher,
        health: HealthMonitor,
        receiver: Receiver,
        runtime: WorkerRuntime,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.durable = durable
        self.store = store
        self.flusher = flusher
        self.health = health
        self.receiver = receiver
        self.runtime = runtime
        self._started = time.monotonic()

    # --- the whole service ----------------------------------------------------------------

    def flush(self) -> dict[str, Any]:
        """Write what every worker holds, ignoring any backoff; 503 if any write failed."""
        started = time.perf_counter()
        results = self._flush_everywhere()
        workers = len(results)
        if workers > 1 and any(r.get("tasks_waiting") for r in results):
            # A task may wait in one worker for a session another worker has just written.
            results = [{**r, "tasks_waiting": 0} for r in results] + self._flush_everywhere()
        total: dict[str, Any] = {key: sum(r.get(key, 0) for r in results) for key in _FLUSH_TOTALS}
        total["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        total["workers"] = workers
        total["instance_id"] = self.instance_id
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            counts = self.stats()["buffer"]
            raise ServiceUnavailable(
                f"Writing to the database failed: {errors[0]}. The records stay buffered.",
                retry_after=self.retry_after(),
                status="error",
                sessions_buffered=counts["sessions_count"],
                tasks_buffered=counts["tasks_count"],
                **total,
            )
        return total

    def _flush_everywhere(self) -> list[dict[str, Any]]:
        peers = ask_peers(self.runtime.control, "flush", PEER_FLUSH_TIMEOUT)
        return [self.worker_flush(), *peers]

    def health_report(self) -> tuple[bool, dict[str, Any]]:
        """Healthy when the database takes writes, no write needs an operator, and this
        host's clock is within ``service.max_clock_skew`` of the database's."""
        database_ok = self.health.database_healthy()
        peers = ask_peers(self.runtime.control, "health", PEER_QUERY_TIMEOUT)
        reports = [self.worker_health(), *peers]
        reports = [r for r in reports if "error" not in r]
        problems = [p for r in reports for p in r["problems"]]
        healthy = database_ok and not problems
        report: dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "database": "healthy" if database_ok else "unhealthy",
            "database_driver": self.store.driver,
            "buffer": {
                "sessions_count": sum(r["sessions_count"] for r in reports),
                "tasks_count": sum(r["tasks_count"] for r in reports),
                "last_flush": max(
                    (r["last_flush"] for r in reports if r["last_flush"]), default=None
                ),
            },
            "workers": len(reports),
            "instance_id": self.instance_id,
            "database_server": self.store.server,
        }
        tls = self.health.tls_status()
        if tls is not None:
            report["tls"] = tls
        state = self.health.state
        if state is not None and state.galera is not None:
            report["galera"] = state.galera.as_dict()
        clock = self.clock_report()
        if clock is not None:
            report["clock"] = clock
        if not database_ok:
            report["database_error"] = self.health.last_error
        if problems:
            report["problems"] = sorted(set(problems))
        return healthy, report

    @property
    def instance_id(self) -> str:
        return self.settings.service.effective_instance_id

    def clock_report(self) -> dict[str, Any] | None:
        """This host's clock against the database's (None until measured; SQLite: never)."""
        skew = self.health.clock_skew()
        if skew is None:
            return None
        return {
            "skew_seconds": round(skew.skew, 6),
            "uncertainty_seconds": round(skew.uncertainty, 6),
            "max_skew_seconds": self.settings.service.max_clock_skew,
            "measured_at": iso(datetime.fromtimestamp(skew.measured_at, UTC)),
        }

    def stats(self) -> dict[str, Any]:
        peers = ask_peers(self.runtime.control, "stats", PEER_QUERY_TIMEOUT * 4)
        answered = [p for p in peers if "error" not in p]
        combined = stats_module.combine([self.worker_stats(), *answered])
        combined["workers"]["unreachable"] = len(peers) - len(answered)
        # Each worker measures the same clock against the same database: the answering
        # worker's figure stands for the instance (adding them up would mean nothing).
        combined["clock"] = self.clock_report()
        return combined

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the service, every worker's gauges refreshed first."""
        ask_peers(self.runtime.control, "metrics", PEER_QUERY_TIMEOUT)
        self.worker_refresh_metrics()
        return self.metrics.exposition()

    def retry_after(self) -> int:
        """Seconds a client should wait: the backoff if any, else a few seconds."""
        wait = self.flusher.backoff_remaining() or min(self.settings.buffer.flush_interval, 5)
        return max(1, round(wait))

    # --- this worker ----------------------------------------------------------------------

    def answer_peer(self, op: str) -> dict[str, Any]:
        """A peer's question over the control channel."""
        answers = {
            "flush": self.worker_flush,
            "stats": self.worker_stats,
            "health": self.worker_health,
            "metrics": self.worker_refresh_metrics,
        }
        if op not in answers:
            return {"error": f"unknown operation {op!r}"}
        return answers[op]()

    def worker_flush(self) -> dict[str, Any]:
        try:
            result = self.flusher.flush_once()
            error = None
        except FlushFailed as exc:
            result, error = exc.result, str(exc)
        answer: dict[str, Any] = {key: getattr(result, key) for key in _FLUSH_TOTALS}
        if error is not None:
            answer["error"] = error
        return answer

    def worker_health(self) -> dict[str, Any]:
        counts = self.durable.buffer.counts()
        return {
            "sessions_count": counts["sessions"],
            "tasks_count": counts["tasks"],
            "last_flush": iso(self.flusher.stats.last_flush_time),
            "problems": self._problems(),
        }

    def _problems(self) -> list[str]:
        """What keeps this worker from doing its job although the database answers."""
        problems = []
        if self.flusher.operator_error:
            problems.append(f"writes need an operator: {self.flusher.operator_error}")
        journal = self.durable.journal
        if journal is not None and not journal.healthy:
            problems.append("the journal cannot be written; batches are refused with 503")
        skew = self.health.clock_skew()
        limit = self.settings.service.max_clock_skew
        # Only a skew certainly beyond the limit counts: the measurement's own
        # uncertainty (half a round trip) is given the benefit of the doubt.
        if skew is not None and abs(skew.skew) - skew.uncertainty > limit:
            problems.append(
                f"this host's clock is {abs(skew.skew):.3f} s "
                f"{'ahead of' if skew.skew > 0 else 'behind'} the database's "
                f"(service.max_clock_skew is {limit:g} s)"
            )
        return problems

    def worker_refresh_metrics(self) -> dict[str, Any]:
        """Set this worker's gauges to its state now (before a scrape reads them)."""
        self.metrics.refresh(self.worker_state())
        return {"refreshed": True}

    def worker_state(self) -> WorkerState:
        buffer = self.durable.buffer
        counts = buffer.counts()
        buf = self.settings.buffer
        held = counts["sessions"] + counts["tasks"] + counts["in_flight"]
        journal = self.durable.journal
        return WorkerState(
            buffered={SESSIONS.name: counts["sessions"], TASKS.name: counts["tasks"]},
            in_flight=counts["in_flight"],
            tasks_waiting=counts["waiting"],
            buffered_bytes=counts["bytes"],
            oldest_stamp_us=buffer.oldest_stamp(),
            hard_limit_usage=max(held / buf.hard_limit, counts["bytes"] / buf.hard_limit_bytes),
            database_up=self.health.database_healthy(),
            failures_in_a_row=self.flusher.failures_in_a_row,
            needs_operator=self.flusher.operator_error is not None,
            journal_healthy=journal.healthy if journal is not None else True,
            journal_fsyncs=journal.fsyncs if journal is not None else 0,
            journal_failures=journal.failures if journal is not None else 0,
            clock_skew=skew.skew if (skew := self.health.clock_skew()) is not None else None,
        )

    def worker_stats(self) -> dict[str, Any]:
        counts = self.durable.buffer.counts()
        buffered = counts["sessions"] + counts["tasks"]
        buf = self.settings.buffer
        flush = self.flusher.stats
        received = self.durable.buffer.received()
        journal = self.durable.journal
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
                "next_flush_time": iso(self.runtime.next_flush_time()),
                "flush_count_today": flush.flushes_today(utc_now()),
                "average_flush_duration_ms": (
                    round(flush.total_duration_ms / flush.flush_count, 3)
                    if flush.flush_count
                    else 0.0
                ),
                "total_flush_duration_ms": round(flush.total_duration_ms, 3),
                "failed_flush_count": flush.failed_flush_count,
                "failures_in_a_row": self.flusher.failures_in_a_row,
                "last_error": flush.last_error,
                "last_error_category": flush.last_error_category,
                "last_error_time": iso(flush.last_error_time),
                "needs_operator": self.flusher.operator_error,
                "retry_in_seconds": round(self.flusher.backoff_remaining(), 3),
                "transactions": flush.transactions,
                "conflicts": flush.conflicts,
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
            "refused": self.receiver.refusals(),
            "journal": {
                "durability": buf.durability,
                "fsyncs": journal.fsyncs if journal else 0,
                "failures": journal.failures if journal else 0,
                "recovered": self.durable.recovered.as_dict(),
            },
            "database": {
                "driver": self.store.driver,
                "server": self.store.server,
                "max_record_bytes": self.store.max_record_bytes(),
            },
            "instance_id": self.instance_id,
            "worker": {"pid": os.getpid()},
            "timestamp": iso(utc_now()),
        }
