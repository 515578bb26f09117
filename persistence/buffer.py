"""The in-memory buffer: bounded, keyed by primary key, coalescing repeated updates.

Records are kept as their compact JSON encoding (:func:`persistence.records.encode`):
less than half the memory of a dict, an exact size for the byte limit, and
the very bytes the journal writes. The buffer knows nothing of durability;
:class:`persistence.durable.DurableBuffer` decides what is journaled and when.

Merging always compares arrival stamps (:func:`persistence.records.stamp_of`):
whatever order two updates of a row reach the buffer in (two requests racing,
a flush putting records back, a journal being adopted), the newer stamp wins
every column and the session counters that never decrease keep the larger
value. The buffer therefore always equals what replaying the same updates
in any order gives.

Threading contract
------------------
One ``Buffer`` is shared by every request thread and the flusher of a
worker process. Every public method takes ``self._lock`` for dictionary
work only (O(records in the call)); nothing waits for a disk or the
database under it.

Records taken by :meth:`drain` stay counted against the hard limits
("in flight") until :meth:`finish`, and a :meth:`reserve`-d batch counts from
the moment it is admitted until :meth:`add` or :meth:`release`, so memory
stays bounded while a batch waits for its journal fsync or a slow flush holds
a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from persistence.records import RECORD_TYPES, Record, RecordType, encode, stamp_of


class BufferFull(Exception):
    """The batch would take the buffer past a hard limit; nothing of it was kept."""

    def __init__(self, what: str, held: int, incoming: int, limit: int) -> None:
        super().__init__(
            f"the buffer holds {held} {what}; {incoming} more would pass the hard limit of {limit}"
        )
        self.what = what
        self.held = held
        self.incoming = incoming
        self.limit = limit


@dataclass
class Reservation:
    """Room taken in the buffer for one admitted batch, until it is added or released."""

    count: int
    nbytes: int
    open: bool = True


@dataclass
class Batch:
    """What one :meth:`Buffer.drain` took out: encoded records by type, then by key.

    ``waiting`` holds the keys of tasks that were found waiting for their
    session; ``segments`` are the journal segments the batch's records are in
    (None: no journal, or the journal could not be rotated).
    """

    encoded: dict[str, dict[str, bytes]] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    nbytes: int = 0
    segments: frozenset[int] | None = None

    def of(self, kind: RecordType) -> dict[str, Record]:
        """The records of ``kind``, decoded, by key."""
        return {key: orjson.loads(data) for key, data in self.encoded[kind.name].items()}

    def __len__(self) -> int:
        return sum(len(records) for records in self.encoded.values())


class Buffer:
    """Bounded, thread-safe, coalescing store of records waiting to be written."""

    def __init__(self, hard_limit: int, hard_limit_bytes: int) -> None:
        self.hard_limit = hard_limit
        self.hard_limit_bytes = hard_limit_bytes
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, bytes]] = {kind.name: {} for kind in RECORD_TYPES}
        self._nbytes = 0
        self._waiting: set[str] = set()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._reserved = 0
        self._reserved_bytes = 0
        self._received = {kind.name: 0 for kind in RECORD_TYPES}
        self._draining: list[Batch] = []

    def reserve(self, count: int, nbytes: int) -> Reservation:
        """Admit a batch of ``count`` records and ``nbytes`` bytes, or raise BufferFull."""
        with self._lock:
            held = self._count() + self._in_flight + self._reserved
            if held + count > self.hard_limit:
                raise BufferFull("records", held, count, self.hard_limit)
            held_bytes = self._nbytes + self._in_flight_bytes + self._reserved_bytes
            if held_bytes + nbytes > self.hard_limit_bytes:
                raise BufferFull("bytes", held_bytes, nbytes, self.hard_limit_bytes)
            self._reserved += count
            self._reserved_bytes += nbytes
            return Reservation(count, nbytes)

    def release(self, reservation: Reservation) -> None:
        """Give back the room of a batch that will not be added (idempotent)."""
        with self._lock:
            self._close(reservation)

    def add(
        self, kind: RecordType, keys: Iterable[str], encoded: list[bytes], reservation: Reservation
    ) -> int:
        """Merge an admitted batch; return how many buffered records are ready to flush.

        Tasks waiting for their session are not counted as ready: a flush cannot
        write them.
        """
        with self._lock:
            self._close(reservation)
            self._merge(kind, keys, encoded)
            self._received[kind.name] += len(encoded)
            return self._count() - len(self._waiting)

    def drain(self) -> Batch:
        """Take out everything buffered; it stays counted as in flight until :meth:`finish`."""
        with self._lock:
            batch = Batch(self._records, self._waiting, self._nbytes)
            self._records = {kind.name: {} for kind in RECORD_TYPES}
            self._waiting = set()
            self._nbytes = 0
            self._in_flight += len(batch)
            self._in_flight_bytes += batch.nbytes
            self._draining.append(batch)
            return batch

    def restore(self, kind: RecordType, records: dict[str, Record], waiting: bool = False) -> None:
        """Put back drained records that were not written; newer updates that came since win.

        ``waiting``: the records are tasks waiting for their session.
        """
        if not records:
            return
        encoded = [encode(record) for record in records.values()]
        with self._lock:
            self._merge(kind, records, encoded)
            if waiting:
                self._waiting.update(records)

    def replay(self, kind: RecordType, records: list[Record]) -> None:
        """Merge records read back from a journal (no limits: they were accepted before)."""
        encoded = [encode(record) for record in records]
        keys = [record[kind.key] for record in records]
        with self._lock:
            self._merge(kind, keys, encoded)

    def finish(self, batch: Batch) -> None:
        """End the flush of ``batch``: it stops counting against the hard limits."""
        with self._lock:
            self._in_flight -= len(batch)
            self._in_flight_bytes -= batch.nbytes
            self._draining = [b for b in self._draining if b is not batch]

    def counts(self) -> dict[str, int]:
        """Buffered records by type, ``in_flight`` and ``waiting`` (tasks whose session is
        not in the database yet), bytes held, read in one consistent moment."""
        with self._lock:
            counts = {kind.plural: len(self._records[kind.name]) for kind in RECORD_TYPES}
            counts["in_flight"] = self._in_flight
            counts["waiting"] = len(self._waiting)
            counts["bytes"] = self._nbytes + self._in_flight_bytes + self._reserved_bytes
            return counts

    def oldest_stamp(self) -> int | None:
        """The arrival stamp of the oldest record held (buffered or in flight), or None.

        Only the references are copied under the lock; the stamps are read after
        it is released, so this costs request threads a list copy, not a scan.
        """
        with self._lock:
            held = [list(records.values()) for records in self._records.values()]
            held += [list(r.values()) for b in self._draining for r in b.encoded.values()]
        return min((min(map(stamp_of, records)) for records in held if records), default=None)

    def sample_keys(self, limit: int) -> dict[str, list[str]]:
        """Up to ``limit`` buffered keys of each type (for logging what would be lost)."""
        with self._lock:
            return {kind.plural: list(self._records[kind.name])[:limit] for kind in RECORD_TYPES}

    def received(self) -> dict[str, int]:
        """How many records of each type were accepted since start (before coalescing)."""
        with self._lock:
            return {kind.plural: self._received[kind.name] for kind in RECORD_TYPES}

    def _close(self, reservation: Reservation) -> None:
        if reservation.open:
            reservation.open = False
            self._reserved -= reservation.count
            self._reserved_bytes -= reservation.nbytes

    def _merge(self, kind: RecordType, keys: Iterable[str], encoded: list[bytes]) -> None:
        """Merge encoded records into the buffer, newest stamp first (lock held)."""
        pending = self._records[kind.name]
        get = pending.get
        growth = 0
        for key, data in zip(keys, encoded, strict=True):
            present = get(key)
            if present is None:
                merged = data
            elif not kind.never_decrease:
                if stamp_of(present) > stamp_of(data):
                    continue  # what is buffered is newer
                merged = data
            else:
                merged = encode(kind.merge(orjson.loads(present), orjson.loads(data)))
            if present is not None:
                growth -= len(present)
            pending[key] = merged
            growth += len(merged)
        self._nbytes += growth

    def _count(self) -> int:
        return sum(len(records) for records in self._records.values())
