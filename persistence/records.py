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

import threading
import time
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]

# The arrival stamp column, last in every record type's columns.
ORDER_COLUMN = "ingest_seq"


class ArrivalClock:
    """Strictly increasing microsecond stamps (wall clock, never repeating in a process).

    Thread-safe: stamps are handed out under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def stamps(self, count: int) -> range:
        """``count`` consecutive stamps, all newer than any handed out before."""
        with self._lock:
            first = max(time.time_ns() // 1000, self._last + 1)
            self._last = first + count - 1
        return range(first, first + count)


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

        The newer stamp wins every column, except those that never decrease.
        """
        newer, older = (a, b) if a[ORDER_COLUMN] >= b[ORDER_COLUMN] else (b, a)
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
