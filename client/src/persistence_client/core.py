"""The delivery logic shared by the async and the sync client, free of any I/O.

A client is a ``ClientCore`` plus a driver: the driver runs one sender (an
asyncio task or a thread) that asks the core for its ``next_step`` and carries
it out: send a batch, call the service's flush, wait, or stop. The core
decides what is due, interprets every answer, schedules retries and keeps the
counters; the driver only moves bytes and sleeps.
"""

from __future__ import annotations

import http
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from persistence_client.encoding import batch_body, encode_records, gzip_body
from persistence_client.options import ClientOptions
from persistence_client.outbox import SESSIONS, TASKS, Batch, Outbox
from persistence_client.retry import backoff_delay, is_retried, parse_retry_after
from persistence_client.stats import ClientStats, Refusal
from persistence_client.version import __version__

logger = logging.getLogger("persistence_client")

API = "/api/v1/persistence"
BATCH_PATHS = {SESSIONS: f"{API}/sessions/batch", TASKS: f"{API}/tasks/batch"}
FLUSH_PATH = f"{API}/flush"

# How many entries of a 422's ``errors`` list a log line names.
_LOGGED_ERRORS = 5

# Seconds a sender pauses after an unexpected exception in one of its steps.
DEFECT_PAUSE = 1.0

# Names the one session every record of a batch belongs to: a load balancer in front of
# several instances routes on it, so that all records of a session reach one instance.
SESSION_HEADER = "X-Session-ID"
# The longest session id sent in that header (the service's ids are 36-character UUIDs).
_MAX_ROUTING_ID = 255


def routing_session(record: Mapping[str, Any]) -> str | None:
    """The record's session id as sent in ``X-Session-ID``, or None when it has none that
    can go in a header (such a record is refused by the service anyway)."""
    value = record.get("session_id")
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ROUTING_ID:
        return None
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        return None
    return value


@dataclass
class FlushTicket:
    """A ``flush_all`` call: send the records queued up to ``target_seq``, then flush the service.

    ``deadline`` (monotonic) bounds the service's flush request. The caller
    waits for ``done``; ``ok`` says whether every record up to ``target_seq``
    was accepted by the service and the service's flush answered 200.
    """

    target_seq: int
    deadline: float
    started: bool = False
    abandoned: bool = False
    done: bool = False
    ok: bool = False
    records_lost: bool = False


@dataclass(frozen=True)
class Send:
    batch: Batch


@dataclass(frozen=True)
class Flush:
    ticket: FlushTicket


@dataclass(frozen=True)
class Wait:
    """Sleep until woken, or at most ``seconds`` (None: until woken)."""

    seconds: float | None


@dataclass(frozen=True)
class Stop:
    pass


Step = Send | Flush | Wait | Stop


@dataclass(frozen=True)
class PreparedRequest:
    path: str
    content: bytes
    headers: dict[str, str]
    timeout: float


@dataclass
class _Counters:
    submitted: int = 0
    sent: int = 0
    refused: int = 0
    requests: int = 0
    batches_sent: int = 0
    retries: int = 0
    failures_by_cause: Counter[str] = field(default_factory=Counter)
    refused_by_status: Counter[int] = field(default_factory=Counter)
    given_up_by_reason: Counter[str] = field(default_factory=Counter)
    last_refusal: Refusal | None = None
    last_error: str | None = None


