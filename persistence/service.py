"""One process's service, assembled from its parts, each with one role.

- :class:`~persistence.durable.DurableBuffer`: the buffer and the journal policy;
- :class:`~persistence.receiver.Receiver`: validates and takes in batches;
- :class:`~persistence.flusher.Flusher`: owns a drained batch until it is resolved;
- :class:`~persistence.runtime.WorkerRuntime`: start, the scheduler, shutdown;
- :class:`~persistence.overview.Overview`: what flush, health and stats answer,
  for this worker and for all workers of the service.

Threading contract: constructing a :class:`PersistenceService` starts no
thread, opens no connection and touches no file (``create_app`` builds one).
:meth:`start` and :meth:`stop` are called once each by the serving process;
everything else may be called from any thread (each part states its own
contract).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persistence.auth import BearerTokens, log_policy
from persistence.buffer import Buffer
from persistence.config import Settings
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher
from persistence.health import HealthMonitor
from persistence.metrics import ServiceMetrics, multiprocess_directory
from persistence.overview import Overview
from persistence.receiver import Receiver
from persistence.records import RecordType
from persistence.runtime import WorkerRuntime
from persistence.store import Store


class PersistenceService:
    """The parts of one worker's service, and the calls the HTTP API and gunicorn make."""

    def __init__(self, settings: Settings) -> None:
        buf = settings.buffer
        self.settings = settings
        self.metrics = ServiceMetrics(multiprocess_directory())
        self.buffer = Buffer(buf.hard_limit, buf.hard_limit_bytes)
        self.durable = DurableBuffer(self.buffer)
        self.store = Store(settings.database)
        self.health = HealthMonitor(self.store, settings.health)
        self.flusher = Flusher(
            self.durable, self.store, buf, probe=self.health.refresh, metrics=self.metrics
        )
        self.runtime = WorkerRuntime(settings, self.durable, self.store, self.flusher, self.health)
        self.receiver = Receiver(
            settings,
            self.durable,
            self.runtime.wake_flusher,
            self._retry_after,
            self.store.max_record_bytes,
            self.metrics,
        )
        self.overview = Overview(
            settings,
            self.durable,
            self.store,
            self.flusher,
            self.health,
            self.receiver,
            self.runtime,
            self.metrics,
        )

    def start(self, control_dir: Path | None = None) -> None:
        """Start this worker's threads (after gunicorn forks); see :class:`WorkerRuntime`."""
        self.runtime.start(self.overview.answer_peer, control_dir)
        log_policy(BearerTokens(self.settings.service.auth_tokens))

    def begin_shutdown(self) -> None:
        """Start the final flush now, while requests in flight finish (idempotent)."""
        self.runtime.begin_shutdown()

    def stop(self) -> None:
        """Write everything buffered and release every resource."""
        self.runtime.stop()

    def accept(self, kind: RecordType, body: Any) -> int:
        return self.receiver.accept(kind, body)

    def count_refused(self, reason: str, body: Any = None, kind: RecordType | None = None) -> None:
        self.receiver.count_refused(reason, body, kind)

    def flush(self) -> dict[str, Any]:
        return self.overview.flush()

    def health_report(self) -> tuple[bool, dict[str, Any]]:
        return self.overview.health_report()

    def stats(self) -> dict[str, Any]:
        return self.overview.stats()

    def metrics_text(self) -> bytes:
        return self.overview.metrics_text()

    def _retry_after(self) -> int:
        return self.overview.retry_after()
