"""The in-memory buffer: bounded, keyed by primary key, coalescing repeated updates.

Threading contract
------------------
One ``Buffer`` is shared by every request thread and the flusher of a worker
process. Every public method takes ``self._lock`` for dictionary work only
(O(records in the call)); no method does I/O or calls back into other code
while holding it. The lock is never held while the database is written:
the flusher takes records out with :meth:`drain`, writes them without the
lock, then reports back with :meth:`release` (written or dead-lettered) or
:meth:`restore` (to be retried).

Records taken by :meth:`drain` stay counted against the hard limit ("in
flight") until released or restored, so memory stays bounded while a slow
or failing flush holds a batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from persistence.records import RECORD_TYPES, Record, RecordType


class BufferFull(Exception):
    """The batch would take the buffer past its hard limit; nothing of it was kept."""

    def __init__(self, held: int, incoming: int, limit: int) -> None:
        super().__init__(
            f"buffer holds {held} records; {incoming} more would pass the hard limit of {limit}"
        )
        self.held = held
        self.incoming = incoming
        self.limit = limit


@dataclass
class Batch:
    """What one :meth:`Buffer.drain` took out: records by type, then by key.

    ``waiting_since`` maps a task key to the monotonic time it was first
    found waiting for its session.
    """

    records: dict[str, dict[str, Record]] = field(default_factory=dict)
    waiting_since: dict[str, float] = field(default_factory=dict)

    def of(self, kind: RecordType) -> dict[str, Record]:
        return self.records.get(kind.name, {})

    def __len__(self) -> int:
        return sum(len(records) for records in self.records.values())


class Buffer:
    """Bounded, thread-safe, coalescing store of records waiting to be written."""

    def __init__(self, hard_limit: int) -> None:
        self.hard_limit = hard_limit
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Record]] = {kind.name: {} for kind in RECORD_TYPES}
        self._waiting_since: dict[str, float] = {}
        self._in_flight = 0
        self._received = {kind.name: 0 for kind in RECORD_TYPES}

    def add(self, kind: RecordType, records: list[Record]) -> int:
        """Buffer ``records`` (validated, in arrival order), all or none.

        Returns how many buffered records are ready to flush afterwards (tasks
        waiting for their session are not counted: flushing cannot write them).
        Raises :class:`BufferFull` when the batch would pass the hard limit.
        """
        key = kind.key
        with self._lock:
            held = self._held()
            if held + len(records) > self.hard_limit:
                raise BufferFull(held, len(records), self.hard_limit)
            pending = self._records[kind.name]
            for record in records:
                older = pending.get(record[key])
                pending[record[key]] = record if older is None else kind.merge(older, record)
            self._received[kind.name] += len(records)
            return self._buffered() - len(self._waiting_since)

    def drain(self) -> Batch:
        """Take out everything buffered; it stays counted as in flight."""
        with self._lock:
            batch = Batch(records=self._records, waiting_since=self._waiting_since)
            self._records = {kind.name: {} for kind in RECORD_TYPES}
            self._waiting_since = {}
            self._in_flight += len(batch)
            return batch

    def restore(
        self,
        kind: RecordType,
        records: dict[str, Record],
        waiting_since: dict[str, float] | None = None,
    ) -> None:
        """Put back drained records that were not written; updates that came since win."""
        with self._lock:
            pending = self._records[kind.name]
            for key, record in records.items():
                newer = pending.get(key)
                pending[key] = record if newer is None else kind.merge(record, newer)
            if waiting_since:
                self._waiting_since.update(waiting_since)
            self._in_flight -= len(records)

    def release(self, count: int) -> None:
        """Forget ``count`` drained records that were written or dead-lettered."""
        with self._lock:
            self._in_flight -= count

    def counts(self) -> dict[str, int]:
        """Buffered records by type, ``in_flight`` and ``waiting`` (tasks whose session is
        not in the database yet), read in one consistent moment."""
        with self._lock:
            counts = {kind.plural: len(self._records[kind.name]) for kind in RECORD_TYPES}
            counts["in_flight"] = self._in_flight
            counts["waiting"] = len(self._waiting_since)
            return counts

    def sample_keys(self, limit: int) -> dict[str, list[str]]:
        """Up to ``limit`` buffered keys of each type (for logging what would be lost)."""
        with self._lock:
            return {kind.plural: list(self._records[kind.name])[:limit] for kind in RECORD_TYPES}

    def received(self) -> dict[str, int]:
        """How many records of each type were accepted since start (before coalescing)."""
        with self._lock:
            return {kind.plural: self._received[kind.name] for kind in RECORD_TYPES}

    def _buffered(self) -> int:
        return sum(len(records) for records in self._records.values())

    def _held(self) -> int:
        return self._buffered() + self._in_flight