class ClientCore:
    """Queue, batching, retry decisions and counters of one client.

    Threading contract: every public method may be called from any thread;
    one lock guards all state and is never held during I/O, encoding or
    logging. ``wake`` (given by the driver) is called, outside the lock,
    whenever the sender should look at ``next_step`` again before its
    current wait ends. Exactly one sender calls ``next_step`` and reports
    the outcome of each step (``on_response``/``on_error`` for a batch,
    ``finish_flush`` for a flush) before asking for the next.
    """

    def __init__(self, options: ClientOptions, wake: Callable[[], None]) -> None:
        self.options = options
        self._wake = wake
        self._lock = threading.Lock()
        self._outbox = Outbox(options.batch_size, options.max_batch_bytes, options.linger)
        self._head: Batch | None = None
        self._tickets: list[FlushTicket] = []
        self._closing = False
        self._close_deadline = math.inf
        self._counters = _Counters()
        self._overflow_streak = 0
        self._rng = random.Random()  # noqa: S311 - retry jitter, not a secret

    # --- the caller's side --------------------------------------------------------------

    def default_headers(self) -> dict[str, str]:
        """Headers of every request of this client."""
        headers = {"User-Agent": f"persistence-client/{__version__}", "Accept": "application/json"}
        if self.options.token is not None:
            headers["Authorization"] = f"Bearer {self.options.token}"
        return headers

    def submit(self, kind: str, records: Iterable[Mapping[str, Any]]) -> bool:
        """Queue ``records`` whole, or none of them when they do not fit; whether they were queued.

        Records that do not fit (``max_queue``) or arrive after ``close`` are
        counted in ``given_up``. Raises ``TypeError``/``ValueError`` for a
        record that is not a mapping or not JSON (see ``encode_records``).
        """
        items = list(records)
        payloads = encode_records(kind, items)
        if not payloads:
            return True
        sessions = [routing_session(record) for record in items]
        count = len(payloads)
        now = time.monotonic()
        with self._lock:
            self._counters.submitted += count
            if self._closing:
                refusal = "closed"
            elif self._pending_locked() + count > self.options.max_queue:
                refusal = "queue_full"
            else:
                refusal = ""
            if refusal:
                self._counters.given_up_by_reason[refusal] += count
                wake, streak = False, self._overflow_streak
                if refusal == "queue_full":
                    self._overflow_streak += count
            else:
                # The sender must arm its linger timer (empty queue) or send at once (full batch).
                was_empty = len(self._outbox) == 0
                wake = self._outbox.add(kind, payloads, now, sessions) or was_empty
                streak, self._overflow_streak = self._overflow_streak, 0
        if not refusal:
            if streak:
                logger.warning(
                    "queue has room again; %d records were given up while it was full", streak
                )
            if wake:
                self._wake()
        elif refusal == "closed":
            logger.warning("client is closed: %d %s not queued (given up)", count, kind)
        elif streak == 0:
            logger.warning(
                "queue full (max_queue=%d): %d %s not queued; records are given up "
                "until there is room again (counted in stats.given_up)",
                self.options.max_queue,
                count,
                kind,
            )
        return not refusal

    def request_flush(self, timeout: float) -> FlushTicket:
        """Ask for everything queued now to be sent, then for the service's flush."""
        with self._lock:
            ticket = FlushTicket(self._outbox.last_seq, time.monotonic() + timeout)
            self._outbox.force_through = max(self._outbox.force_through, ticket.target_seq)
            self._tickets.append(ticket)
        self._wake()
        return ticket

    def abandon_flush(self, ticket: FlushTicket) -> None:
        """The caller stopped waiting: drop the ticket unless its request is under way.

        The records it forced out are still sent; only the service's flush is skipped.
        """
        with self._lock:
            ticket.abandoned = True
            if not ticket.started and ticket in self._tickets:
                self._tickets.remove(ticket)

    def begin_close(self, timeout: float) -> None:
        """Stop taking records; send everything queued at once, within ``timeout`` seconds."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._outbox.force_through = math.inf
        self._wake()

    def finish_close(self) -> int:
        """Give up whatever is still pending (the sender has stopped or ran out of time)."""
        with self._lock:
            self._closing = True
            given_up = self._give_up_all_locked("closed")
        _log_given_up_at_close(given_up)
        return given_up

    def stats(self) -> ClientStats:
        with self._lock:
            c = self._counters
            return ClientStats(
                submitted=c.submitted,
                sent=c.sent,
                refused=c.refused,
                given_up=sum(c.given_up_by_reason.values()),
                pending=self._pending_locked(),
                requests=c.requests,
                batches_sent=c.batches_sent,
                retries=c.retries,
                failures_by_cause=dict(c.failures_by_cause),
                refused_by_status=dict(c.refused_by_status),
                given_up_by_reason=dict(c.given_up_by_reason),
                last_refusal=c.last_refusal,
                last_error=c.last_error,
            )

    # --- the sender's side ---------------------------------------------------------------

    def next_step(self) -> Step:
        """What the sender does now. See the class docstring for the protocol."""
        now = time.monotonic()
        given_up = 0
        with self._lock:
            head = self._head
            if self._closing and head is not None and head.not_before > self._close_deadline:
                # Its next attempt would come after the close deadline: nothing more can land,
                # so close need not wait for its deadline.
                given_up = self._give_up_all_locked("closed")
                step: Step = Stop()
            else:
                step = self._next_step_locked(now)
        _log_given_up_at_close(given_up)
        return step

    def _next_step_locked(self, now: float) -> Step:
        for ticket in self._tickets:
            if not ticket.started and self._drained_locked(ticket.target_seq):
                ticket.started = True
                return Flush(ticket)
        if self._head is not None:
            if self._head.not_before > now:
                return Wait(self._head.not_before - now)
            return Send(self._head)
        batch = self._outbox.take_due(now)
        if batch is not None:
            self._head = batch
            return Send(batch)
        if self._closing and not self._tickets and not self._outbox:
            return Stop()
        return Wait(self._outbox.due_in(now))

    def encode_body(self, batch: Batch) -> bytes:
        """The request body of ``batch``, built (and compressed) once and kept for its retries."""
        if batch.body is None:
            body = batch_body(batch.kind, (entry.payload for entry in batch.entries))
            batch.body = gzip_body(body) if self.options.gzip else body
        return batch.body

    def prepare(self, batch: Batch) -> PreparedRequest:
        """The request of the next attempt of ``batch``; counts the attempt."""
        content = self.encode_body(batch)
        headers = {"Content-Type": "application/json", "X-Request-ID": batch.request_id}
        if batch.session_id is not None:
            headers[SESSION_HEADER] = batch.session_id
        if self.options.gzip:
            headers["Content-Encoding"] = "gzip"
        with self._lock:
            batch.attempts += 1
            self._counters.requests += 1
            if batch.attempts > 1:
                self._counters.retries += 1
            timeout = self._time_left_locked(self._close_deadline)
        return PreparedRequest(BATCH_PATHS[batch.kind], content, headers, timeout)

    def flush_request(self, ticket: FlushTicket) -> PreparedRequest:
        with self._lock:
            timeout = self._time_left_locked(min(ticket.deadline, self._close_deadline))
        return PreparedRequest(FLUSH_PATH, b"", {}, timeout)

    def on_response(
        self, batch: Batch, status: int, headers: httpx.Headers, content: bytes
    ) -> None:
        """Account for the service's answer to one attempt of ``batch``."""
        if 200 <= status < 300:
            self._resolve_sent(batch)
        elif is_retried(status):
            detail, _ = _service_reason(status, content)
            retry_after = parse_retry_after(headers.get("Retry-After"))
            self._schedule_retry(batch, f"http_{status}", f"HTTP {status}: {detail}", retry_after)
        else:
            self._resolve_refused(batch, status, content)

    def on_error(self, batch: Batch, error: Exception) -> None:
        """Account for an attempt of ``batch`` that got no answer (timeout, connection, ...)."""
        if isinstance(error, httpx.TimeoutException | TimeoutError):
            cause = "timeout"
        elif isinstance(error, httpx.TransportError):
            cause = "connection"
        else:
            cause = "error"
            logger.error("unexpected error sending %s", batch.kind, exc_info=error)
        # asyncio's TimeoutError carries no message of its own.
        text = str(error) or ("no answer within the timeout" if cause == "timeout" else "")
        self._schedule_retry(batch, cause, f"{type(error).__name__}: {text}".rstrip(": "), None)

    def finish_flush(self, ticket: FlushTicket, status: int, content: bytes) -> None:
        """Record the service's answer to a flush request."""
        self._end_flush(ticket, ok=status == 200)
        if status == 200:
            logger.debug("service flush done")
        else:
            detail, _ = _service_reason(status, content)
            logger.warning("service flush failed (HTTP %d): %s", status, detail)

    def flush_failed(self, ticket: FlushTicket, error: Exception) -> None:
        """Record a flush request that got no answer."""
        self._end_flush(ticket, ok=False)
        logger.warning("service flush got no answer: %s: %s", type(error).__name__, error)

    # --- internals -------------------------------------------------------------------------

    def _resolve_sent(self, batch: Batch) -> None:
        with self._lock:
            if batch is not self._head:
                return  # given up at close while its request was under way
            self._head = None
            self._counters.sent += len(batch)
            self._counters.batches_sent += 1
        if batch.attempts > 1:
            logger.info(
                "delivered %d %s after %d attempts (request %s)",
                len(batch),
                batch.kind,
                batch.attempts,
                batch.request_id,
            )

    def _resolve_refused(self, batch: Batch, status: int, content: bytes) -> None:
        detail, errors = _service_reason(status, content)
        refusal = Refusal(
            kind=batch.kind,
            status=status,
            detail=detail,
            errors=errors,
            records=len(batch),
            request_id=batch.request_id,
            time=time.time(),
        )
        with self._lock:
            if batch is not self._head:
                return
            self._head = None
            self._mark_lost_locked(batch.first_seq)
            c = self._counters
            c.refused += len(batch)
            c.refused_by_status[status] += len(batch)
            c.last_refusal = refusal
        logger.warning(
            "service refused %d %s (HTTP %d, request %s), not retried: %s%s",
            len(batch),
            batch.kind,
            status,
            batch.request_id,
            detail,
            _errors_summary(errors),
        )

    def _schedule_retry(
        self, batch: Batch, cause: str, error: str, retry_after: float | None
    ) -> None:
        options = self.options
        now = time.monotonic()
        with self._lock:
            if batch is not self._head:
                return
            c = self._counters
            c.failures_by_cause[cause] += 1
            c.last_error = error
            exhausted = options.max_retries is not None and batch.attempts > options.max_retries
            if exhausted:
                self._head = None
                self._mark_lost_locked(batch.first_seq)
                c.given_up_by_reason["retries_exhausted"] += len(batch)
            else:
                delay = backoff_delay(
                    batch.attempts,
                    options.backoff_initial,
                    options.backoff_max,
                    retry_after,
                    self._rng,
                )
                batch.not_before = now + delay
        if exhausted:
            logger.warning(
                "gave up %d %s after %d attempts (request %s): %s",
                len(batch),
                batch.kind,
                batch.attempts,
                batch.request_id,
                error,
            )
            return
        # One warning per batch; an outage would otherwise log every retry.
        log = logger.warning if batch.attempts == 1 else logger.debug
        log(
            "sending %d %s failed (attempt %d, request %s): %s; retrying in %.2f s",
            len(batch),
            batch.kind,
            batch.attempts,
            batch.request_id,
            error,
            delay,
        )

    def _end_flush(self, ticket: FlushTicket, ok: bool) -> None:
        with self._lock:
            ticket.done, ticket.ok = True, ok and not ticket.records_lost
            if ticket in self._tickets:
                self._tickets.remove(ticket)

    def _give_up_all_locked(self, reason: str) -> int:
        count = self._outbox.clear()
        if self._head is not None:
            count += len(self._head)
            self._head = None
        if count:
            self._counters.given_up_by_reason[reason] += count
        for ticket in self._tickets:
            if not ticket.started:
                ticket.done = True
        self._tickets = [t for t in self._tickets if t.started]
        return count

    def _mark_lost_locked(self, first_seq: int) -> None:
        """Flushes waiting for records from ``first_seq`` on will report that some did not land."""
        for ticket in self._tickets:
            if ticket.target_seq >= first_seq:
                ticket.records_lost = True

    def _pending_locked(self) -> int:
        return len(self._outbox) + (len(self._head) if self._head is not None else 0)

    def _drained_locked(self, seq: int) -> bool:
        """Whether every record up to ``seq`` is resolved (sent, refused or given up)."""
        first = self._outbox.first_seq()
        if self._head is not None:
            first = min(first, self._head.first_seq)
        return first > seq

    def _time_left_locked(self, deadline: float) -> float:
        # A tiny floor keeps httpx from reading 0 as "no timeout".
        return max(0.001, min(self.options.timeout, deadline - time.monotonic()))


