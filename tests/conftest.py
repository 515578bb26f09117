"""Fixtures: settings, apps on SQLite or real MySQL/MariaDB, and a guard against stray connections.

Tests that talk to MySQL/MariaDB carry the ``mysql`` marker (the ``db`` fixture
adds it to its MySQL variant). Without a server they skip with the reason,
except under ``CI=true``, where they fail instead. Every other test has
``pymysql.connect`` replaced by a function that fails loudly.

The server is found through TEST_DB_HOST, TEST_DB_PORT, TEST_DB_USER and
TEST_DB_PASSWORD (default 127.0.0.1:3306, root, empty password). Each test run
creates its own database ``pstest_<random>`` and drops it at the end.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
from flask import Flask

from persistence import create_app
from persistence.config import Settings, load_settings
from persistence.service import PersistenceService
from tests.gunicorn_server import (
    Server,
    free_port,
    gunicorn_command,
    service_env,
    wait_until_answering,
)

IN_CI = os.environ.get("CI", "").lower() == "true"
REAL_CONNECT = pymysql.connect


@dataclass(frozen=True)
class MysqlServer:
    host: str
    port: int
    user: str
    password: str

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        return REAL_CONNECT(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
        )


def _server_from_env() -> MysqlServer:
    return MysqlServer(
        host=os.environ.get("TEST_DB_HOST", "127.0.0.1"),
        port=int(os.environ.get("TEST_DB_PORT", "3306")),
        user=os.environ.get("TEST_DB_USER", "root"),
        password=os.environ.get("TEST_DB_PASSWORD", ""),
    )


@pytest.fixture(scope="session")
def mysql_server() -> MysqlServer:
    """A reachable MySQL/MariaDB server, or a skip (a failure under CI=true)."""
    server = _server_from_env()
    try:
        server.connect().close()
    except pymysql.MySQLError as exc:
        reason = (
            f"no MySQL/MariaDB server at {server.host}:{server.port} as {server.user} "
            f"({exc}); set TEST_DB_HOST etc. to run the MySQL tests"
        )
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return server


@pytest.fixture(scope="session")
def mysql_database(mysql_server: MysqlServer) -> Iterator[str]:
    """A database of this test run, dropped at the end."""
    name = f"pstest_{secrets.token_hex(4)}"
    conn = mysql_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(autouse=True)
def _no_stray_mysql(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests not marked ``mysql`` cannot open a MySQL connection by accident."""
    if request.node.get_closest_marker("mysql"):
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("this test is not marked mysql but tried to connect to MySQL")

    monkeypatch.setattr(pymysql, "connect", refuse)
    monkeypatch.setattr(pymysql, "Connect", refuse)


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from defaults plus ``sections``; no config.yaml, no environment, no log file."""
    empty = tmp_path / "empty-config.yaml"
    empty.write_text("{}\n", encoding="utf-8")
    overrides: dict[str, dict[str, Any]] = {"logging": {"file": ""}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    overrides.setdefault("database", {}).setdefault("sqlite_path", str(tmp_path / "test.db"))
    return load_settings(path=empty, environ={}, overrides=overrides)


@dataclass
class Database:
    """The database a test runs against, with a way to read it back independently."""

    driver: str
    settings: dict[str, Any]
    server: MysqlServer | None = None

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run a read query on a connection of its own (``?`` placeholders)."""
        if self.driver == "sqlite":
            conn = sqlite3.connect(self.settings["sqlite_path"])
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        assert self.server is not None
        conn = self.server.connect(self.settings["database"])
        try:
            with conn.cursor() as cur:
                cur.execute("SET time_zone = '+00:00'")
                cur.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def execute(self, sql: str) -> None:
        if self.driver == "sqlite":
            conn = sqlite3.connect(self.settings["sqlite_path"])
            try:
                conn.execute(sql)
                conn.commit()
            finally:
                conn.close()
            return
        assert self.server is not None
        conn = self.server.connect(self.settings["database"])
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def add_poison_trigger(self) -> None:
        """A trigger that refuses any task whose source_text is 'poison' ("poison row")."""
        if self.driver == "sqlite":
            self.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON translation_tasks "
                "WHEN NEW.source_text = 'poison' BEGIN SELECT RAISE(ABORT, 'poison row'); END"
            )
        else:
            self.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON translation_tasks FOR EACH ROW "
                "BEGIN IF NEW.source_text = 'poison' THEN "
                "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poison row'; END IF; END"
            )

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {table}")[0][0])


