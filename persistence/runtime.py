"""The life of one worker process: start, the scheduler's jobs, the control channel, stop.

Threading contract: constructing a :class:`WorkerRuntime` starts no thread,
opens no connection and touches no file. :meth:`start` and :meth:`stop` are
called once each, by the process that serves requests (gunicorn's
``post_worker_init`` and ``worker_exit`` hooks, or ``python wsgi.py``);
:meth:`begin_shutdown` may be called from any thread, any number of times;
:meth:`wake_flusher` from any request thread. ``_lock`` guards the scheduler
reference and the pending wake-up.

After every health probe that finds a writable server (on the probing
thread), the runtime sets the arrival clock to the database's clock and ends
a flush backoff that was waiting for the database (:meth:`_after_probe`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from datetime import datetime
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from persistence.config import Settings, describe
from persistence.control import ControlServer, Handler
from persistence.datadir import require_writable
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher, FlushFailed
from persistence.health import HealthMonitor
from persistence.store import ServerState, Store, StoreError
from schedules import FLUSH_JOB, build_scheduler, next_run_time, run_soon

log = logging.getLogger(__name__)

# How many ids a shutdown that loses records names in the log.
LOST_IDS_LOGGED = 10


class WorkerRuntime:
    """Starts and stops the threads of one worker; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        durable: DurableBuffer,
        store: Store,
        flusher: Flusher,
        health: HealthMonitor,
    ) -> None:
        self.settings = settings
        self.durable = durable
        self.store = store
        self.flusher = flusher
        self.health = health
        self.control: ControlServer | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._lock = threading.Lock()
        self._wake_pending = False
        self._early_flush: threading.Thread | None = None
        health.add_listener(self._after_probe)

    # --- start ------------------------------------------------------------------------------

    def start(self, answer_peer: Handler, control_dir: Path | None = None) -> None:
        """Adopt journals, prepare the tables, start the scheduler and the control socket.

        ``control_dir`` (given by gunicorn.conf.py) is where this worker's control
        socket goes, shared with the other workers of the same master.
        """
        buf = self.settings.buffer
        log.info(
            "persistence service starting; database: %s; durability: %s; settings from %s",
            describe(self.settings),
            buf.durability,
            self.settings.source,
        )
        require_writable(self.settings)
        if buf.durability == "journal":
            self.durable.open_journal(buf.journal_dir)
        self._prepare_database()
        # A flush is CPU work in Python (PyMySQL builds its statements): with Python's
        # default 5 ms GIL slices request threads wait behind it. Shorter slices keep intake
        # p99 during a flush near its idle value (docs/PERFORMANCE.md).
        sys.setswitchinterval(self.settings.service.gil_switch_interval)
        scheduler = build_scheduler(
            self.flusher.flush_if_due,
            buf.flush_interval,
            self.health.refresh,
            self.settings.health.check_interval,
            adopt=self.durable.adopt_orphans if buf.durability == "journal" else None,
        )
        scheduler.start()
        with self._lock:
            self._scheduler = scheduler
        if control_dir is not None:
            self.control = ControlServer(control_dir, answer_peer)
            self.control.start()
        counts = self.durable.buffer.counts()
        if counts["sessions"] + counts["tasks"]:
            self.wake_flusher()  # write what adopted journals brought back without waiting

    def _prepare_database(self) -> None:
        # Before anything is stamped or written: find a writable server among those
        # of database.host and measure the clock against it.
        self.health.refresh()
        try:
            self.store.prepare()
            # Never stamp below a row already written: the clock may have stepped back
            # since the process that wrote it ran.
            self.durable.clock.advance_to(self.store.newest_stamp())
        except StoreError as exc:
            # Keep serving: records are buffered and written once the database is back.
            log.error(
                "could not prepare the tables at start (%s); the first flush will try again", exc
            )

    # --- running ----------------------------------------------------------------------------

    def _after_probe(self, state: ServerState, probe_started: float) -> None:
        """Follow the database's clock; flush at once when the database is back."""
        skew = self.health.clock_skew()
        if skew is not None:
            self.durable.clock.adjust(-round(skew.skew * 1_000_000))
        if self.flusher.database_back(probe_started):
            self.wake_flusher()

    def wake_flusher(self) -> None:
        """Ask for a flush on a scheduler thread; at most one such request is pending."""
        with self._lock:
            scheduler = self._scheduler
            if scheduler is None or self._wake_pending:
                return
            self._wake_pending = True
        try:
            run_soon(scheduler, self._size_triggered_flush, "size-triggered flush")
        except Exception:  # the scheduler is stopping: the final flush writes everything
            log.debug("size-triggered flush not scheduled", exc_info=True)
            with self._lock:
                self._wake_pending = False

    def _size_triggered_flush(self) -> None:
        with self._lock:
            self._wake_pending = False
        self.flusher.flush_if_due()

    def next_flush_time(self) -> datetime | None:
        """When the interval flush runs next (None when the scheduler is not running)."""
        with self._lock:
            scheduler = self._scheduler
        return next_run_time(scheduler, FLUSH_JOB)

    # --- stop -------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Start writing the buffer now, while in-flight requests finish (idempotent).

        :meth:`stop` waits for this flush, then writes what those requests added.
        It takes a lock and starts a thread, so call it from the worker's main loop
        right after the stop signal, not from inside a signal handler.
        """
        with self._lock:
            if self._early_flush is not None:
                return
            self._early_flush = threading.Thread(
                target=self._flush_quietly, name="shutdown-flush", daemon=True
            )
        log.info("shutdown: writing the buffer while requests in flight finish")
        self._early_flush.start()

    def _flush_quietly(self) -> None:
        with contextlib.suppress(FlushFailed):  # logged by the flusher; stop() tries again
            self.flusher.flush_once()

    def stop(self) -> None:
        """Stop the threads, write everything buffered, close the journal and the pool."""
        if self.control is not None:
            self.control.stop()
            self.control = None
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
            early = self._early_flush
        if scheduler is not None:
            # APScheduler's main loop fails (JobLookupError, in its own thread) to remove a
            # one-shot job it is starting when shutdown() lands meanwhile; a wake-up from a
            # request or a health probe may be just that. Paused, the loop starts nothing
            # new, and get_jobs() waits until a loop under way has let go of the job store.
            scheduler.pause()
            scheduler.get_jobs()
            scheduler.shutdown(wait=True)
        if early is not None:
            early.join()
        journaled = self.durable.journal is not None
        try:
            # In memory mode a task still waiting for its session has no later chance:
            # it goes to the dead letters. The journal keeps it for the next start.
            result = self.flusher.flush_once(final=not journaled)
            log.info(
                "shutdown flush wrote %d sessions and %d tasks",
                result.sessions_written,
                result.tasks_written,
            )
        except FlushFailed as exc:
            log.error("shutdown flush failed: %s", exc)
        try:
            self._report_leftovers(journaled)
        finally:
            try:
                self.durable.close()
            except OSError as exc:
                log.error("closing the journal failed: %s", exc)
            self.store.close()

    def _report_leftovers(self, journaled: bool) -> None:
        """Say what the shutdown flush could not write (e.g. the database is down)."""
        buffer = self.durable.buffer
        counts = buffer.counts()
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
                buffer.sample_keys(LOST_IDS_LOGGED),
            )
