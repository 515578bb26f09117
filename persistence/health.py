"""Whether the database takes writes, from a cached probe so that /health stays fast,
and how far this host's clock is from the database's.

Threading contract: :meth:`HealthMonitor.refresh` runs on a scheduler thread
every ``health.check_interval`` seconds; :meth:`HealthMonitor.database_healthy`
and :meth:`HealthMonitor.clock_skew` are called by request threads. A lock
guards the cached results only, never the probe itself. When the cache is
older than three intervals (the scheduler is not running, or a probe is
stuck), the request probes inline, the server in use only; every step of a
probe is bounded by ``health.probe_timeout``, so /health answers within about
a second even when the database accepts connections but never replies.

Listeners added with :meth:`HealthMonitor.add_listener` are called after
every probe that found a writable server, on the probing thread, outside the
lock: they must be quick and must not raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from persistence.config import HealthSettings
from persistence.store import ServerState, Store, StoreError
from persistence.store.probe import ClockSample

log = logging.getLogger(__name__)

# How many clock samples the skew estimate chooses from (the one with the shortest
# round trip wins, as NTP's clock filter does).
CLOCK_SAMPLES = 8

ProbeListener = Callable[[ServerState, float], None]


@dataclass(frozen=True)
class SkewEstimate:
    """This host's clock minus the database's, in seconds, within ``± uncertainty``."""

    skew: float
    uncertainty: float
    measured_at: float  # wall-clock time of the sample (seconds since the epoch)


class ClockSkewFilter:
    """The best recent estimate of the skew: the sample with the shortest round trip.

    A sample whose interval (``skew ± uncertainty``) does not overlap the current
    best one's means a clock stepped (NTP, an operator, a VM resumed): the older
    samples are then forgotten. Not thread-safe: :class:`HealthMonitor` guards it.
    """

    def __init__(self, size: int = CLOCK_SAMPLES) -> None:
        self._samples: deque[SkewEstimate] = deque(maxlen=size)

    def add(self, sample: ClockSample, at: float) -> SkewEstimate:
        estimate = SkewEstimate(sample.skew, sample.uncertainty, at)
        best = self.best()
        if best is not None and abs(best.skew - estimate.skew) > (
            best.uncertainty + estimate.uncertainty
        ):
            self._samples.clear()
        self._samples.append(estimate)
        best = self.best()
        assert best is not None
        return best

    def best(self) -> SkewEstimate | None:
        return min(self._samples, key=lambda s: s.uncertainty, default=None)


class HealthMonitor:
    """The cached result of the database probe; see the module docstring."""

    def __init__(self, store: Store, settings: HealthSettings) -> None:
        self.store = store
        self.settings = settings
        self._lock = threading.Lock()
        self._healthy: bool | None = None
        self._checked_at = 0.0
        self._state: ServerState | None = None
        self._skew = ClockSkewFilter()
        self._listeners: list[ProbeListener] = []
        self.last_error: str | None = None

    def add_listener(self, listener: ProbeListener) -> None:
        """Call ``listener(state, probe_started)`` after each probe that found a writable
        server; ``probe_started`` is the probe's start on ``time.monotonic``."""
        self._listeners.append(listener)

    def refresh(self, failover: bool = True) -> bool:
        """Probe the database now and cache the answer (see :meth:`Store.probe`)."""
        started = time.monotonic()
        state: ServerState | None = None
        try:
            # The timeout applies to connecting and to each query: half each keeps the
            # usual probe (connect, then short queries) within probe_timeout.
            state = self.store.probe(self.settings.probe_timeout / 2, failover=failover)
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
                    f"healthy ({self.store.server})" if healthy else "unhealthy",
                    f" ({error})" if error else "",
                )
            self._healthy, self._checked_at, self.last_error = healthy, time.monotonic(), error
            if state is not None:
                self._state = state
                if state.clock is not None:
                    self._skew.add(state.clock, time.time())
        if state is not None:
            for listener in self._listeners:
                listener(state, started)
        return healthy

    def database_healthy(self) -> bool:
        """The cached answer, or a fresh probe of the server in use when the cache is stale."""
        with self._lock:
            fresh = time.monotonic() - self._checked_at < 3 * self.settings.check_interval
            cached = self._healthy
        if fresh and cached is not None:
            return cached
        return self.refresh(failover=False)

    def tls_status(self) -> dict[str, Any] | None:
        """The ``tls`` object of /health: what the last probe's connection negotiated, as
        the server reported it (None for SQLite)."""
        tls = self.store.dialect.tls
        return None if tls is None else tls.status()

    @property
    def state(self) -> ServerState | None:
        """What the last successful probe found (None before one succeeded)."""
        with self._lock:
            return self._state

    def clock_skew(self) -> SkewEstimate | None:
        """The best recent estimate of this host's clock against the database's (None
        before a probe measured it, and always on SQLite: one host, one clock)."""
        with self._lock:
            return self._skew.best()
