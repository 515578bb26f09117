"""``PersistenceClient``: the asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from persistence_client.base import BaseClient
from persistence_client.core import DEFECT_PAUSE, Flush, PreparedRequest, Send, Wait
from persistence_client.outbox import SESSIONS, TASKS, Batch

logger = logging.getLogger("persistence_client")


class PersistenceClient(BaseClient):
    """Sends sessions and tasks to the Persistence Service from asyncio code.

    ``persist_session``/``persist_tasks`` only queue the records (no network
    I/O, a few microseconds) and return whether they were queued; a
    background task of the client sends them in batches over one pooled
    connection and retries what failed. ``flush_all`` and ``aclose`` wait,
    each within its timeout, for what is queued to be sent.

    Threading contract: use a client from one event loop, the one running
    when it is first used, and from that loop's thread only. Close it with
    ``aclose()`` (or ``async with``) before the loop ends: records still
    queued when the loop stops are given up (counted in ``stats``).
    """

    def _open(self) -> None:
        self._http = httpx.AsyncClient(**self._transport_options())  # type: ignore[arg-type]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Set and replaced after every step of the sender: whoever waits for progress
        # waits on the event current at that moment (no wake-up can be missed).
        self._progress = asyncio.Event()
        self._closed = False

    async def persist_session(self, session_data: Mapping[str, Any]) -> bool:
        """Queue one session record; False when it was given up (queue full, client closed)."""
        self._ensure_sender()
        return self._core.submit(SESSIONS, [session_data])

    async def persist_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> bool:
        """Queue task records, all or none; False when they were given up."""
        self._ensure_sender()
        return self._core.submit(TASKS, tasks)

    async def flush_all(self, timeout: float | None = None) -> bool:
        """Send everything queued, then ask the service to write its buffer to the database.

        Returns True when, within ``timeout`` seconds (default: the client's
        ``timeout``), the service accepted every record still pending at the
        call and answered its flush with 200. False otherwise: some of those
        records were refused or given up (see ``stats``), the flush failed, or
        time ran out; records not sent by then stay queued and are sent later.
        """
        if self._closed:
            return False
        self._ensure_sender()
        limit = self.options.timeout if timeout is None else timeout
        ticket = self._core.request_flush(limit)
        try:
            async with asyncio.timeout(limit):
                while not ticket.done:
                    await self._progress.wait()
        except TimeoutError:
            logger.warning("flush_all did not finish within %.3g s", limit)
            return False
        finally:
            if not ticket.done:
                self._core.abandon_flush(ticket)
        return ticket.ok

    async def aclose(self, timeout: float | None = None) -> None:
        """Send what is queued within ``timeout`` seconds (default ``close_timeout``), then stop.

        What could not be sent by then is given up and counted in
        ``stats.given_up_by_reason["closed"]``. Later calls do nothing.
        """
        if self._closed:
            return
        self._closed = True
        limit = self.options.close_timeout if timeout is None else timeout
        self._core.begin_close(limit)
        sender = self._sender
        try:
            if sender is not None and not sender.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(limit):
                        await asyncio.shield(sender)
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            self._core.finish_close()
            self._signal_progress()
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the sender ----------------------------------------------------------------------

    def _wake_sender(self) -> None:
        self._wake.set()

    def _signal_progress(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _ensure_sender(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this PersistenceClient belongs to another event loop; build one per loop"
            )
        if self._sender is None and not self._closed:
            self._sender = loop.create_task(self._run_sender(), name="persistence-client-sender")

    async def _run_sender(self) -> None:
        core = self._core
        try:
            while True:
                self._wake.clear()
                try:
                    step = core.next_step()
                    if isinstance(step, Send):
                        await self._send(step.batch)
                    elif isinstance(step, Flush):
                        await self._flush(step)
                    elif isinstance(step, Wait):
                        await self._sleep(step.seconds)
                    else:
                        return
                except Exception:
                    # A defect, not a network failure (those are handled in each step): keep
                    # the sender alive so that queued records are not silently stranded.
                    logger.exception("sender step failed; going on in %s s", DEFECT_PAUSE)
                    await self._sleep(DEFECT_PAUSE)
                self._signal_progress()
        except asyncio.CancelledError:
            if not self._closed:
                logger.warning("the event loop stopped the client's sender before aclose()")
                self._core.finish_close()
            raise
        finally:
            self._signal_progress()

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: without limit), or less if woken."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _send(self, batch: Batch) -> None:
        if batch.body is None and self.options.gzip:
            # Compressing a large batch would hold the event loop for milliseconds.
            await asyncio.to_thread(self._core.encode_body, batch)
        request = self._core.prepare(batch)
        try:
            response = await self._post(request)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and retried by the core
            self._core.on_error(batch, exc)
            return
        self._core.on_response(batch, response.status_code, response.headers, response.content)

    async def _flush(self, step: Flush) -> None:
        request = self._core.flush_request(step.ticket)
        try:
            response = await self._post(request)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting caller as a failure
            self._core.flush_failed(step.ticket, exc)
            return
        self._core.finish_flush(step.ticket, response.status_code, response.content)

    async def _post(self, request: PreparedRequest) -> httpx.Response:
        # httpx's timeout applies to each phase; asyncio's bounds the whole attempt.
        async with asyncio.timeout(request.timeout):
            return await self._http.post(
                request.path,
                content=request.content,
                headers=request.headers,
                timeout=request.timeout,
            )
