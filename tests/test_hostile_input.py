"""Hostile input against the service under gunicorn on real MariaDB/MySQL.

Numbers in JSON columns are either kept exactly or refused by name, and a 422
answer stays small however large the invalid input.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import Database
from tests.factories import new_session_id, session
from tests.gunicorn_server import API

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

QUIET = {"BUFFER_FLUSH_INTERVAL": "3600"}


def test_json_integers_beyond_64_bits_are_refused_and_64_bit_ones_kept_exactly(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(**QUIET, **mysql_env)
    big = 123456789012345678901234567890
    refused = server.post(
        f"{API}/sessions/batch", {"sessions": [session(metadata={"seed": {"value": big}})]}
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == "1 of 1 sessions are invalid; nothing was accepted."
    (error,) = refused.json()["errors"]
    assert error["field"] == "metadata"
    assert "metadata.seed.value" in error["message"]
    assert "64-bit" in error["message"]

    sid = new_session_id()
    edges = {
        "int64_max": 2**63 - 1,
        "int64_min": -(2**63),
        "uint64_max": 2**64 - 1,
        "digits_in_text": "12345678901234567890123",
        "float_like_a_big_int": 1.2345678901234568e29,
        "shortest_float": 5e-324,
        "seventeen_digits": 0.30000000000000004,
        "nested": [{"max": 2**63 - 1}],
    }
    accepted = server.post(
        f"{API}/sessions/batch", {"sessions": [session(session_id=sid, game_info=edges)]}
    )
    assert accepted.status_code == 200, accepted.text
    assert server.post(f"{API}/flush").json()["sessions_written"] == 1
    [(text,)] = mysql_db.query(
        "SELECT game_info FROM translation_sessions WHERE session_id = ?", sid
    )
    stored = json.loads(text)  # the standard library keeps integers of any size
    assert stored == edges
    assert [type(stored[k]) for k in edges] == [type(v) for v in edges.values()]


def hostile_task(size: int) -> dict[str, Any]:
    """A task whose every field is invalid, three of them strings of ``size`` characters."""
    huge = "x" * size
    return {
        "task_id": huge,
        "session_id": "not-a-uuid",
        "batch_id": "",
        "sheet_name": 5,
        "row_index": -1,
        "column_name": None,
        "source_text": " ",
        "target_text": 7,
        "context": ["x"],
        "status": huge,
        "confidence": 2,
        "error_message": {"x": 1},
        "retry_count": True,
        "start_time": huge,
        "end_time": "2040-01-01T00:00:00Z",
        "duration_ms": 1.5,
    }


def test_a_megabyte_key_invalid_on_every_field_gets_a_small_422(
    start_server: Any, mysql_env: dict[str, str]
) -> None:
    server = start_server(**QUIET, **mysql_env)
    size = 1 << 20
    response = server.post(f"{API}/tasks/batch", {"tasks": [hostile_task(size)]})
    assert response.status_code == 422
    assert len(response.content) < 16 * 1024, len(response.content)
    body = response.json()
    assert body["detail"] == "1 of 1 tasks are invalid; nothing was accepted."
    fields = {error["field"] for error in body["errors"]}
    assert fields == set(hostile_task(1))
    assert body["error_count"] == len(body["errors"])
    for error in body["errors"]:
        assert error["task_id"] == "x" * 64 + f"… ({size:,} characters)"
    messages = {error["field"]: error["message"] for error in body["errors"]}
    assert messages["task_id"] == "Longer than 64 characters."
    assert messages["start_time"] == "Not a valid datetime."
