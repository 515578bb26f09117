"""The buffer with its durability policy: the one place that decides what is journaled.

``buffer.durability: memory`` keeps records in the :class:`~persistence.buffer.Buffer`
only; ``journal`` also makes every accepted batch durable in the
:class:`~persistence.journal.Journal` before it enters the buffer. Either way
the flusher and the intake see the same interface:

- :meth:`DurableBuffer.add` stamps a validated batch, admits it against the
  hard limits, journals it (fsync, group commit), and only then merges it
  into the buffer. Any failure leaves the buffer as it was: a refused batch
  changes nothing, and a batch the journal could not make durable is never
  answered 2xx.
- :meth:`DurableBuffer.drain` rotates the journal, then takes everything
  buffered; the flusher owns the batch until :meth:`DurableBuffer.finish`.
- :meth:`DurableBuffer.put_back` returns records to the buffer, journaling
  them again in the current segment when asked.
- :meth:`DurableBuffer.finish` deletes the journal segments of a batch only
  when the flusher says every record of it is resolved (written, dead-lettered,
  or put back and journaled again).

Threading contract: every method may be called from any thread; the buffer and
the journal each guard their own state, and no journal I/O happens under the
buffer's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from persistence.buffer import Batch, Buffer, Reservation
from persistence.journal import (
    BATCH,
    RESTORE,
    Entry,
    FileSystem,
    Journal,
    JournalError,
    RecoveryReport,
    Ticket,
    encode_frame,
)
from persistence.records import (
    ORDER_COLUMN,
    RECORD_TYPES,
    ArrivalClock,
    DictBatch,
    EncodableBatch,
    Record,
    RecordType,
    encode,
)

log = logging.getLogger(__name__)

# Records per frame when journaling records again (adoption).
_FRAME_RECORDS = 10_000


class DurableBuffer:
    """The buffer, and the journal when ``buffer.durability`` is ``journal``."""

    def __init__(self, buffer: Buffer, clock: ArrivalClock | None = None) -> None:
        self.buffer = buffer
        self.clock = clock or ArrivalClock()
        self.journal: Journal | None = None
        self.recovered = RecoveryReport()

    # --- journal life cycle ---------------------------------------------------------------

    def open_journal(self, directory: str | Path, files: FileSystem | None = None) -> None:
        """Start journaling into ``directory`` and adopt the journals of stopped processes."""
        journal = Journal(directory, files)
        journal.open()
        self.journal = journal
        self.adopt_orphans()

    def adopt_orphans(self) -> RecoveryReport:
        """Take over the journals of processes that died: journal their records here, merge
        them into the buffer, then delete them. Safe to run at any time, from any thread."""
        found = RecoveryReport()
        if self.journal is None:
            return found
        for adoption, entries in self.journal.adopt():
            records = _newest_by_key(entries)
            # Durable here first, deleted there last: a crash in between replays both.
            for kind in RECORD_TYPES:
                for chunk in _chunks(list(records[kind.name].values()), _FRAME_RECORDS):
                    self.journal.append_durably(
                        encode_frame(RESTORE, kind, [encode(r) for r in chunk])
                    )
            for kind in RECORD_TYPES:
                newest = max((r[ORDER_COLUMN] for r in records[kind.name].values()), default=0)
                self.clock.advance_to(newest)
                self.buffer.replay(kind, list(records[kind.name].values()))
            self.journal.forget(adoption)
            found.add(adoption.report)
            log.warning(
                "adopted the journal %s of a stopped process: %d frames, %d records "
                "(%d sessions and %d tasks after merging), %d torn and %d corrupt frames skipped",
                adoption.path.name,
                adoption.report.frames,
                adoption.report.records,
                len(records["session"]),
                len(records["task"]),
                adoption.report.torn,
                adoption.report.corrupt,
            )
        self.recovered.add(found)
        return found

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    # --- intake ---------------------------------------------------------------------------

    def add(self, kind: RecordType, records: list[Record] | EncodableBatch) -> int:
        """Stamp, admit, journal and buffer ``records`` (validated, in arrival order).

        ``records`` are dicts (stamped in place) or a batch of the typed path,
        which is stamped and encoded without building a dict per record.
        All or none: raises :class:`~persistence.buffer.BufferFull` or
        :class:`~persistence.journal.JournalError` with the buffer unchanged.
        Returns how many buffered records are ready to flush.
        """
        batch = DictBatch(kind, records) if isinstance(records, list) else records
        encoded = batch.encode_stamped(self.clock.stamps(len(batch)))
        keys = batch.keys()
        reservation = self.buffer.reserve(len(encoded), sum(map(len, encoded)))
        if self.journal is None:
            return self.buffer.add(kind, keys, encoded, reservation)
        return self._add_journaled(kind, keys, encoded, reservation)

    def _add_journaled(
        self, kind: RecordType, keys: list[str], encoded: list[bytes], reservation: Reservation
    ) -> int:
        assert self.journal is not None
        ticket: Ticket | None = None
        try:
            ticket = self.journal.append(encode_frame(BATCH, kind, encoded))
            self.journal.sync(ticket)
            return self.buffer.add(kind, keys, encoded, reservation)
        finally:
            self.buffer.release(reservation)  # no-op once added
            if ticket is not None:
                self.journal.release(ticket)

    # --- flush cycle ----------------------------------------------------------------------

    def drain(self) -> Batch:
        """Rotate the journal, then take everything buffered (see :meth:`Buffer.drain`)."""
        segments = None
        if self.journal is not None:
            try:
                segments = self.journal.rotate()
            except JournalError as exc:
                # Write what is buffered anyway; without a rotation nothing is deleted.
                log.error("journal rotation failed (%s); its segments are kept", exc)
        batch = self.buffer.drain()
        batch.segments = segments
        return batch

    def put_back(
        self,
        kind: RecordType,
        records: dict[str, Record],
        *,
        waiting: bool = False,
        journal: bool = True,
    ) -> bool:
        """Return drained records to the buffer; with ``journal``, journal them again.

        Returns False when they should have been journaled and could not be: the
        flush's segments must then be kept.
        """
        if not records:
            return True
        self.buffer.restore(kind, records, waiting=waiting)
        if not journal or self.journal is None:
            return True
        try:
            for chunk in _chunks(list(records.values()), _FRAME_RECORDS):
                self.journal.append_durably(encode_frame(RESTORE, kind, [encode(r) for r in chunk]))
        except JournalError as exc:
            log.error(
                "journaling %d %s put back failed (%s); the older journal segments are kept",
                len(records),
                kind.plural,
                exc,
            )
            return False
        return True

    def finish(self, batch: Batch, resolved: bool) -> None:
        """End a flush; drop the batch's journal segments if every record is ``resolved``."""
        self.buffer.finish(batch)
        if self.journal is None or batch.segments is None or not resolved:
            return
        try:
            self.journal.checkpoint(batch.segments)
        except JournalError as exc:
            # The records are written: a replay of the old segments only writes them again.
            log.error("journal checkpoint failed (%s); older segments are kept", exc)


def _newest_by_key(entries: Iterable[Entry]) -> dict[str, dict[str, Record]]:
    """The records of ``entries`` merged by key, by arrival stamp, per record type."""
    merged: dict[str, dict[str, Record]] = {kind.name: {} for kind in RECORD_TYPES}
    for entry in entries:
        records = merged[entry.kind.name]
        for record in entry.records:
            key = record[entry.kind.key]
            present = records.get(key)
            records[key] = record if present is None else entry.kind.merge(present, record)
    return merged


def _chunks(items: list[Record], size: int) -> Iterable[list[Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