TABLES = ("persistence_dead_letters", "translation_tasks", "translation_sessions")


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The same test on the embedded SQLite driver and on real MySQL/MariaDB, tables empty."""
    if request.param == "sqlite":
        yield Database("sqlite", {"driver": "sqlite", "sqlite_path": str(tmp_path / "test.db")})
        return
    server: MysqlServer = request.getfixturevalue("mysql_server")
    name: str = request.getfixturevalue("mysql_database")
    database = Database(
        "mysql",
        {
            "driver": "mysql",
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "password": server.password,
            "database": name,
        },
        server,
    )
    _empty_tables(database)
    yield database
    _empty_tables(database)


def _empty_tables(database: Database) -> None:
    existing = {row[0] for row in database.query("SHOW TABLES")}
    for table in TABLES:
        if table in existing:
            database.execute(f"DELETE FROM {table}")


@pytest.fixture
def app_factory(tmp_path: Path, db: Database) -> Iterator[Callable[..., Flask]]:
    """Build apps on the test's database; started services are stopped afterwards.

    ``app_factory(start=True, buffer={...})`` starts the service (tables,
    scheduler) like a gunicorn worker would.
    """
    services: list[PersistenceService] = []

    def build(start: bool = True, **sections: dict[str, Any]) -> Flask:
        database = {**db.settings, **sections.pop("database", {})}
        app = create_app(make_settings(tmp_path, database=database, **sections))
        service = app.extensions["persistence"]
        if start:
            service.start()
            services.append(service)
        else:
            service.store.create_schema()
        return app

    yield build
    for service in services:
        service.stop()


@pytest.fixture
def app(app_factory: Callable[..., Flask]) -> Flask:
    """An app whose scheduler never flushes during a test: no interval flush within the
    test's time, no size-triggered flush below 100,000 records. Flushes happen when asked."""
    return app_factory(
        buffer={"flush_interval": 3600, "max_buffer_size": 100_000, "hard_limit": 200_000}
    )


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


@pytest.fixture
def service(app: Flask) -> PersistenceService:
    return app.extensions["persistence"]


# --- the service under gunicorn --------------------------------------------------------


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start gunicorn in ``tmp_path`` (no config.yaml there) and wait until it answers."""
    servers: list[Server] = []

    def start(*args: str, port: int | None = None, **env: str) -> Server:
        """``port``: bind there (a restart of an instance on its own port), else a free one."""
        port = port or free_port()
        log = tmp_path / f"gunicorn-{port}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                gunicorn_command("-b", f"127.0.0.1:{port}", *args),
                cwd=tmp_path,
                env=service_env(tmp_path, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        servers.append(server)
        return wait_until_answering(server)

    yield start
    for server in servers:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture
def mysql_env(mysql_server: MysqlServer, mysql_database: str) -> Iterator[dict[str, str]]:
    env = {
        "DB_DRIVER": "mysql",
        "DB_HOST": mysql_server.host,
        "DB_PORT": str(mysql_server.port),
        "DB_USER": mysql_server.user,
        "DB_PASSWORD": mysql_server.password,
        "DB_DATABASE": mysql_database,
    }
    direct = Database("mysql", {"database": mysql_database}, mysql_server)
    yield env
    existing = {row[0] for row in direct.query("SHOW TABLES")}
    for table in ("persistence_dead_letters", "translation_tasks", "translation_sessions"):
        if table in existing:
            direct.execute(f"DELETE FROM {table}")


@pytest.fixture
def mysql_db(mysql_server: MysqlServer, mysql_database: str) -> Database:
    return Database("mysql", {"database": mysql_database}, mysql_server)
