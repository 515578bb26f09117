"""``flask --app wsgi init-db``: creates the database (MySQL) and the tables."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from persistence import create_app
from tests.conftest import Database, MysqlServer, make_settings
from tests.factories import new_session_id, session, task

SESSIONS = "/api/v1/persistence/sessions/batch"
TASKS = "/api/v1/persistence/tasks/batch"
FLUSH = "/api/v1/persistence/flush"
TABLES = {"translation_sessions", "translation_tasks", "persistence_dead_letters"}


def test_init_db_creates_the_sqlite_file_and_tables(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "p.db"
    app = create_app(make_settings(tmp_path, database={"sqlite_path": str(path)}))
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert f"Tables ready in sqlite file {path}" in result.output
    import sqlite3

    names = {
        row[0]
        for row in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )
    }
    assert names >= TABLES


@pytest.mark.mysql
def test_init_db_creates_the_mysql_database_and_tables_twice_safely(
    tmp_path: Path, mysql_server: MysqlServer
) -> None:
    name = f"pstest_init_{secrets.token_hex(3)}"
    database = {
        "driver": "mysql",
        "host": mysql_server.host,
        "port": mysql_server.port,
        "user": mysql_server.user,
        "password": mysql_server.password,
        "database": name,
    }
    app = create_app(make_settings(tmp_path, database=database))
    try:
        for _ in range(2):
            result = app.test_cli_runner().invoke(args=["init-db"])
            assert result.exit_code == 0, result.output
        conn = mysql_server.connect(name)
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES")
            assert {row[0] for row in cur.fetchall()} == TABLES
            cur.execute("SELECT @@character_set_database")
            assert cur.fetchone()[0] == "utf8mb4"
        conn.close()
    finally:
        conn = mysql_server.connect()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def test_init_db_reports_an_unreachable_database_in_one_message(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, database={"sqlite_path": str(tmp_path)}))
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 1
    assert "could not create the tables in sqlite file" in result.output


def test_dead_letters_list_and_replay_safely_twice(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(buffer={"flush_interval": 3600, "orphan_task_timeout": 0})
    client = app.test_client()
    runner = app.test_cli_runner()
    sid = new_session_id()
    client.post(TASKS, json={"tasks": [task(sid, task_id="orphan-1", status="pending")]})
    client.post(FLUSH)

    listed = runner.invoke(args=["dead-letters", "list"])
    assert listed.exit_code == 0, listed.output
    assert "orphan-1" in listed.output
    assert "was not found in the database" in listed.output

    kept = runner.invoke(args=["dead-letters", "replay"])
    assert "kept task orphan-1" in kept.output
    assert "0 replayed, 1 kept." in kept.output

    client.post(SESSIONS, json={"sessions": [session(session_id=sid)]})
    # A newer update of the same task arrives before the replay: the replay must not undo it.
    client.post(TASKS, json={"tasks": [task(sid, task_id="orphan-1", status="completed")]})
    client.post(FLUSH)
    replayed = runner.invoke(args=["dead-letters", "replay"])
    assert "1 replayed, 0 kept." in replayed.output, replayed.output
    assert db.count("persistence_dead_letters") == 0
    assert db.query("SELECT status FROM translation_tasks WHERE task_id = ?", "orphan-1") == [
        ("completed",)
    ]
    again = runner.invoke(args=["dead-letters", "replay"])
    assert "0 replayed, 0 kept." in again.output
    assert runner.invoke(args=["dead-letters", "list"]).output.strip() == "No dead letters."


def test_replay_writes_a_refused_row_once_the_database_accepts_it(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(buffer={"flush_interval": 3600})
    client = app.test_client()
    sid = new_session_id()
    client.post(SESSIONS, json={"sessions": [session(session_id=sid)]})
    db.add_poison_trigger()
    client.post(TASKS, json={"tasks": [task(sid, task_id="p", source_text="poison")]})
    client.post(FLUSH)
    runner = app.test_cli_runner()
    failed = runner.invoke(args=["dead-letters", "replay", "--type", "task"])
    assert "kept task p" in failed.output
    assert "poison row" in failed.output
    assert db.query("SELECT attempts FROM persistence_dead_letters") == [(2,)]
    db.execute("DROP TRIGGER poison")
    letter_id = db.query("SELECT id FROM persistence_dead_letters")[0][0]
    assert "1 replayed" in runner.invoke(args=["dead-letters", "replay", str(letter_id)]).output
    assert db.query("SELECT source_text FROM translation_tasks") == [("poison",)]


def test_a_bad_setting_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.gunicorn_server import REPO, service_env

    env = service_env(tmp_path, BUFFER_FLUSH_INTERVAL="soon")
    env.pop("FLASK_APP", None)
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "init-db"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "config error: buffer.flush_interval = 'soon' (from BUFFER_FLUSH_INTERVAL): "
        "must be a number"
    ], result.stderr
    assert os.listdir(tmp_path) == []  # nothing was created
