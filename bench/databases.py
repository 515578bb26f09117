"""The MariaDB/MySQL side of the bench: its databases, service settings, raw upserts.

Each run creates its own databases, ``bench_<random>_<role>``, and drops them
all at the end (:meth:`BenchDatabases.drop_all`, also on failure).

:func:`raw_upsert` is the database floor: PyMySQL ``executemany`` of the
service's own upsert SQL (``MysqlDialect.upsert_sql``) with the service's
connection settings (utf8mb4, UTC, strict mode), one transaction per
connection, nothing else. Rows are converted beforehand, so the time is the
driver's statement building, the network and the server's work.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql

from persistence.config import Settings, load_settings
from persistence.store.dialects import MysqlDialect


@dataclass(frozen=True)
class DbServer:
    host: str
    port: int
    user: str
    password: str

    def connect(self, database: str | None = None, autocommit: bool = True) -> Any:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            charset="utf8mb4",
            autocommit=autocommit,
            connect_timeout=5,
        )

    def env(self, database: str) -> dict[str, str]:
        """The service's environment variables for ``database`` on this server."""
        return {
            "DB_HOST": self.host,
            "DB_PORT": str(self.port),
            "DB_USER": self.user,
            "DB_PASSWORD": self.password,
            "DB_DATABASE": database,
        }

    def describe(self) -> dict[str, Any]:
        """Version and the InnoDB settings that matter for write speed."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                version = cur.fetchone()[0]
                found = {}
                for name in (
                    "innodb_buffer_pool_size",
                    "innodb_flush_log_at_trx_commit",
                    "innodb_log_file_size",
                    "sync_binlog",
                    "log_bin",
                ):
                    cur.execute("SHOW VARIABLES LIKE %s", (name,))
                    row = cur.fetchone()
                    if row:
                        found[name] = row[1]
            return {"version": version, "host": f"{self.host}:{self.port}", **found}
        finally:
            conn.close()


def service_settings(
    server: DbServer,
    database: str,
    scratch: Path,
    database_settings: dict[str, Any] | None = None,
    **buffer: Any,
) -> Settings:
    """Settings for an in-process service: defaults, no config file, no environment;
    ``database_settings`` and ``buffer`` override keys of those sections."""
    empty = scratch / "empty-config.yaml"
    empty.write_text("{}\n", encoding="utf-8")
    overrides: dict[str, dict[str, Any]] = {
        "database": {
            "driver": "mysql",
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "password": server.password,
            "database": database,
            **(database_settings or {}),
        },
        "logging": {"file": ""},
        "buffer": buffer,
    }
    return load_settings(path=empty, environ={}, overrides=overrides)


class BenchDatabases:
    """The databases of one run; every one of them is dropped by :meth:`drop_all`."""

    def __init__(self, server: DbServer) -> None:
        self.server = server
        self.prefix = f"bench_{secrets.token_hex(4)}"
        self.created: list[str] = []

    def create(self, role: str) -> str:
        name = f"{self.prefix}_{role.replace('-', '_')}"
        conn = self.server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
        finally:
            conn.close()
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        if not self.created:
            return
        conn = self.server.connect()
        try:
            with conn.cursor() as cur:
                for name in self.created:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()
        self.created.clear()

    def count(self, database: str, table: str = "translation_tasks", where: str = "") -> int:
        conn = self.server.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT COUNT(*) FROM {table} {where}")
                return int(cur.fetchone()[0])
        finally:
            conn.close()


def raw_connection(server: DbServer, database: str) -> Any:
    """A connection set up the way the service's pool sets up its own."""
    conn = server.connect(database, autocommit=False)
    with conn.cursor() as cur:
        for statement in MysqlDialect.session_setup:
            cur.execute(statement)
    conn.commit()
    return conn


def raw_upsert(
    server: DbServer, database: str, sql: str, rows: Sequence[tuple[Any, ...]], connections: int = 1
) -> float:
    """Seconds to write ``rows`` with ``executemany`` + commit, split over ``connections``.

    Connections are opened before the clock starts; with several, each writes an
    equal share in a thread of its own and the time is that of the slowest.
    """
    return raw_upsert_timed(server, database, sql, rows, connections)[0]


def raw_upsert_timed(
    server: DbServer, database: str, sql: str, rows: Sequence[tuple[Any, ...]], connections: int = 1
) -> tuple[float, float]:
    """:func:`raw_upsert`, also returning the CPU seconds this process used meanwhile
    (PyMySQL building the statements: Python, under the GIL)."""
    conns = [raw_connection(server, database) for _ in range(connections)]
    shares = [rows[i::connections] for i in range(connections)]
    barrier = threading.Barrier(connections + 1)
    ended = [0.0] * connections
    failures: list[BaseException] = []

    def write(index: int) -> None:
        conn = conns[index]
        barrier.wait()
        try:
            with conn.cursor() as cur:
                cur.executemany(sql, shares[index])
            conn.commit()
        except BaseException as exc:
            failures.append(exc)
        ended[index] = time.perf_counter()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    cpu_started = time.process_time()
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu_started
    for conn in conns:
        conn.close()
    if failures:
        raise failures[0]
    return max(ended) - started, cpu
