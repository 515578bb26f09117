"""Database outages through a fault-injecting proxy: nothing accepted is lost, /health tells."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

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
    response = client.post(FLUSH_URL)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["tasks_written"] == 100
    landed = {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)


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
