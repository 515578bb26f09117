"""The two record types, their columns and how repeated updates of one row merge.

Every record is a full snapshot of its row, stamped on arrival with
``ingest_seq`` (microseconds since the epoch, strictly increasing within a
process). The stamp orders updates of one row wherever they meet: in the
buffer, in a journal replayed after a crash, and in the database, whose
upsert lets a record change a row only if its stamp is not older than the
row's. Writing records one by one, in any order, therefore gives the same
row as writing only ``merge(a, b)``; that identity is what lets the buffer
coalesce updates in memory and lets several processes write the same rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

log = logging.getLogger(__name__)

Record = dict[str, Any]

# The arrival stamp column, last in every record type's columns.
ORDER_COLUMN = "ingest_seq"


class ArrivalClock:
    """Strictly increasing microsecond stamps that follow the wall clock but never go back.

    A stamp is the wall-clock time of arrival in microseconds, corrected by the
    offset set with :meth:`adjust` (the database's clock minus this host's, as
    the health probe measures it, so that instances on hosts whose clocks
    disagree stamp on one common clock), or one more than the previous stamp
    when that time has not moved on (or has stepped back: NTP, a VM restored
    from a snapshot, a correction). :meth:`advance_to` raises the floor to the
    largest stamp known elsewhere (the journal, the database) so that a clock
    that stepped back across a restart still stamps every new update after the
    old ones. A backward step larger than ``step_warning_us`` is logged once
    per step.

    Thread-safe: stamps are handed out, and the offset changed, under a lock.
    """

    def __init__(
        self,
        now_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        step_warning_us: int = 1_000_000,
    ) -> None:
        self._lock = threading.Lock()
        self._now_us = now_us
        self._step_warning_us = step_warning_us
        self._offset_us = 0
        self._last = 0
        self._behind = False

    def adjust(self, offset_us: int) -> None:
        """Stamp from now on with the wall clock plus ``offset_us`` (never going back)."""
        with self._lock:
            previous, self._offset_us = self._offset_us, offset_us
        if abs(offset_us - previous) > self._step_warning_us:
            log.warning(
                "arrival stamps now follow the database's clock: this host's clock is %.3f s %s it",
                abs(offset_us) / 1e6,
                "ahead of" if offset_us < 0 else "behind",
            )

    def now_us(self) -> int:
        """The corrected wall-clock time, in microseconds since the epoch (no stamp taken)."""
        with self._lock:
            return self._now_us() + self._offset_us

    def stamps(self, count: int) -> range:
        """``count`` consecutive stamps, all newer than any handed out or known before."""
        with self._lock:
            now = self._now_us() + self._offset_us
            if now + self._step_warning_us < self._last:
                if not self._behind:
                    self._behind = True
                    log.warning(
                        "the wall clock is %.3f s behind the newest arrival stamp; "
                        "stamps continue from that stamp, in arrival order",
                        (self._last - now) / 1e6,
                    )
            else:
                self._behind = False
            first = max(now, self._last + 1)
            self._last = first + count - 1
        return range(first, first + count)

    def advance_to(self, stamp: int) -> None:
        """Never hand out a stamp at or below ``stamp`` (the newest one known elsewhere)."""
        with self._lock:
            self._last = max(self._last, stamp)

    @property
    def last(self) -> int:
        """The newest stamp handed out or known."""
        with self._lock:
            return self._last


def encode(record: Record) -> bytes:
    """A stamped record as compact JSON: the form the buffer holds and the journal writes.

    The stamp is the record's last key (records are stamped after validation,
    and decoding keeps key order), so :func:`stamp_of` can read it without
    decoding the whole record. The result is copied to its exact length:
    orjson's bytes keep its whole working buffer (about 8 KiB for a 600-byte
    record) alive.
    """
    return bytes(memoryview(orjson.dumps(record)))


class EncodableBatch(Protocol):
    """Validated records of one type, in arrival order, ready to be stamped and encoded.

    :meth:`persistence.durable.DurableBuffer.add` takes one; the typed path's
    :class:`persistence.typed.TypedBatch` and :class:`DictBatch` are the two kinds.
    """

    def __len__(self) -> int: ...

    def keys(self) -> list[str]:
        """The records' primary keys, in order."""
        ...

    def encode_stamped(self, stamps: Iterable[int]) -> list[bytes]:
        """Stamp each record (one stamp each, in order) and return their :func:`encode` form:
        compact JSON with the stamp as the last key."""
        ...


class DictBatch:
    """Records loaded as dicts (the marshmallow path, tests); stamped in place."""

    __slots__ = ("_key", "records")

    def __init__(self, kind: RecordType, records: list[Record]) -> None:
        self.records = records
        self._key = kind.key

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[str]:
        key = self._key
        return [record[key] for record in self.records]

    def encode_stamped(self, stamps: Iterable[int]) -> list[bytes]:
        for record, stamp in zip(self.records, stamps, strict=True):
            record[ORDER_COLUMN] = stamp
        return [encode(record) for record in self.records]


def stamp_of(data: bytes) -> int:
    """The arrival stamp of a record encoded by :func:`encode` (its last value)."""
    return int(data[data.rindex(b":") + 1 : -1])


@dataclass(frozen=True)
class RecordType:
    """A table the service writes: its key, its columns and its merge rule."""

    name: str
    plural: str
    table: str
    key: str
    columns: tuple[str, ...]
    json_columns: tuple[str, ...] = ()
    never_decrease: tuple[str, ...] = ()

    def merge(self, a: Record, b: Record) -> Record:
        """The record that stands for both updates of one row, in either order.

        The newer stamp wins every column, except those that never decrease; on a
        tie ``b`` wins, as the incoming row does in the database's upsert.
        """
        newer, older = (b, a) if b[ORDER_COLUMN] >= a[ORDER_COLUMN] else (a, b)
        if not self.never_decrease:
            return newer
        merged = dict(newer)
        for column in self.never_decrease:
            merged[column] = max(older[column], newer[column])
        return merged


SESSIONS = RecordType(
    name="session",
    plural="sessions",
    table="translation_sessions",
    key="session_id",
    columns=(
        "session_id",
        "filename",
        "file_path",
        "status",
        "game_info",
        "llm_provider",
        "metadata",
        "total_tasks",
        "completed_tasks",
        "failed_tasks",
        "processing_tasks",
        ORDER_COLUMN,
    ),
    json_columns=("game_info", "metadata"),
    never_decrease=("total_tasks", "completed_tasks", "failed_tasks"),
)

TASKS = RecordType(
    name="task",
    plural="tasks",
    table="translation_tasks",
    key="task_id",
    columns=(
        "task_id",
        "session_id",
        "batch_id",
        "sheet_name",
        "row_index",
        "column_name",
        "source_text",
        "target_text",
        "context",
        "status",
        "confidence",
        "error_message",
        "retry_count",
        "start_time",
        "end_time",
        "duration_ms",
        ORDER_COLUMN,
    ),
)

RECORD_TYPES = (SESSIONS, TASKS)
