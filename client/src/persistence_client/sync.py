"""``SyncPersistenceClient``: the client for threaded (non-asyncio) code."""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from persistence_client.base import BaseClient
from persistence_client.core import DEFECT_PAUSE, Flush, PreparedRequest, Send, Wait
from persistence_client.outbox import SESSIONS, TASKS, Batch

logger = logging.getLogger("persistence_client")

# Clients not closed yet; closed at interpreter exit so that their queues are sent
# (within each one's close_timeout) rather than lost with the daemon sender thread.
_open_clients: set[SyncPersistenceClient] = set()
_open_clients_lock = threading.Lock()


class SyncPersistenceClient(BaseClient):
    """Sends sessions and tasks to the Persistence Service from threaded code.

    The same methods as ``PersistenceClient``, without ``await``.
    ``persist_session``/``persist_tasks`` only queue the records and return at
    once; a daemon thread of the client sends them in batches over one pooled
    connection and retries what failed.

    Threading contract: every method may be called from any thread, at the
    same time. A client not closed by the program is closed at interpreter
    exit (``atexit``), which waits up to ``close_timeout`` to send its queue.
    """

    def _open(self) -> None:
        self._http = httpx.Client(**self._transport_options())  # type: ignore[arg-type]
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._close_lock = threading.Lock()
        self._closed = False
        self._sender = threading.Thread(
            target=self._run_sender, name="persistence-client-sender", daemon=True
        )
        self._sender.start()
        with _open_clients_lock:
            _open_clients.add(self)

    def persist_session(self, session_data: Mapping[str, Any]) -> bool:
        """Queue one session record; False when it was given up (queue full, client closed)."""
        return self._core.submit(SESSIONS, [session_data])

    def persist_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> bool:
        """Queue task records, all or none; False when they were given up."""
        return self._core.submit(TASKS, tasks)

    def flush_all(self, timeout: float | None = None) -> bool:
        """Send everything queued, then ask the service to write its buffer to the database.

        Returns True when, within ``timeout`` seconds (default: the client's
        ``timeout``), the service accepted every record still pending at the
        call and answered its flush with 200. False otherwise: some of those
        records were refused or given up (see ``stats``), the flush failed, or
        time ran out; records not sent by then stay queued and are sent later.
        """
        if self._closed:
            return False
        limit = self.options.timeout if timeout is None else timeout
        ticket = self._core.request_flush(limit)
        with self._progress:
            done = self._progress.wait_for(lambda: ticket.done, limit)
        if not done:
            self._core.abandon_flush(ticket)
            logger.warning("flush_all did not finish within %.3g s", limit)
            return False
        return ticket.ok

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued within ``timeout`` seconds (default ``close_timeout``), then stop.

        What could not be sent by then is given up and counted in
        ``stats.given_up_by_reason["closed"]``. Later calls do nothing.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        limit = self.options.close_timeout if timeout is None else timeout
        self._core.begin_close(limit)
        self._sender.join(limit)
        # A request still under way is given up; its own timeout ends it soon after.
        self._core.finish_close()
        self._http.close()
        with self._progress:
            self._progress.notify_all()
        with _open_clients_lock:
            _open_clients.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the sender thread -----------------------------------------------------------------

    def _wake_sender(self) -> None:
        self._wake.set()

    def _run_sender(self) -> None:
        core = self._core
        while True:
            self._wake.clear()
            try:
                step = core.next_step()
                if isinstance(step, Send):
                    self._send(step.batch)
                elif isinstance(step, Flush):
                    self._flush(step)
                elif isinstance(step, Wait):
                    self._wake.wait(step.seconds)
                else:
                    break
            except Exception:
                # A defect, not a network failure (those are handled in each step): keep
                # the sender alive so that queued records are not silently stranded.
                logger.exception("sender step failed; going on in %s s", DEFECT_PAUSE)
                self._wake.wait(DEFECT_PAUSE)
            with self._progress:
                self._progress.notify_all()
        with self._progress:
            self._progress.notify_all()

    def _send(self, batch: Batch) -> None:
        request = self._core.prepare(batch)
        try:
            response = self._post(request)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and retried by the core
            self._core.on_error(batch, exc)
            return
        self._core.on_response(batch, response.status_code, response.headers, response.content)

    def _flush(self, step: Flush) -> None:
        request = self._core.flush_request(step.ticket)
        try:
            response = self._post(request)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting caller as a failure
            self._core.flush_failed(step.ticket, exc)
            return
        self._core.finish_flush(step.ticket, response.status_code, response.content)

    def _post(self, request: PreparedRequest) -> httpx.Response:
        return self._http.post(
            request.path, content=request.content, headers=request.headers, timeout=request.timeout
        )


@atexit.register
def _close_open_clients() -> None:
    with _open_clients_lock:
        clients = list(_open_clients)
    for client in clients:
        client.close()
