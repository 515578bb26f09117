"""Realistic session and task records, and the request bodies the load generator sends.

A task record is shaped like those of the translation back end: a UUID session,
a task id ``task-<session8>-<sheet>-<row>-<col>``, a sheet and a column, a
source text of 150 to 250 characters of mixed text (markup, placeholders,
accents, some CJK), a target text once completed, a context line, a status,
a confidence, times. Serialised with orjson, a record is about 680 bytes.

Request bodies are serialised once. To send new rows without building JSON in
the client's loop, a body holds a fixed-width token in every task id, replaced
by the request's sequence number just before sending (:func:`stamp`): each
request then carries task ids no other request carried, at the cost of one
``bytes.replace``.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

TOKEN = b"@SEQ@@"  # six bytes, replaced by a six-digit request number
TOKEN_WIDTH = len(TOKEN)

SHEETS = (
    "Dialogue",
    "Quests",
    "Items",
    "UI_Strings",
    "Skills",
    "Achievements",
    "Tutorial",
    "NPC_Barks",
)
COLUMNS = ("fr_FR", "de_DE", "es_ES", "ja_JP", "zh_CN", "ko_KR", "pt_BR", "ru_RU")
SPEAKERS = ("Harald", "Mirela", "Captain Osk", "The Archivist", "Yun", "Brother Tamsin")
PLACES = ("the Lost Forge", "Ashen Gate", "Vel'Shara", "the Salt Mines", "Kōgen Shrine")

_WORDS_TEXT = (
    "the gate opens at dawn and the caravan must leave before the storm reaches the pass "
    "bring three iron ingots to the smith collect the relic defeat the warden return to "
    "camp your reward awaits speak with the elder before nightfall the tide is turning "
    "careful traveler the bridge will not hold more than two of you at once"
)
_WORDS = tuple(_WORDS_TEXT.split())
_FRAGMENTS = (
    "{player_name}",
    "<color=#ffcc00>",
    "</color>",
    "%d",
    "{item_count}",
    "\\n",
    "—",
    "café",
    "naïve",
    "Übermut",
    "城门",
    "黎明",
    "보상",
    "¡Cuidado!",
    "«Halte»",
)
_TARGET_TEXT = (
    "la porte s'ouvre à l'aube et la caravane doit partir avant que la tempête "
    "n'atteigne le col apportez trois lingots de fer au forgeron récupérez la relique "
    "votre récompense vous attend parlez à l'ancien avant la tombée de la nuit"
)
_TARGET_WORDS = tuple(_TARGET_TEXT.split())


def _text(rng: random.Random, words: tuple[str, ...], low: int, high: int) -> str:
    """Mixed text of ``low`` to ``high`` characters: words, markup, placeholders, non-ASCII."""
    target = rng.randint(low, high)
    parts: list[str] = []
    size = 0
    while size < target:
        piece = rng.choice(_FRAGMENTS) if rng.random() < 0.12 else rng.choice(words)
        parts.append(piece)
        size += len(piece) + 1
    text = " ".join(parts)[: target - 1].strip()
    return text[0].upper() + text[1:] + "."


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_session_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def session_record(session_id: str, rng: random.Random, total_tasks: int = 1000) -> dict[str, Any]:
    name = f"{rng.choice(('chapter', 'dlc', 'patch'))}_{rng.randint(1, 40):02d}_strings.xlsx"
    return {
        "session_id": session_id,
        "filename": name,
        "file_path": f"/srv/uploads/{session_id[:8]}/{name}",
        "status": "processing",
        "game_info": {"name": "Starfall Chronicles", "genre": "RPG", "platforms": ["pc", "ps5"]},
        "llm_provider": rng.choice(("openai", "anthropic", "deepseek")),
        "metadata": {"source_lang": "en", "target_langs": list(COLUMNS[:4]), "glossary": "v12"},
        "total_tasks": total_tasks,
        "completed_tasks": 0,
        "failed_tasks": 0,
        "processing_tasks": 0,
    }


def task_record(
    session_id: str,
    row: str,
    rng: random.Random,
    status: str | None = None,
    sheet: str | None = None,
    column: str | None = None,
) -> dict[str, Any]:
    """One task; ``row`` is the row part of the task id (any text of digits)."""
    sheet = sheet or rng.choice(SHEETS)
    column = column or rng.choice(COLUMNS)
    if status is None:
        roll = rng.random()
        status = (
            "pending"
            if roll < 0.33
            else "processing"
            if roll < 0.63
            else "completed"
            if roll < 0.95
            else "failed"
        )
    started = datetime(2026, 3, 2, 9, 0, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 86_400))
    duration_ms = rng.randint(800, 9000)
    record: dict[str, Any] = {
        "task_id": f"task-{session_id[:8]}-{sheet}-{row}-{column}",
        "session_id": session_id,
        "batch_id": f"batch-{session_id[:8]}-{rng.randint(1, 400):04d}",
        "sheet_name": sheet,
        "row_index": rng.randint(2, 20_000),
        "column_name": column,
        "source_text": _text(rng, _WORDS, 150, 250),
        "target_text": None,
        "context": f"{rng.choice(SPEAKERS)}, {rng.choice(PLACES)}; max {rng.choice((40, 80))}",
        "status": status,
        "confidence": None,
        "error_message": None,
        "retry_count": 0,
        "start_time": None,
        "end_time": None,
        "duration_ms": None,
    }
    if status != "pending":
        record["start_time"] = _iso(started)
    if status == "completed":
        record["target_text"] = _text(rng, _TARGET_WORDS, 120, 210)
        record["confidence"] = round(rng.uniform(0.72, 0.99), 4)
        record["end_time"] = _iso(started + timedelta(milliseconds=duration_ms))
        record["duration_ms"] = duration_ms
    elif status == "failed":
        record["error_message"] = "provider timeout after 30 s; will retry"
        record["retry_count"] = rng.randint(1, 3)
        record["end_time"] = _iso(started + timedelta(milliseconds=duration_ms))
        record["duration_ms"] = duration_ms
    return record


def advance(record: dict[str, Any], status: str, rng: random.Random) -> dict[str, Any]:
    """The same task one step later (``processing`` or ``completed``), as the back end posts it."""
    newer = dict(record)
    newer["status"] = status
    started = datetime(2026, 3, 2, 9, 0, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 86_400))
    newer["start_time"] = record["start_time"] or _iso(started)
    if status == "completed":
        duration_ms = rng.randint(800, 9000)
        newer["target_text"] = _text(rng, _TARGET_WORDS, 120, 210)
        newer["confidence"] = round(rng.uniform(0.72, 0.99), 4)
        newer["end_time"] = _iso(started + timedelta(milliseconds=duration_ms))
        newer["duration_ms"] = duration_ms
    return newer


def tasks(
    session_ids: list[str],
    count: int,
    rng: random.Random,
    prefix: str = "",
    status: str | None = None,
) -> list[dict[str, Any]]:
    """``count`` tasks with distinct ids over ``session_ids``; ``prefix`` starts each row."""
    return [
        task_record(session_ids[i % len(session_ids)], f"{prefix}{i:06d}", rng, status)
        for i in range(count)
    ]


def body_template(session_ids: list[str], batch: int, rng: random.Random) -> bytes:
    """A serialised ``{"tasks": [...]}`` body whose task ids carry :data:`TOKEN`."""
    records = [
        task_record(session_ids[i % len(session_ids)], TOKEN.decode() + f"{i:04d}", rng)
        for i in range(batch)
    ]
    return orjson.dumps({"tasks": records})


def stamp(template: bytes, seq: int) -> bytes:
    """The body of request number ``seq`` (0 to 999,999): every task id made unique."""
    return template.replace(TOKEN, b"%06d" % seq)


def mean_record_bytes(sample: int = 2000, seed: int = 1) -> float:
    """Mean size of one serialised task record, for the report."""
    rng = random.Random(seed)
    sid = new_session_id(rng)
    records = tasks([sid], sample, rng)
    return sum(len(orjson.dumps(r)) for r in records) / sample
