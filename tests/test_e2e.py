"""The service under gunicorn, spoken to over HTTP: triggers, shutdown, start-up refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server, free_port, gunicorn_command, service_env, wait_for

pytestmark = pytest.mark.e2e


def post_load(server: Server, batches: int = 5, size: int = 100) -> tuple[str, list[str]]:
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    ids: list[str] = []
    for _ in range(batches):
        records = [task(sid) for _ in range(size)]
        response = server.post(f"{API}/tasks/batch", {"tasks": records})
        assert response.status_code == 200, response.text
        ids += [r["task_id"] for r in records]
    return sid, ids


@pytest.mark.mysql
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=["SIGTERM", "SIGINT", "SIGQUIT"]
)
def test_stopping_gunicorn_writes_everything_buffered(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database, sig: int
) -> None:
    server = start_server(
        BUFFER_FLUSH_INTERVAL="3600",
        BUFFER_MAX_SIZE="100000",
        BUFFER_HARD_LIMIT="200000",
        **mysql_env,
    )
    _, ids = post_load(server)
    assert mysql_db.count("translation_tasks") == 0  # all still buffered
    assert server.stop(sig) == 0
    landed = {row[0] for row in mysql_db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)
    # Written by the flush the stop signal starts; the last one finds nothing left.
    output = server.output()
    assert "flush wrote 1 sessions, 500 tasks" in output
    assert "shutdown flush wrote 0 sessions and 0 tasks" in output


@pytest.mark.mysql
def test_interval_and_size_triggers_run_in_the_worker(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(
        BUFFER_FLUSH_INTERVAL="1", BUFFER_MAX_SIZE="100000", BUFFER_HARD_LIMIT="200000", **mysql_env
    )
    post_load(server, batches=1, size=10)
    assert wait_for(lambda: mysql_db.count("translation_tasks") == 10)
    server.stop()

    server = start_server(BUFFER_FLUSH_INTERVAL="3600", BUFFER_MAX_SIZE="300", **mysql_env)
    started = time.monotonic()
    post_load(server, batches=3, size=100)  # 301 records with the session: past the trigger
    assert time.monotonic() - started < 5
    assert wait_for(lambda: mysql_db.count("translation_tasks") == 310)
    stats = server.get(f"{API}/stats").json()
    assert stats["performance"]["total_flush_count"] >= 1
    assert stats["flush_info"]["next_flush_time"] is not None


@pytest.mark.mysql
def test_preload_still_starts_the_scheduler_in_the_worker(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server("--preload", BUFFER_FLUSH_INTERVAL="1", **mysql_env)
    post_load(server, batches=1, size=5)
    assert wait_for(lambda: mysql_db.count("translation_tasks") == 5)


def test_embedded_sqlite_default_serves_every_endpoint(start_server: Any, tmp_path: Path) -> None:
    server = start_server()
    assert server.get("/").json()["service"] == "Persistence Service"
    health = server.get("/health").json()
    assert health["database_driver"] == "sqlite"
    _, ids = post_load(server, batches=2, size=10)
    flushed = server.post(f"{API}/flush").json()
    assert (flushed["status"], flushed["tasks_written"]) == ("flushed", 20)
    assert server.get(f"{API}/stats").json()["performance"]["total_tasks_written"] == 20
    assert server.post(f"{API}/tasks/batch", {"tasks": "no"}).status_code == 400
    assert server.get("/missing").headers["Content-Type"] == "application/json"
    db = Database("sqlite", {"sqlite_path": str(tmp_path / "service.db")})
    assert {row[0] for row in db.query("SELECT task_id FROM translation_tasks")} == set(ids)
    assert "database: sqlite file" in server.output()


def test_command_line_bind_wins_over_the_configuration(start_server: Any) -> None:
    taken = free_port()
    server = start_server(SERVICE_PORT=str(taken))  # start_server passes its own -b
    assert str(taken) not in server.url
    assert server.get("/").ok
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{taken}/", timeout=2)


def run_to_exit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gunicorn_command("-b", f"127.0.0.1:{free_port()}", *args),
        cwd=tmp_path,
        env=service_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.mysql
@pytest.mark.parametrize("workers", [2, 4])
def test_several_workers_flush_and_report_as_one_service(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database, workers: int
) -> None:
    server = start_server(SERVICE_WORKERS=str(workers), BUFFER_FLUSH_INTERVAL="3600", **mysql_env)
    assert wait_for(lambda: server.get(f"{API}/stats").json()["workers"]["count"] == workers)
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    batches = [[task(sid) for _ in range(25)] for _ in range(40)]
    # Eight at a time, each on a new connection: busy workers leave the next to another.
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda b: server.post(f"{API}/tasks/batch", {"tasks": b}), batches))
    assert {response.status_code for response in codes} == {200}
    ids = [t["task_id"] for batch in batches for t in batch]
    stats = server.get(f"{API}/stats").json()
    assert stats["workers"]["count"] == workers
    assert len(set(stats["workers"]["pids"])) == workers
    assert sum(1 for n in stats["workers"]["buffered"] if n) >= 2  # the load was spread
    assert stats["performance"]["tasks_received"] == 1000
    assert stats["buffer"]["tasks_count"] == 1000
    assert server.get("/health").json()["buffer"]["tasks_count"] == 1000

    flushed = server.post(f"{API}/flush").json()
    assert (flushed["tasks_written"], flushed["sessions_written"]) == (1000, 1)
    assert flushed["workers"] == workers
    landed = {row[0] for row in mysql_db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)
    stats = server.get(f"{API}/stats").json()
    assert stats["buffer"]["total_count"] == 0
    assert stats["performance"]["total_tasks_written"] == 1000


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"BUFFER_FLUSH_INTERVAL": "soon"}, ("buffer.flush_interval", "'soon'", "number")),
        ({"DB_DRIVER": "postgres"}, ("database.driver", "'postgres'", "sqlite, mysql")),
        ({"SERVICE_PORT": "99999"}, ("service.port", "99999", "between 1 and 65535")),
    ],
)
def test_a_bad_setting_stops_the_start_with_one_line(
    tmp_path: Path, env: dict[str, str], words: tuple[str, ...]
) -> None:
    result = run_to_exit(tmp_path, **env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_a_chunked_body_over_the_limit_gets_413_not_a_cut(start_server: Any) -> None:
    server = start_server(SERVICE_MAX_REQUEST_BYTES="2048")
    sid = new_session_id()
    body = json.dumps({"tasks": [task(sid, source_text="x" * 4000)]}).encode()

    def chunks() -> Any:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = requests.post(
        f"{server.url}{API}/tasks/batch",
        data=chunks(),
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413, response.text
    assert "2048" in response.json()["detail"]
    small = json.dumps({"tasks": [task(sid)]}).encode()
    response = requests.post(
        f"{server.url}{API}/tasks/batch",
        data=iter([small]),
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_options_answers_json_405(start_server: Any) -> None:
    response = requests.options(f"{start_server().url}{API}/tasks/batch", timeout=5)
    assert response.status_code == 405
    assert response.headers["Content-Type"] == "application/json"
    assert "POST" in response.headers["Allow"]
