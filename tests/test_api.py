"""The HTTP API on each driver: every test here runs on SQLite and on real MySQL/MariaDB."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from persistence.service import PersistenceService
from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import wait_for

SESSIONS_URL = "/api/v1/persistence/sessions/batch"
TASKS_URL = "/api/v1/persistence/tasks/batch"
FLUSH_URL = "/api/v1/persistence/flush"
STATS_URL = "/api/v1/persistence/stats"


def post_sessions(client: FlaskClient, *records: dict[str, Any]) -> Any:
    return client.post(SESSIONS_URL, json={"sessions": list(records)})


def post_tasks(client: FlaskClient, *records: dict[str, Any]) -> Any:
    return client.post(TASKS_URL, json={"tasks": list(records)})


def flush(client: FlaskClient) -> dict[str, Any]:
    response = client.post(FLUSH_URL)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_index_names_the_service(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    body = response.get_json()
    assert body["service"] == "Persistence Service"
    assert body["status"] == "running"
    assert body["version"]


def test_health_reports_database_and_buffer(client: FlaskClient, db: Database) -> None:
    post_tasks(client, task(new_session_id()))
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy"
    assert body["database"] == "healthy"
    assert body["database_driver"] == db.driver
    assert body["buffer"] == {"sessions_count": 0, "tasks_count": 1, "last_flush": None}


def test_batches_are_buffered_then_written_by_flush(client: FlaskClient, db: Database) -> None:
    sid = new_session_id()
    response = post_sessions(client, session(session_id=sid))
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "accepted"
    assert body["count"] == 1
    assert body["timestamp"].endswith("+00:00")
    assert post_tasks(client, task(sid), task(sid)).get_json()["count"] == 2
    assert db.count("translation_tasks") == 0  # buffered, not written yet

    result = flush(client)
    assert result["status"] == "flushed"
    assert (result["sessions_written"], result["tasks_written"]) == (1, 2)
    assert result["duration_ms"] >= 0
    assert db.count("translation_sessions") == 1
    assert db.count("translation_tasks") == 2
    assert flush(client)["tasks_written"] == 0  # nothing left


def test_text_round_trips_exactly_including_emoji_and_full_text_columns(
    client: FlaskClient, db: Database
) -> None:
    sid = new_session_id()
    longest = "€" * 21_845  # 65,535 bytes: exactly what TEXT holds
    emoji = "Ready? 😀🚀 — «Prêt» 準備"
    post_sessions(
        client,
        session(
            session_id=sid,
            filename="😀" * 255,
            game_info={"title": emoji, "nested": {"deep": [1, 2]}},
        ),
    )
    post_tasks(client, task(sid, task_id="t-emoji", source_text=longest, target_text=emoji))
    flush(client)
    source, target = db.query(
        "SELECT source_text, target_text FROM translation_tasks WHERE task_id = ?", "t-emoji"
    )[0]
    assert source == longest
    assert target == emoji
    filename, game_info = db.query(
        "SELECT filename, game_info FROM translation_sessions WHERE session_id = ?", sid
    )[0]
    assert filename == "😀" * 255
    assert '"title":"Ready? 😀🚀' in game_info.replace(": ", ":")


def test_times_are_stored_as_utc(client: FlaskClient, db: Database) -> None:
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    post_tasks(
        client,
        task(
            sid,
            task_id="timed",
            start_time="2026-03-01T10:00:00+02:00",
            end_time="2026-03-01T08:00:05.987",
        ),
    )
    flush(client)
    start, end = db.query(
        "SELECT start_time, end_time FROM translation_tasks WHERE task_id = ?", "timed"
    )[0]
    assert str(start) == "2026-03-01 08:00:00"
    assert str(end) == "2026-03-01 08:00:05"


def test_session_counters_never_decrease_and_created_at_is_kept(
    client: FlaskClient, db: Database
) -> None:
    sid = new_session_id()
    post_sessions(
        client,
        session(
            session_id=sid,
            status="processing",
            total_tasks=10,
            completed_tasks=6,
            failed_tasks=1,
            processing_tasks=3,
        ),
    )
    flush(client)
    db.execute(
        f"UPDATE translation_sessions SET created_at = '2020-01-02 03:04:05' "
        f"WHERE session_id = '{sid}'"
    )
    post_sessions(
        client,
        session(
            session_id=sid,
            status="completed",
            total_tasks=4,
            completed_tasks=2,
            failed_tasks=0,
            processing_tasks=0,
            llm_provider="anthropic",
        ),
    )
    flush(client)
    row = db.query(
        "SELECT status, total_tasks, completed_tasks, failed_tasks, processing_tasks,"
        " llm_provider, created_at FROM translation_sessions WHERE session_id = ?",
        sid,
    )[0]
    assert row[:6] == ("completed", 10, 6, 1, 0, "anthropic")
    assert str(row[6]) == "2020-01-02 03:04:05"


def test_tasks_take_the_newest_values(client: FlaskClient, db: Database) -> None:
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    post_tasks(client, task(sid, task_id="t1", status="processing", retry_count=3, confidence=0.5))
    flush(client)
    post_tasks(
        client,
        task(
            sid,
            task_id="t1",
            status="completed",
            retry_count=1,
            target_text="La porte s'ouvre à l'aube.",
            confidence=0.9876,
        ),
    )
    flush(client)
    row = db.query(
        "SELECT status, retry_count, target_text, confidence FROM translation_tasks "
        "WHERE task_id = ?",
        "t1",
    )[0]
    assert row[:3] == ("completed", 1, "La porte s'ouvre à l'aube.")
    assert float(row[3]) == pytest.approx(0.9876)


@pytest.mark.parametrize("seed", range(3))
def test_coalesced_writes_equal_one_by_one_writes(
    client: FlaskClient, db: Database, seed: int
) -> None:
    """The same update sequence, coalesced in one flush or flushed after every record."""
    import random

    rng = random.Random(seed)
    statuses = ["pending", "processing", "completed", "failed"]
    updates = []
    for _ in range(60):
        n = rng.randrange(4)
        updates.append(
            {
                "session": {
                    "total_tasks": rng.randrange(20),
                    "completed_tasks": rng.randrange(20),
                    "failed_tasks": rng.randrange(5),
                    "processing_tasks": rng.randrange(5),
                    "status": rng.choice(statuses),
                    "filename": f"f{rng.randrange(9)}.xlsx",
                },
                "task": {
                    "task_id": f"k{n}",
                    "status": rng.choice(statuses),
                    "retry_count": rng.randrange(5),
                    "target_text": rng.choice([None, "x", "y"]),
                    "confidence": rng.choice([None, 0.25, 1]),
                },
            }
        )
    coalesced, one_by_one = new_session_id(), new_session_id()
    for sid, flush_each in ((coalesced, False), (one_by_one, True)):
        for update in updates:
            post_sessions(client, session(session_id=sid, **update["session"]))
            tid = f"{sid[:8]}-{update['task']['task_id']}"
            post_tasks(client, task(sid, **{**update["task"], "task_id": tid}, row_index=1))
            if flush_each:
                flush(client)
        flush(client)

    def rows(sid: str) -> tuple[Any, ...]:
        s = db.query(
            "SELECT filename, status, total_tasks, completed_tasks, failed_tasks, "
            "processing_tasks FROM translation_sessions WHERE session_id = ?",
            sid,
        )
        t = db.query(
            "SELECT task_id, status, retry_count, target_text, confidence "
            "FROM translation_tasks WHERE session_id = ? ORDER BY task_id",
            sid,
        )
        return s, [(tid[9:], *rest) for tid, *rest in t]

    assert rows(coalesced) == rows(one_by_one)
    assert len(rows(coalesced)[1]) >= 1


def test_a_task_before_its_session_waits_and_lands_once_the_session_does(
    client: FlaskClient, db: Database
) -> None:
    sid = new_session_id()
    post_tasks(client, task(sid, task_id="early"))
    result = flush(client)
    assert (result["tasks_written"], result["tasks_waiting"]) == (0, 1)
    assert db.count("translation_tasks") == 0
    assert client.get(STATS_URL).get_json()["buffer"]["tasks_waiting_for_session"] == 1

    post_sessions(client, session(session_id=sid))
    result = flush(client)
    assert (result["sessions_written"], result["tasks_written"]) == (1, 1)
    assert db.query("SELECT session_id FROM translation_tasks WHERE task_id = ?", "early") == [
        (sid,)
    ]


def test_a_task_whose_session_never_comes_is_dead_lettered_after_the_timeout(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(buffer={"flush_interval": 3600, "orphan_task_timeout": 0})
    client = app.test_client()
    sid = new_session_id()
    post_tasks(client, task(sid, task_id="orphan"))
    result = flush(client)
    assert result["dead_lettered"] == 1
    rows = db.query(
        "SELECT record_type, record_key, payload, error_message FROM persistence_dead_letters"
    )
    assert rows[0][:2] == ("task", "orphan")
    assert '"task_id":"orphan"' in rows[0][2].replace(": ", ":")
    assert sid in rows[0][3]
    assert client.get(STATS_URL).get_json()["dead_letters"] == {
        "sessions": 0,
        "tasks": 1,
        "by_reason": {"session_not_found": 1},
    }


def test_a_poison_row_is_dead_lettered_and_the_rest_of_the_batch_lands(
    client: FlaskClient, db: Database
) -> None:
    db.add_poison_trigger()
    try:
        sid = new_session_id()
        post_sessions(client, session(session_id=sid))
        records = [task(sid) for _ in range(1000)]
        records[617]["source_text"] = "poison"
        post_tasks(client, *records)
        result = flush(client)
        assert (result["tasks_written"], result["dead_lettered"]) == (999, 1)
        assert db.count("translation_tasks") == 999
        rows = db.query("SELECT record_key, error_message FROM persistence_dead_letters")
        assert rows[0][0] == records[617]["task_id"]
        assert "poison row" in rows[0][1]
    finally:
        db.execute("DROP TRIGGER poison")


def test_stats_describe_buffer_flushes_and_totals(client: FlaskClient) -> None:
    sid = new_session_id()
    before = client.get(STATS_URL).get_json()
    assert before["flush_info"]["last_flush_time"] is None
    assert before["performance"]["total_flush_count"] == 0
    post_sessions(client, session(session_id=sid))
    post_tasks(client, task(sid, task_id="a"), task(sid, task_id="a"), task(sid))
    stats = client.get(STATS_URL).get_json()
    assert stats["buffer"]["sessions_count"] == 1
    assert stats["buffer"]["tasks_count"] == 2  # the two updates of "a" coalesced
    assert stats["buffer"]["total_count"] == 3
    assert stats["buffer"]["capacity"] == 100_000
    assert stats["buffer"]["usage_percent"] == round(100 * 3 / 100_000, 2)
    flush(client)
    stats = client.get(STATS_URL).get_json()
    assert stats["buffer"]["total_count"] == 0
    info, perf = stats["flush_info"], stats["performance"]
    assert info["last_flush_time"] is not None
    assert info["next_flush_time"] is not None
    assert info["flush_count_today"] == 1
    assert info["average_flush_duration_ms"] > 0
    assert perf["total_sessions_written"] == 1
    assert perf["total_tasks_written"] == 2
    assert perf["total_flush_count"] == 1
    assert perf["average_batch_size"] == 3
    assert perf["tasks_received"] == 3
    assert perf["uptime_seconds"] > 0


def test_eight_concurrent_clients_lose_nothing(
    client: FlaskClient, db: Database, app: Flask
) -> None:
    sid = new_session_id()
    post_sessions(client, session(session_id=sid, completed_tasks=0))
    errors: list[Any] = []

    def writer(n: int) -> None:
        own = app.test_client()
        for i in range(40):
            response = own.post(
                TASKS_URL,
                json={"tasks": [task(sid, task_id=f"c{n}-{j}", retry_count=i) for j in range(5)]},
            )
            if response.status_code != 200:
                errors.append(response.get_json())
            own.post(
                SESSIONS_URL,
                json={"sessions": [session(session_id=sid, completed_tasks=n * 100 + i)]},
            )
            if i % 13 == 0:
                own.post(FLUSH_URL)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flush(client)
    assert errors == []
    assert db.count("translation_tasks") == 40
    assert db.query("SELECT MIN(retry_count), MAX(retry_count) FROM translation_tasks") == [
        (39, 39)
    ]
    assert db.query("SELECT completed_tasks FROM translation_sessions") == [(739,)]


def test_size_trigger_flushes_without_blocking_the_request(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(buffer={"flush_interval": 3600, "max_buffer_size": 10})
    client = app.test_client()
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    assert post_tasks(client, *[task(sid) for _ in range(8)]).status_code == 200
    time.sleep(0.3)
    assert db.count("translation_tasks") == 0  # 9 records buffered: below the trigger
    post_tasks(client, task(sid))  # the 10th record
    assert wait_for(lambda: db.count("translation_tasks") == 9)


def test_interval_flush_writes_without_being_asked(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(buffer={"flush_interval": 0.5})
    client = app.test_client()
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    post_tasks(client, task(sid))
    assert wait_for(lambda: db.count("translation_tasks") == 1)
    # The flush is counted when it ends, a moment after its last commit.
    assert wait_for(
        lambda: client.get(STATS_URL).get_json()["performance"]["total_flush_count"] >= 1
    )


def test_stop_writes_everything_and_dead_letters_tasks_still_waiting(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(start=False)
    service: PersistenceService = app.extensions["persistence"]
    service.start()
    client = app.test_client()
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    post_tasks(client, task(sid), task(new_session_id(), task_id="lonely"))
    service.stop()
    assert db.count("translation_sessions") == 1
    assert db.count("translation_tasks") == 1
    assert db.query("SELECT record_key FROM persistence_dead_letters") == [("lonely",)]


# --- refusals: every one is JSON {"detail": ...} and changes nothing ---------------------


def assert_refused(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    for word in words:
        assert word in body["detail"]
    return body


def assert_nothing_buffered(client: FlaskClient) -> None:
    assert client.get(STATS_URL).get_json()["buffer"]["total_count"] == 0


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{not json", ("not valid JSON",)),
        (b"", ("empty",)),
        (b"[1, 2]", ("JSON object", "array")),
        (b'"tasks"', ("JSON object", "string")),
        (b'{"sessions": []}', ('lacks the "tasks" list',)),
        (b'{"tasks": {"task_id": "x"}}', ("must be a list", "object")),
        (b'{"tasks": null}', ("must be a list", "null")),
    ],
)
def test_malformed_bodies_get_400(client: FlaskClient, data: bytes, words: tuple[str, ...]) -> None:
    response = client.post(TASKS_URL, data=data, content_type="application/json")
    assert_refused(response, 400, *words)
    assert_nothing_buffered(client)


def test_wrong_content_type_gets_415(client: FlaskClient) -> None:
    response = client.post(TASKS_URL, data='{"tasks": []}', content_type="text/plain")
    assert_refused(response, 415, "application/json", "text/plain")
    response = client.post(SESSIONS_URL, data='{"sessions": []}')
    assert_refused(response, 415, "application/json")


def test_a_body_over_the_limit_gets_413(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(service={"max_request_bytes": 2048}).test_client()
    body = {"tasks": [task(new_session_id(), source_text="x" * 3000)]}
    response = client.post(TASKS_URL, json=body)
    assert_refused(response, 413, "2048")
    assert_nothing_buffered(client)


def test_too_many_records_get_422(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(buffer={"max_batch_size": 3, "flush_interval": 3600}).test_client()
    sid = new_session_id()
    body = assert_refused(post_tasks(client, *[task(sid) for _ in range(4)]), 422, "at most 3")
    assert body["errors"][0]["field"] == "tasks"
    assert post_tasks(client, *[task(sid) for _ in range(3)]).status_code == 200


def test_one_invalid_record_refuses_the_whole_batch_and_says_where(client: FlaskClient) -> None:
    sid = new_session_id()
    good = task(sid)
    bad = task(sid, task_id="bad-1", status="done", row_index=-1)
    body = assert_refused(
        post_tasks(client, good, bad, "oops"),
        422,
        "2 of 3 tasks are invalid",
        "nothing was accepted",
    )
    assert {(e["index"], e["field"]) for e in body["errors"]} == {
        (1, "status"),
        (1, "row_index"),
        (2, None),
    }
    status_error = next(e for e in body["errors"] if e["field"] == "status")
    assert status_error["task_id"] == "bad-1"
    assert "pending" in status_error["message"]
    assert_nothing_buffered(client)


def test_unknown_paths_and_methods_answer_json(client: FlaskClient) -> None:
    assert_refused(client.get("/api/v1/persistence/nothing"), 404, "No such endpoint")
    response = client.get(FLUSH_URL)
    assert_refused(response, 405, "POST")
    assert "POST" in response.headers["Allow"]
    assert_refused(client.delete("/health"), 405)


def test_a_full_buffer_refuses_with_503_and_loses_nothing_accepted(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(
        buffer={
            "flush_interval": 3600,
            "max_buffer_size": 1000,
            "max_batch_size": 10,
            "hard_limit": 1010,
        },
        start=False,
    )
    client = app.test_client()
    sid = new_session_id()
    assert post_sessions(client, session(session_id=sid)).status_code == 200
    accepted = []
    for _ in range(100):
        batch = [task(sid) for _ in range(10)]
        assert post_tasks(client, *batch).status_code == 200
        accepted += [t["task_id"] for t in batch]
    response = post_tasks(client, *[task(sid) for _ in range(10)])  # 1011 > 1010
    body = assert_refused(response, 503, "hard limit", "Retry later")
    assert int(response.headers["Retry-After"]) >= 1
    assert body["retry_after"] == int(response.headers["Retry-After"])
    stats = client.get(STATS_URL).get_json()
    assert stats["buffer"]["total_count"] == 1001  # nothing of the refused batch
    assert stats["refused"]["buffer_full"] == {"batches": 1, "records": 10}

    assert flush(client)["tasks_written"] == 1000
    landed = {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(accepted)
    assert post_tasks(client, task(sid)).status_code == 200  # room again


def test_every_refusal_is_counted_by_reason(app_factory: Callable[..., Flask]) -> None:
    client = app_factory(service={"max_request_bytes": 4096}, start=False).test_client()
    sid = new_session_id()
    client.post(TASKS_URL, data=b"{", content_type="application/json")
    client.post(TASKS_URL, data=b"{}", content_type="text/plain")
    client.post(TASKS_URL, json={"tasks": [task(sid, source_text="x" * 5000)]})
    post_tasks(client, task(sid, status="nope"), task(sid))
    post_tasks(client, task(sid))
    refused = client.get(STATS_URL).get_json()["refused"]
    assert refused["malformed"] == {"batches": 1, "records": 0}
    assert refused["unsupported_media_type"] == {"batches": 1, "records": 0}
    assert refused["too_large"] == {"batches": 1, "records": 0}
    assert refused["invalid"] == {"batches": 1, "records": 2}
    assert refused["buffer_full"] == {"batches": 0, "records": 0}


def test_the_deepest_json_accepted_is_written(client: FlaskClient, db: Database) -> None:
    deepest: dict[str, Any] = {"leaf": [1]}
    for _ in range(29):
        deepest = {"k": deepest}  # 31 levels with the innermost list
    sid = new_session_id()
    assert post_sessions(client, session(session_id=sid, game_info=deepest)).status_code == 200
    too_deep = {"k": deepest}
    assert post_sessions(client, session(game_info=too_deep)).status_code == 422
    assert flush(client)["dead_lettered"] == 0
    assert db.count("translation_sessions") == 1


def test_tables_from_before_arrival_stamps_get_the_column_even_without_create_tables(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    from persistence.store.dialects import split_statements, sql_file

    for table in ("persistence_dead_letters", "translation_tasks", "translation_sessions"):
        db.execute(f"DROP TABLE IF EXISTS {table}")
    ddl = sql_file("sqlite.sql" if db.driver == "sqlite" else "mysql.sql")
    for statement in split_statements(ddl):
        old = "\n".join(line for line in statement.splitlines() if "ingest_seq" not in line)
        db.execute(old)
    client = app_factory(
        database={"create_tables": False}, buffer={"flush_interval": 3600}
    ).test_client()
    sid = new_session_id()
    post_sessions(client, session(session_id=sid))
    post_tasks(client, task(sid))
    assert flush(client)["tasks_written"] == 1
    assert db.query("SELECT ingest_seq > 0 FROM translation_tasks") == [(1,)]
