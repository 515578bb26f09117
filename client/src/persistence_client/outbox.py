"""The bounded queue of records not yet sent, and when and how it is cut into batches."""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field

SESSIONS = "sessions"
TASKS = "tasks"


@dataclass(frozen=True)
class Entry:
    """One encoded record and when it was queued (``seq`` orders all records of a client)."""

    seq: int
    payload: bytes
    queued_at: float


@dataclass
class Batch:
    """Records of one kind sent in one request, and retried as they are until resolved.

    ``request_id`` is sent as ``X-Request-ID`` on every attempt, so the
    service's logs of all attempts of one batch share it.
    """

    kind: str
    entries: list[Entry]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    attempts: int = 0
    not_before: float = 0.0
    body: bytes | None = None

    @property
    def first_seq(self) -> int:
        return self.entries[0].seq

    def __len__(self) -> int:
        return len(self.entries)


class _Lane:
    """The FIFO queue of one record kind, with the byte size of what it holds."""

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.bytes += len(entry.payload)

    def popleft(self) -> Entry:
        entry = self.entries.popleft()
        self.bytes -= len(entry.payload)
        return entry

    def clear(self) -> int:
        count = len(self.entries)
        self.entries.clear()
        self.bytes = 0
        return count


class Outbox:
    """Queued sessions and tasks, cut into batches: sessions always before tasks.

    A kind's records are due when ``batch_size`` records or ``max_batch_bytes``
    bytes are queued, when its oldest record has waited ``linger`` seconds, or
    when a flush or close asked for every record up to a sequence number
    (``force_through``). When tasks are due, queued sessions are sent first, so
    a task is never sent before a session queued earlier.

    Not thread-safe on its own: ``ClientCore`` calls it under its lock.
    """

    def __init__(self, batch_size: int, max_batch_bytes: int, linger: float) -> None:
        self._batch_size = batch_size
        self._max_batch_bytes = max_batch_bytes
        self._linger = linger
        self._lanes = {SESSIONS: _Lane(), TASKS: _Lane()}
        self._next_seq = 1
        self.force_through: float = 0

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record queued so far (0 before any)."""
        return self._next_seq - 1

    def add(self, kind: str, payloads: list[bytes], now: float) -> bool:
        """Queue ``payloads``; whether their kind now holds a full batch."""
        lane = self._lanes[kind]
        for payload in payloads:
            lane.append(Entry(self._next_seq, payload, now))
            self._next_seq += 1
        return len(lane) >= self._batch_size or lane.bytes >= self._max_batch_bytes

    def first_seq(self) -> float:
        """The lowest sequence number still queued, or infinity when empty."""
        return min((lane.entries[0].seq for lane in self._lanes.values() if lane), default=math.inf)

    def take_due(self, now: float) -> Batch | None:
        """The next batch to send, taken out of the queue, or None when nothing is due."""
        tasks_due = self._due(self._lanes[TASKS], now)
        if self._lanes[SESSIONS] and (tasks_due or self._due(self._lanes[SESSIONS], now)):
            return self._cut(SESSIONS)
        if tasks_due:
            return self._cut(TASKS)
        return None

    def due_in(self, now: float) -> float | None:
        """Seconds until the oldest queued record's linger ends, or None when empty."""
        oldest = [lane.entries[0].queued_at for lane in self._lanes.values() if lane]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self._linger - now)

    def clear(self) -> int:
        """Drop every queued record; how many there were."""
        return sum(lane.clear() for lane in self._lanes.values())

    def _due(self, lane: _Lane, now: float) -> bool:
        if not lane:
            return False
        oldest = lane.entries[0]
        return (
            len(lane) >= self._batch_size
            or lane.bytes >= self._max_batch_bytes
            or oldest.seq <= self.force_through
            or oldest.queued_at + self._linger <= now
        )

    def _cut(self, kind: str) -> Batch:
        lane = self._lanes[kind]
        entries = [lane.popleft()]
        size = len(entries[0].payload)
        while lane and len(entries) < self._batch_size:
            nxt = len(lane.entries[0].payload)
            # +1 for the comma between records.
            if size + 1 + nxt > self._max_batch_bytes:
                break
            entries.append(lane.popleft())
            size += 1 + nxt
        return Batch(kind, entries)
