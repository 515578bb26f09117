"""Valid session and task records for tests, with any field overridden."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

_counter = itertools.count(1)


def new_session_id() -> str:
    return str(uuid.uuid4())


def session(**fields: Any) -> dict[str, Any]:
    record = {
        "session_id": new_session_id(),
        "filename": "dialogue.xlsx",
        "file_path": "/uploads/dialogue.xlsx",
        "status": "processing",
        "game_info": {"name": "Starfall", "platforms": ["pc"]},
        "llm_provider": "openai",
        "metadata": {"source_lang": "en", "target_lang": "fr"},
        "total_tasks": 10,
        "completed_tasks": 0,
        "failed_tasks": 0,
        "processing_tasks": 0,
    }
    record.update(fields)
    return record


def task(session_id: str, **fields: Any) -> dict[str, Any]:
    n = next(_counter)
    record = {
        "task_id": f"task-{n}-{uuid.uuid4().hex[:8]}",
        "session_id": session_id,
        "batch_id": "batch-1",
        "sheet_name": "Dialogue",
        "row_index": n,
        "column_name": "text_fr",
        "source_text": "The gate opens at dawn.",
        "target_text": None,
        "context": "quest line 3",
        "status": "pending",
        "confidence": None,
        "error_message": None,
        "retry_count": 0,
        "start_time": None,
        "end_time": None,
        "duration_ms": None,
    }
    record.update(fields)
    return record
