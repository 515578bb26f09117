"""The two record types, their columns and how repeated updates of one row merge.

Every record is a full snapshot of its row: writing records one by one, in
arrival order, with the upsert rules of docs/DATA_MODELS.md gives the same row
as writing only ``merge(older, newer)``. That identity is what lets the buffer
coalesce updates in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


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

    def merge(self, older: Record, newer: Record) -> Record:
        """The record that stands for ``older`` followed by ``newer`` (same key)."""
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
    ),
)

RECORD_TYPES = (SESSIONS, TASKS)
