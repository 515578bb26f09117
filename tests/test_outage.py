"""Database outages through a fault-injecting proxy: nothing accepted is lost, /health tells."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from persistence import create_app
from tests.conftest import Database, MysqlServer, make_settings
from tests.factories import new_session_id, session, task
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.mysql

TASKS_URL = "/api/v1/persistence/tasks/batch"
SESSIONS_URL = "/api/v1/persistence/sessions/batch"
FLUSH_URL = "/api/v1/persistence/flush"
STATS_URL = "/api/v1/persistence/stats"


@pytest.fixture
def proxy(mysql_server: MysqlServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(mysql_server.host, mysql_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_app(
    tmp_path: Path, mysql_server: MysqlServer, mysql_database: str, proxy: FaultProxy
) -> Iterator[tuple[Flask, Database]]:
    database = {
        "driver": "mysql",
        "host": "127.0.0.1",
        "port": proxy.port,
        "user": mysql_server.user,
        "password": mysql_server.password,
        "database": mysql_database,
        "connect_timeout": 1,
        "read_timeout": 2,
        "write_timeout": 2,
    }
    app = create_app(
        make_settings(
            tmp_path,
            database=database,
            buffer={"flush_interval": 3600},
            health={"check_interval": 0.5},
        )
    )
    service = app.extensions["persistence"]
    service.start()
    direct = Database("mysql", {"database": mysql_database}, mysql_server)
    for table in ("translation_tasks", "translation_sessions"):
        direct.execute(f"DELETE FROM {table}")
    yield app, direct
    proxy.set_mode("pass")
    service.stop()


def wait_for_status(client, status: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    code = client.get("/health").status_code
    while code != status and time.monotonic() < deadline:
        time.sleep(0.1)
        code = client.get("/health").status_code
    return code


def test_records_posted_during_an_outage_land_afterwards(
    proxied_app: tuple[Flask, Database], proxy: FaultProxy
) -> None:
    app, db = proxied_app
    client = app.test_client()
    sid = new_session_id()
    assert (
        client.post(SESSIONS_URL, json={"sessions": [session(session_id=sid)]}).status_code == 200
    )
    proxy.set_mode("cut")
    ids = []
    for _ in range(5):
        batch = [task(sid) for _ in range(20)]
        ids += [t["task_id"] for t in batch]
        assert client.post(TASKS_URL, json={"tasks": batch}).status_code == 200
    response = client.post(FLUSH_URL)
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "error"
    assert "stay buffered" in body["detail"]
    assert body["tasks_buffered"] == 100
    assert "Retry-After" in response.headers
    assert wait_for_status(client, 503) == 503
    assert client.get("/health").get_json()["database"] == "unhealthy"

    proxy.set_mode("pass")
    assert wait_for_status(client, 200) == 200
    # The probe that saw the database back has ended the backoff and started a flush
    # itself; this one writes whatever that one has not.
    response = client.post(FLUSH_URL)
    assert response.status_code == 200, response.get_json()
    landed = {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)
    assert client.get(STATS_URL).get_json()["performance"]["total_tasks_written"] == 100


def test_health_answers_within_a_second_while_the_database_stalls(
    proxied_app: tuple[Flask, Database], proxy: FaultProxy
) -> None:
    app, _ = proxied_app
    client = app.test_client()
    assert client.get("/health").status_code == 200
    proxy.set_mode("stall")
    slowest = 0.0
    deadline = time.monotonic() + 4
    codes = set()
    while time.monotonic() < deadline:
        started = time.monotonic()
        codes.add(client.get("/health").status_code)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.1)
    assert slowest < 1.0
    assert 503 in codes


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def service_log() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("persistence")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def build_app(
    tmp_path: Path, mysql_server: MysqlServer, database: str, port: int, **buffer: object
) -> Flask:
    settings = {
        "driver": "mysql",
        "host": "127.0.0.1",
        "port": port,
        "user": mysql_server.user,
        "password": mysql_server.password,
        "database": database,
        "connect_timeout": 1,
        "read_timeout": 2,
        "write_timeout": 2,
    }
    return create_app(
        make_settings(tmp_path, database=settings, buffer={"flush_interval": 3600, **buffer})
    )


def test_memory_mode_names_what_is_lost_when_the_database_is_down_at_shutdown(
    tmp_path: Path,
    mysql_server: MysqlServer,
    mysql_database: str,
    proxy: FaultProxy,
    service_log: Collect,
) -> None:
    app = build_app(tmp_path, mysql_server, mysql_database, proxy.port)
    service = app.extensions["persistence"]
    service.start()
    sid = new_session_id()
    tasks = [task(sid) for _ in range(3)]
    app.test_client().post(TASKS_URL, json={"tasks": tasks})
    proxy.set_mode("cut")
    service.stop()
    [line] = [line for line in service_log.lines if "LOST" in line]
    assert "0 sessions and 3 tasks could not be written and are LOST" in line
    assert all(t["task_id"] in line for t in tasks)


def test_journal_mode_keeps_records_for_the_next_start_when_the_database_is_down(
    tmp_path: Path,
    mysql_server: MysqlServer,
    mysql_database: str,
    proxy: FaultProxy,
    service_log: Collect,
) -> None:
    journal = {"durability": "journal", "journal_dir": str(tmp_path / "journal")}
    db = Database("mysql", {"database": mysql_database}, mysql_server)
    app = build_app(tmp_path, mysql_server, mysql_database, proxy.port, **journal)
    app.extensions["persistence"].start()
    for table in ("translation_tasks", "translation_sessions"):
        db.execute(f"DELETE FROM {table}")
    sid = new_session_id()
    client = app.test_client()
    client.post(SESSIONS_URL, json={"sessions": [session(session_id=sid)]})
    client.post(TASKS_URL, json={"tasks": [task(sid) for _ in range(7)]})
    proxy.set_mode("cut")
    app.extensions["persistence"].stop()
    assert any("stay in the journal for the next start" in line for line in service_log.lines)

    proxy.set_mode("pass")
    again = build_app(tmp_path, mysql_server, mysql_database, proxy.port, **journal)
    service = again.extensions["persistence"]
    service.start()
    assert again.test_client().post(FLUSH_URL).status_code == 200
    service.stop()
    assert db.count("translation_tasks") == 7


def test_a_ten_second_outage_under_gunicorn_loses_nothing(
    start_server: Any, mysql_server: MysqlServer, mysql_database: str, proxy: FaultProxy
) -> None:
    server = start_server(
        DB_DRIVER="mysql",
        DB_HOST="127.0.0.1",
        DB_PORT=str(proxy.port),
        DB_USER=mysql_server.user,
        DB_PASSWORD=mysql_server.password,
        DB_DATABASE=mysql_database,
        DB_CONNECT_TIMEOUT="1",
        DB_READ_TIMEOUT="2",
        DB_WRITE_TIMEOUT="2",
        BUFFER_FLUSH_INTERVAL="1",
        BUFFER_RETRY_BACKOFF_MAX="2",
        HEALTH_CHECK_INTERVAL="0.5",
    )
    db = Database("mysql", {"database": mysql_database}, mysql_server)
    for table in ("translation_tasks", "translation_sessions"):
        db.execute(f"DELETE FROM {table}")
    sid = new_session_id()
    assert server.post(SESSIONS_URL, {"sessions": [session(session_id=sid)]}).ok
    proxy.set_mode("cut")
    ids: list[str] = []
    health_codes = set()
    outage_ends = time.monotonic() + 10
    while time.monotonic() < outage_ends:
        batch = [task(sid) for _ in range(20)]
        response = server.post(TASKS_URL, {"tasks": batch})
        assert response.status_code == 200  # intake does not depend on the database
        ids += [t["task_id"] for t in batch]
        health_codes.add(server.get("/health").status_code)
        time.sleep(0.2)
    assert 503 in health_codes
    assert server.post(FLUSH_URL).status_code == 503
    stats = server.get(STATS_URL).json()
    assert stats["flush_info"]["failed_flush_count"] >= 1
    assert stats["flush_info"]["last_error"]

    proxy.set_mode("pass")
    deadline = time.monotonic() + 20  # the scheduled flush retries on its own
    while db.count("translation_tasks") < len(ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    landed = {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)
    assert server.get("/health").status_code == 200