def _log_given_up_at_close(count: int) -> None:
    if count:
        logger.warning(
            "closed with %d records not delivered (counted in stats.given_up_by_reason['closed'])",
            count,
        )


def _service_reason(status: int, content: bytes) -> tuple[str, tuple[Mapping[str, Any], ...]]:
    """The service's ``detail`` sentence and ``errors`` list from an error answer."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    detail = data.get("detail") if isinstance(data, dict) else None
    if not isinstance(detail, str) or not detail:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        # A proxy's HTML page is not echoed: it says nothing the status does not.
        detail = f"HTTP {status} {phrase} (no JSON detail)"
    errors = data.get("errors") if isinstance(data, dict) else None
    kept = tuple(e for e in errors if isinstance(e, dict)) if isinstance(errors, list) else ()
    return detail, kept


def _errors_summary(errors: tuple[Mapping[str, Any], ...]) -> str:
    if not errors:
        return ""
    parts = []
    for error in errors[:_LOGGED_ERRORS]:
        key = next((f" {k}={error[k]!r}" for k in ("task_id", "session_id") if error.get(k)), "")
        field_name, message = error.get("field"), error.get("message")
        parts.append(f"index {error.get('index')}{key} {field_name}: {message}")
    more = f" (+{len(errors) - _LOGGED_ERRORS} more)" if len(errors) > _LOGGED_ERRORS else ""
    return "; errors: " + "; ".join(parts) + more
