"""``flask --app wsgi init-db``: creates the database (MySQL) and the tables."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from persistence import create_app
from tests.conftest import MysqlServer, make_settings

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
