"""Whether the database answers, from a cached probe so that /health stays fast.

Threading contract: :meth:`HealthMonitor.refresh` runs on a scheduler thread
every ``health.check_interval`` seconds; :meth:`HealthMonitor.database_healthy`
is called by request threads. A lock guards the cached result only, never the
probe itself. When the cache is older than three intervals (the scheduler
is not running, or a probe is stuck), the request probes inline; every probe
is bounded by ``health.probe_timeout``, so /health answers within about a
second even when the database accepts connections but never replies.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from persistence.config import HealthSettings
from persistence.store import Store, StoreError

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, store: Store, settings: HealthSettings) -> None:
        self.store = store
        self.settings = settings
        self._lock = threading.Lock()
        self._healthy: bool | None = None
        self._checked_at = 0.0
        self.last_error: str | None = None

    def refresh(self) -> bool:
        """Probe the database now and cache the answer."""
        try:
            # The timeout applies to connecting and to the query: half each keeps the sum
            # within probe_timeout.
            self.store.probe(self.settings.probe_timeout / 2)
        except StoreError as exc:
            healthy, error = False, str(exc)
        else:
            healthy, error = True, None
        with self._lock:
            if healthy != self._healthy:
                level = logging.INFO if healthy else logging.ERROR
                log.log(
                    level,
                    "database is %s%s",
                    "healthy" if healthy else "unhealthy",
                    f" ({error})" if error else "",
                )
            self._healthy, self._checked_at, self.last_error = healthy, time.monotonic(), error
        return healthy

    def database_healthy(self) -> bool:
        """The cached answer, or a fresh probe when the cache is stale."""
        with self._lock:
            fresh = time.monotonic() - self._checked_at < 3 * self.settings.check_interval
            cached = self._healthy
        if fresh and cached is not None:
            return cached
        return self.refresh()

    def tls_status(self) -> dict[str, Any] | None:
        """The ``tls`` object of /health: what the last probe's connection negotiated, as
        the server reported it (None for SQLite)."""
        tls = self.store.dialect.tls
        return None if tls is None else tls.status()
