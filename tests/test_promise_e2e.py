"""The promise under database faults, tried from outside: the service under gunicorn on
real MariaDB, broken the way production breaks it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import requests

from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

QUIET = {
    "BUFFER_FLUSH_INTERVAL": "3600",
    "BUFFER_MAX_SIZE": "100000",
    "BUFFER_HARD_LIMIT": "200000",
}


def flush(server: Server) -> requests.Response:
    return requests.post(server.url + f"{API}/flush", timeout=60)


def test_a_flush_that_fails_after_writing_sessions_counts_them(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(**QUIET, **mysql_env)
    # Every task write now fails the way a deadlock does (transient: retried later).
    mysql_db.execute(
        "CREATE TRIGGER tasks_deadlock BEFORE INSERT ON translation_tasks FOR EACH ROW "
        "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'deadlock'"
    )
    try:
        sid = new_session_id()
        assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
        assert server.post(f"{API}/tasks/batch", {"tasks": [task(sid), task(sid)]}).ok
        failed = flush(server)
        assert failed.status_code == 503
        body = failed.json()
        assert (body["sessions_written"], body["tasks_written"], body["tasks_buffered"]) == (
            1,
            0,
            2,
        )
        assert mysql_db.query(
            "SELECT COUNT(*) FROM translation_sessions WHERE session_id = ?", sid
        ) == [(1,)]
        performance = server.get(f"{API}/stats").json()["performance"]
        assert performance["total_sessions_written"] == 1
    finally:
        mysql_db.execute("DROP TRIGGER tasks_deadlock")
    assert flush(server).json()["tasks_written"] == 2
    assert server.get(f"{API}/stats").json()["performance"]["total_tasks_written"] == 2


def test_a_record_too_large_for_the_server_is_dead_lettered_and_blocks_nothing(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    """max_allowed_packet is 16 MiB: a 20 MB value cannot be sent in any statement.

    The API would refuse such a record (database.max_record_bytes); here the limit is
    set far above the server's, as if the server's packet size had been lowered after
    the service started, so the record gets in and the flusher must cope with it.
    """
    big = 40 * 1024 * 1024
    server = start_server(
        **QUIET,
        SERVICE_MAX_REQUEST_BYTES=str(big),
        BUFFER_HARD_LIMIT_BYTES=str(4 * big),
        DB_MAX_RECORD_BYTES=str(1024**3),
        BUFFER_ISOLATE_AFTER_FAILURES="2",
        BUFFER_RETRY_BACKOFF_INITIAL="0.05",
        **mysql_env,
    )
    sid, huge_sid = new_session_id(), new_session_id()
    huge = session(session_id=huge_sid, metadata={"notes": "x" * 20_000_000})
    body = orjson.dumps({"sessions": [session(session_id=sid), huge]})
    answer = requests.post(
        server.url + f"{API}/sessions/batch",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert server.post(f"{API}/tasks/batch", {"tasks": [task(sid) for _ in range(20)]}).ok

    def settled() -> bool:
        return flush(server).status_code == 200 and mysql_db.count("translation_tasks") == 20

    assert wait_for(settled, timeout=60), server.output()[-3000:]
    assert {row[0] for row in mysql_db.query("SELECT session_id FROM translation_sessions")} == {
        sid
    }
    [(key, payload)] = mysql_db.query("SELECT record_key, payload FROM persistence_dead_letters")
    assert key == huge_sid
    assert "too large to keep in a dead letter" in payload
    health = server.get("/health")
    assert health.status_code == 200, health.text
    buffer = health.json()["buffer"]
    assert (buffer["sessions_count"], buffer["tasks_count"]) == (0, 0)


def test_a_record_larger_than_the_server_takes_is_refused_at_the_api(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    """4.5 million quotes: 9 MB of JSON body, over 16 MiB once escaped into SQL."""
    server = start_server(**QUIET, **mysql_env)
    [(packet,)] = mysql_db.query("SELECT @@max_allowed_packet")
    limit = int(packet) - 64 * 1024
    sid = new_session_id()
    bad = session(session_id=sid, metadata={"notes": '"' * 4_500_000})
    body = orjson.dumps({"sessions": [session(), bad]})
    assert len(body) < 10 * 1024 * 1024
    answer = requests.post(
        server.url + f"{API}/sessions/batch",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    assert (error["index"], error["session_id"]) == (1, sid)
    assert "metadata" in error["message"]
    assert f"{limit:,}" in error["message"]
    stats = server.get(f"{API}/stats").json()
    assert stats["database"]["max_record_bytes"] == limit
    assert stats["buffer"]["sessions_count"] == 0  # nothing of the batch was kept
