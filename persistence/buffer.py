"""The in-memory buffer: bounded, keyed by primary key, coalescing repeated updates.

Records are kept as their compact JSON encoding (``orjson`` bytes): less
than half the memory of a dict, an exact size for the byte limit, and the
very bytes the journal writes.

Threading contract
------------------
One ``Buffer`` is shared by every request thread and the flusher of a
worker process. Every public method takes ``self._lock`` for dictionary
work only (O(records in the call)) and, in journal mode, for appending to
the journal's page cache, which keeps the journal in the same order as the
buffer's changes. Nothing waits for a disk or the database under the lock:
the journal's fsync happens after the lock is released, and the flusher
takes records out with :meth:`drain`, writes them without the lock, puts
back what was not written with :meth:`restore` and ends with :meth:`finish`.

Records taken by :meth:`drain` stay counted against the hard limits
("in flight") until :meth:`finish`, so memory stays bounded while a slow or
failing flush holds a batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from persistence.journal import BATCH, RESTORE, Entry, Journal, encode_frame
from persistence.records import ORDER_COLUMN, RECORD_TYPES, ArrivalClock, Record, RecordType

log = logging.getLogger(__name__)


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
class Batch:
    """What one :meth:`Buffer.drain` took out: encoded records by type, then by key.

    ``waiting`` holds the keys of tasks that were found waiting for their
    session; ``segment`` is the last journal segment the batch's records
    can be in.
    """

    encoded: dict[str, dict[str, bytes]] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    nbytes: int = 0
    segment: int = 0

    def of(self, kind: RecordType) -> dict[str, Record]:
        """The records of ``kind``, decoded, by key."""
        return {key: orjson.loads(data) for key, data in self.encoded[kind.name].items()}

    def __len__(self) -> int:
        return sum(len(records) for records in self.encoded.values())


class Buffer:
    """Bounded, thread-safe, coalescing store of records waiting to be written."""

    def __init__(
        self, hard_limit: int, hard_limit_bytes: int, journal: Journal | None = None
    ) -> None:
        self.hard_limit = hard_limit
        self.hard_limit_bytes = hard_limit_bytes
        self.journal = journal
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, bytes]] = {kind.name: {} for kind in RECORD_TYPES}
        self._nbytes = 0
        self._waiting: set[str] = set()
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._received = {kind.name: 0 for kind in RECORD_TYPES}
        self._clock = ArrivalClock()
        # Set when records put back could not be journaled: keep the old segments.
        self._journal_behind = False

    def add(self, kind: RecordType, records: list[Record]) -> int:
        """Stamp ``records`` (validated, in arrival order) and buffer them, all or none.

        In journal mode, returns only once the batch is on disk. Returns how
        many buffered records are ready to flush (tasks waiting for their
        session are not counted: a flush cannot write them). Raises
        :class:`BufferFull` when the batch would pass a hard limit, and
        ``OSError`` when the journal cannot be written (nothing kept then).
        """
        dumps = orjson.dumps
        for record, stamp in zip(records, self._clock.stamps(len(records)), strict=True):
            record[ORDER_COLUMN] = stamp
        # bytes(memoryview(...)) is _compact inlined: this loop runs for every record.
        encoded = [bytes(memoryview(dumps(record))) for record in records]
        incoming = sum(map(len, encoded))
        frame = encode_frame(BATCH, kind, encoded) if self.journal else b""
        with self._lock:
            self._check_limits(len(records), incoming)
            sequence = self.journal.write(frame) if self.journal else 0
            # Fresh stamps are the newest, so an add can skip comparing them.
            self._merge(kind, (r[kind.key] for r in records), encoded, fresh=True)
            self._received[kind.name] += len(records)
            ready = self._count() - len(self._waiting)
        if self.journal:
            self.journal.sync(sequence)
        return ready

    def drain(self) -> Batch:
        """Take out everything buffered; it stays counted as in flight until :meth:`finish`."""
        with self._lock:
            batch = Batch(self._records, self._waiting, self._nbytes)
            if self.journal:
                batch.segment = self.journal.rotate()
            self._records = {kind.name: {} for kind in RECORD_TYPES}
            self._waiting = set()
            self._nbytes = 0
            self._in_flight += len(batch)
            self._in_flight_bytes += batch.nbytes
            return batch

    def restore(
        self,
        kind: RecordType,
        records: dict[str, Record],
        waiting: bool = False,
    ) -> None:
        """Put back drained records that were not written; updates that came since win.

        ``waiting``: the records are tasks waiting for their session. If the journal
        cannot be written, the records are still put back, and the next :meth:`finish`
        keeps the old journal segments that hold them.
        """
        if not records:
            return
        encoded = [_compact(orjson.dumps(record)) for record in records.values()]
        frame = encode_frame(RESTORE, kind, encoded) if self.journal else b""
        with self._lock:
            if self.journal:
                try:
                    self.journal.write(frame)
                except OSError as exc:
                    self._journal_behind = True
                    log.error(
                        "journal write failed while putting %d records back (%s); "
                        "keeping the older journal segments",
                        len(records),
                        exc,
                    )
            self._merge(kind, records, encoded)
            if waiting:
                self._waiting.update(records)

    def finish(self, batch: Batch) -> None:
        """End the flush of ``batch``: stop counting it, drop its journal segments.

        Records put back with :meth:`restore` are in the journal's current
        segment by now, so the older segments can go.
        """
        with self._lock:
            self._in_flight -= len(batch)
            self._in_flight_bytes -= batch.nbytes
            checkpoint = self.journal is not None and not self._journal_behind
            self._journal_behind = False
        if checkpoint:
            try:
                self.journal.checkpoint(batch.segment)
            except OSError as exc:
                # The old segments stay; their records are written, so a replay only
                # writes them again.
                log.error("journal checkpoint failed (%s); older segments are kept", exc)

    def replay(self, entry: Entry) -> None:
        """Apply one journal entry at start (no limits, no journal write)."""
        encoded = [_compact(orjson.dumps(record)) for record in entry.records]
        keys = [record[entry.kind.key] for record in entry.records]
        with self._lock:
            self._merge(entry.kind, keys, encoded)

    def snapshot_to_journal(self) -> None:
        """Write everything buffered into the journal as restore frames, durably."""
        if not self.journal:
            return
        with self._lock:
            for kind in RECORD_TYPES:
                encoded = list(self._records[kind.name].values())
                if encoded:
                    self.journal.write(encode_frame(RESTORE, kind, encoded))
        self.journal.sync_all()

    def counts(self) -> dict[str, int]:
        """Buffered records by type, ``in_flight`` and ``waiting`` (tasks whose session is
        not in the database yet), bytes held, read in one consistent moment."""
        with self._lock:
            counts = {kind.plural: len(self._records[kind.name]) for kind in RECORD_TYPES}
            counts["in_flight"] = self._in_flight
            counts["waiting"] = len(self._waiting)
            counts["bytes"] = self._nbytes + self._in_flight_bytes
            return counts

    def sample_keys(self, limit: int) -> dict[str, list[str]]:
        """Up to ``limit`` buffered keys of each type (for logging what would be lost)."""
        with self._lock:
            return {kind.plural: list(self._records[kind.name])[:limit] for kind in RECORD_TYPES}

    def received(self) -> dict[str, int]:
        """How many records of each type were accepted since start (before coalescing)."""
        with self._lock:
            return {kind.plural: self._received[kind.name] for kind in RECORD_TYPES}

    def _merge(
        self, kind: RecordType, keys: Iterable[str], encoded: list[bytes], fresh: bool = False
    ) -> None:
        """Merge encoded records into the buffer (lock held). ``fresh``: the records were
        just stamped, so they are newer than anything buffered."""
        pending = self._records[kind.name]
        get = pending.get
        replace_only = fresh and not kind.never_decrease
        growth = 0
        for key, data in zip(keys, encoded, strict=True):
            present = get(key)
            if present is None:
                merged = data
            elif replace_only:
                merged = data
                growth -= len(present)
            else:
                merged = _compact(
                    orjson.dumps(kind.merge(orjson.loads(present), orjson.loads(data)))
                )
                growth -= len(present)
            pending[key] = merged
            growth += len(merged)
        self._nbytes += growth

    def _check_limits(self, count: int, nbytes: int) -> None:
        held = self._count() + self._in_flight
        if held + count > self.hard_limit:
            raise BufferFull("records", held, count, self.hard_limit)
        held_bytes = self._nbytes + self._in_flight_bytes
        if held_bytes + nbytes > self.hard_limit_bytes:
            raise BufferFull("bytes", held_bytes, nbytes, self.hard_limit_bytes)

    def _count(self) -> int:
        return sum(len(records) for records in self._records.values())


def _compact(data: bytes) -> bytes:
    """A copy of exactly ``len(data)`` bytes.

    orjson returns bytes whose allocation keeps its whole working buffer (about
    8 KiB for a 600-byte record); copying cuts a buffered record's memory ~10x.
    """
    return bytes(memoryview(data))
