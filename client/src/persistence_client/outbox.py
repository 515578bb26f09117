"""The bounded queue of records not yet sent, and when and how it is cut into batches."""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Sequence
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
    service's logs of all attempts of one batch share it. ``session_id`` is
    the session every record of the batch belongs to (None when the records
    carry no session id); it is sent as ``X-Session-ID`` so that a load
    balancer can route all records of one session to one instance.
    """

    kind: str
    entries: list[Entry]
    session_id: str | None = None
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
    """The FIFO queue of the records of one kind and one session, with their byte size."""

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


LaneKey = tuple[str, str | None]


class Outbox:
    """Queued sessions and tasks, cut into batches of one kind and one session each.

    Records are queued in lanes, one per (kind, session id), so that every
    batch holds the records of a single session and can be routed by it. A
    lane's records are due when ``batch_size`` records or ``max_batch_bytes``
    bytes are queued in it, when its oldest record has waited ``linger``
    seconds, or when a flush or close asked for every record up to a sequence
    number (``force_through``). Due lanes are sent oldest record first; before
    a session's tasks, its queued session records go, so a task is never sent
    before an update of its session queued earlier.

    Not thread-safe on its own: ``ClientCore`` calls it under its lock.
    """

    def __init__(self, batch_size: int, max_batch_bytes: int, linger: float) -> None:
        self._batch_size = batch_size
        self._max_batch_bytes = max_batch_bytes
        self._linger = linger
        # Insertion order: lanes that were emptied are removed, so this is roughly the
        # order in which the oldest queued records arrived.
        self._lanes: dict[LaneKey, _Lane] = {}
        self._count = 0
        self._next_seq = 1
        self.force_through: float = 0

    def __len__(self) -> int:
        return self._count

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record queued so far (0 before any)."""
        return self._next_seq - 1

    def add(
        self,
        kind: str,
        payloads: list[bytes],
        now: float,
        sessions: Sequence[str | None] | None = None,
    ) -> bool:
        """Queue ``payloads`` (with the session id of each, if known); whether a lane they
        went to now holds a full batch."""
        full = False
        for index, payload in enumerate(payloads):
            key = (kind, sessions[index] if sessions is not None else None)
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane()
            lane.append(Entry(self._next_seq, payload, now))
            self._next_seq += 1
            full = full or len(lane) >= self._batch_size or lane.bytes >= self._max_batch_bytes
        self._count += len(payloads)
        return full

    def first_seq(self) -> float:
        """The lowest sequence number still queued, or infinity when empty."""
        return min((lane.entries[0].seq for lane in self._lanes.values()), default=math.inf)

    def take_due(self, now: float) -> Batch | None:
        """The next batch to send, taken out of the queue, or None when nothing is due."""
        due = [key for key, lane in self._lanes.items() if self._due(lane, now)]
        if not due:
            return None
        kind, session = min(due, key=lambda key: self._lanes[key].entries[0].seq)
        if kind == TASKS and (SESSIONS, session) in self._lanes:
            return self._cut((SESSIONS, session))
        return self._cut((kind, session))

    def due_in(self, now: float) -> float | None:
        """Seconds until the oldest queued record's linger ends, or None when empty."""
        oldest = [lane.entries[0].queued_at for lane in self._lanes.values()]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self._linger - now)

    def clear(self) -> int:
        """Drop every queued record; how many there were."""
        count, self._count = self._count, 0
        self._lanes.clear()
        return count

    def _due(self, lane: _Lane, now: float) -> bool:
        oldest = lane.entries[0]
        return (
            len(lane) >= self._batch_size
            or lane.bytes >= self._max_batch_bytes
            or oldest.seq <= self.force_through
            or oldest.queued_at + self._linger <= now
        )

    def _cut(self, key: LaneKey) -> Batch:
        lane = self._lanes[key]
        entries = [lane.popleft()]
        size = len(entries[0].payload)
        while lane and len(entries) < self._batch_size:
            nxt = len(lane.entries[0].payload)
            # +1 for the comma between records.
            if size + 1 + nxt > self._max_batch_bytes:
                break
            entries.append(lane.popleft())
            size += 1 + nxt
        if not lane:
            del self._lanes[key]
        self._count -= len(entries)
        kind, session = key
        return Batch(kind, entries, session)
