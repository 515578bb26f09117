"""Replaying dead letters: records the database refused, or whose session never came.

Replay writes each dead letter's record with the same upsert as a flush,
sessions before tasks, one record per statement, and deletes the dead
letter once its record is written. A task whose session is still missing,
or a record the database refuses again, stays, with its attempts counted
and its error updated. Running it twice is safe: a replayed dead letter is
gone, and the records' arrival stamps keep a replayed record from
overwriting a newer update of the same row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from persistence.records import ORDER_COLUMN, RECORD_TYPES, SESSIONS, TASKS, Record, RecordType
from persistence.store import Store, StoreError

log = logging.getLogger(__name__)
_KINDS = {kind.name: kind for kind in RECORD_TYPES}


@dataclass
class ReplayReport:
    replayed: list[str] = field(default_factory=list)
    still_waiting: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def decode_payload(kind: RecordType, payload: str) -> Record:
    """The record a dead letter holds, with every column of its table."""
    data = orjson.loads(payload)
    record = {column: data.get(column) for column in kind.columns}
    record[ORDER_COLUMN] = record[ORDER_COLUMN] or 0
    return record


def replay(store: Store, ids: Sequence[int] = (), record_type: str | None = None) -> ReplayReport:
    """Write dead letters back (all, or those with ``ids``); see the module docstring."""
    report = ReplayReport()
    letters = store.fetch_dead_letters(record_type=record_type, ids=ids)
    order = {SESSIONS.name: 0, TASKS.name: 1}
    for letter in sorted(letters, key=lambda row: (order.get(row["record_type"], 2), row["id"])):
        _replay_one(store, letter, report)
    return report


def _replay_one(store: Store, letter: dict[str, Any], report: ReplayReport) -> None:
    label = f"{letter['record_type']} {letter['record_key']} (dead letter {letter['id']})"
    kind = _KINDS.get(letter["record_type"])
    if kind is None:
        report.failed.append((label, "unknown record type"))
        return
    record = decode_payload(kind, letter["payload"])
    if kind is TASKS and not store.existing_sessions([record["session_id"]]):
        report.still_waiting.append(label)
        return
    try:
        store.upsert(kind, [record])
    except StoreError as exc:
        if not exc.row_error:
            raise  # the database is unreachable: stop, nothing is lost
        store.note_dead_letter_failure(letter["id"], exc)
        report.failed.append((label, str(exc)))
        return
    store.remove_dead_letter(letter["id"])
    report.replayed.append(label)
    log.info("replayed %s", label)
