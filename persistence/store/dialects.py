"""What differs between MySQL/MariaDB and SQLite: connections, SQL text, error classes.

Both dialects give the same upsert semantics (docs/DATA_MODELS.md): every
column takes the new value, except ``created_at`` (kept) and the session
counters that never decrease.
"""

from __future__ import annotations

import contextlib
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pymysql
from dbutils.pooled_db import PooledDB

from persistence.config import DatabaseServer, DatabaseSettings
from persistence.records import ORDER_COLUMN, RecordType
from persistence.store.errors import (
    MYSQL_ERRORS,
    SQLITE_ERRORS,
    SQLITE_OPERATOR_MESSAGES,
    OperatorError,
    RowError,
    StoreError,
    UnclassifiedError,
)
from persistence.store.multirow import MultiRowCursor
from persistence.store.tls import DatabaseTls
from persistence.store.tls import needs_operator as tls_needs_operator


def sql_file(name: str) -> str:
    """The text of a DDL file shipped in persistence/store/sql/."""
    return resources.files("persistence.store").joinpath("sql", name).read_text(encoding="utf-8")


def split_statements(script: str) -> list[str]:
    """The statements of a DDL script (no semicolons inside statements, ``--`` comments)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode("utf-8")


class Dialect(ABC):
    """The SQL and driver details of one kind of database."""

    name: str
    placeholder: str
    ddl_file: str
    # The query that reads the server's largest statement, or None (no such limit).
    max_packet_query: str | None = None
    # The TLS of the connections; None for a database without any (SQLite).
    tls: DatabaseTls | None = None
    # Statements that take and release a named lock around schema changes, so that
    # instances starting together change the schema one at a time; None: no such lock.
    schema_lock_sql: tuple[str, str] | None = None
    # Whether transactions on several connections write at the same time (SQLite has one
    # writer per file: a second connection would only wait for the first one's lock).
    concurrent_writers: bool = True

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings

    @abstractmethod
    def create_pool(self, server: DatabaseServer | None) -> PooledDB:
        """A DBUtils pool of connections to ``server`` (none opened yet)."""

    @abstractmethod
    def connect_once(self, timeout: float, server: DatabaseServer | None) -> Any:
        """A new connection to ``server`` outside the pool, every timeout set to ``timeout``."""

    @abstractmethod
    def already_exists(self, exc: StoreError) -> bool:
        """Whether ``exc`` says a table or column to create exists already (another
        process created it first)."""

    @abstractmethod
    def classify(self, exc: Exception) -> type[StoreError]:
        """The :mod:`~persistence.store.errors` class that says what ``exc`` means."""

    def error_code(self, exc: Exception) -> int | None:
        return None

    # How the upsert names the value being inserted, picks the larger of two values,
    # starts its update clause, and what else it sets.
    greatest: str
    order_column_type: str
    upsert_clause: str
    extra_updates: tuple[str, ...] = ()

    @abstractmethod
    def new_value(self, column: str) -> str:
        """The expression for the inserted value of ``column`` inside the update clause."""

    def upsert_sql(self, kind: RecordType) -> str:
        """The upsert of one record of ``kind``, for ``executemany``.

        A record changes a row's columns only if its arrival stamp is not older
        than the row's; the never-decreasing counters take the larger value
        whatever the order. The stamp is assigned last: MySQL evaluates the
        assignments left to right, so every condition sees the row's old stamp.
        """
        is_newer = f"{self.new_value(ORDER_COLUMN)} >= {ORDER_COLUMN}"
        updates = []
        for column in kind.columns:
            new = self.new_value(column)
            if column in (kind.key, ORDER_COLUMN):
                continue
            if column in kind.never_decrease:
                updates.append(f"{column} = {self.greatest}(COALESCE({column}, 0), {new})")
            else:
                updates.append(f"{column} = CASE WHEN {is_newer} THEN {new} ELSE {column} END")
        updates.append(
            f"{ORDER_COLUMN} = {self.greatest}({ORDER_COLUMN}, {self.new_value(ORDER_COLUMN)})"
        )
        updates.extend(self.extra_updates)
        clause = self.upsert_clause.format(key=kind.key)
        return f"{self._insert_head(kind)} {clause} {', '.join(updates)}"

    @abstractmethod
    def dead_letter_sql(self) -> str:
        """The upsert of one dead letter, keyed by (record_type, record_key)."""

    @abstractmethod
    def prepare_database(self, server: DatabaseServer | None) -> None:
        """Make sure the database itself exists (before tables are created)."""

    def row_converter(self, kind: RecordType) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
        """A function turning a record into the parameter tuple of :meth:`upsert_sql`."""
        columns = kind.columns
        json_columns = kind.json_columns
        if not json_columns:
            return lambda record: tuple([record[c] for c in columns])
        return lambda record: tuple(
            [_json_text(record[c]) if c in json_columns else record[c] for c in columns]
        )

    def _insert_head(self, kind: RecordType) -> str:
        marks = ", ".join([self.placeholder] * len(kind.columns))
        return f"INSERT INTO {kind.table} ({', '.join(kind.columns)}) VALUES ({marks})"


class MysqlDialect(Dialect):
    name = "mysql"
    placeholder = "%s"
    ddl_file = "mysql.sql"
    max_packet_query = "SELECT @@max_allowed_packet"
    schema_lock_sql = ("SELECT GET_LOCK(%s, %s)", "SELECT RELEASE_LOCK(%s)")
    # Times are written and read as UTC; strict mode makes a bad value an error, never a
    # silent truncation.
    session_setup = (
        "SET time_zone = '+00:00'",
        "SET SESSION sql_mode = "
        "TRIM(BOTH ',' FROM CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))",
    )

    def __init__(self, settings: DatabaseSettings) -> None:
        super().__init__(settings)
        self.tls: DatabaseTls = DatabaseTls(settings)

    def _connect_args(self, server: DatabaseServer | None, database: bool = True) -> dict[str, Any]:
        s = self.settings
        server = server or s.servers[0]
        args: dict[str, Any] = {
            "host": server.host,
            "port": server.port,
            "user": s.user,
            "password": s.password,
            "charset": "utf8mb4",
            "autocommit": False,
            "cursorclass": MultiRowCursor,
            "connect_timeout": s.connect_timeout,
            "read_timeout": s.read_timeout,
            "write_timeout": s.write_timeout,
        }
        if database:
            args["database"] = s.database
        args.update(self.tls.connect_args())
        return args

    def create_pool(self, server: DatabaseServer | None) -> PooledDB:
        return PooledDB(
            pymysql,
            mincached=0,
            maxcached=self.settings.pool_size,
            maxconnections=self.settings.pool_size,
            blocking=True,
            setsession=list(self.session_setup),
            reset=True,
            ping=1,
            **self._connect_args(server),
        )

    def connect_once(self, timeout: float, server: DatabaseServer | None) -> Any:
        """A new connection, whose TLS is asked of the server and kept for /health."""
        try:
            args = self._connect_args(server)
            args.update(connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout)
            conn = pymysql.connect(**args)
        except Exception:
            self.tls.observe_failure()
            raise
        try:
            self.tls.observe(conn)
        except Exception:
            self.tls.observe_failure()
            with contextlib.suppress(Exception):  # the connection may be broken already
                conn.close()
            raise
        return conn

    def prepare_database(self, server: DatabaseServer | None) -> None:
        conn = pymysql.connect(**self._connect_args(server, database=False))
        try:
            with conn.cursor() as cur:
                name = self.settings.database.replace("`", "``")
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{name}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
        finally:
            conn.close()

    def error_code(self, exc: Exception) -> int | None:
        if isinstance(exc, pymysql.MySQLError) and exc.args and isinstance(exc.args[0], int):
            return exc.args[0]
        return None

    def classify(self, exc: Exception) -> type[StoreError]:
        if tls_needs_operator(exc):
            return OperatorError
        if not isinstance(exc, pymysql.MySQLError):
            return UnclassifiedError  # a driver bug or a value it cannot send
        return MYSQL_ERRORS.get(self.error_code(exc), UnclassifiedError)

    def already_exists(self, exc: StoreError) -> bool:
        return exc.code in (1050, 1060)  # table exists, duplicate column name

    greatest = "GREATEST"
    order_column_type = "BIGINT NOT NULL DEFAULT 0"
    upsert_clause = "ON DUPLICATE KEY UPDATE"

    def new_value(self, column: str) -> str:
        # VALUES(col) works on MySQL 8 and MariaDB alike (the `AS new` alias does not), and
        # a VALUES list of bare placeholders lets PyMySQL send multi-row statements.
        return f"VALUES({column})"

    def dead_letter_sql(self) -> str:
        return (
            "INSERT INTO persistence_dead_letters (record_type, record_key, payload, error_code,"
            " error_message, first_failed_at, last_failed_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON DUPLICATE KEY UPDATE payload = VALUES(payload), error_code = VALUES(error_code),"
            " error_message = VALUES(error_message), last_failed_at = VALUES(last_failed_at),"
            " attempts = attempts + 1"
        )


class SqliteDialect(Dialect):
    name = "sqlite"
    placeholder = "?"
    ddl_file = "sqlite.sql"
    concurrent_writers = False

    def _connect_args(self, timeout: float) -> dict[str, Any]:
        return {
            "database": self.settings.sqlite_path,
            "timeout": timeout,
            "check_same_thread": False,
        }

    def create_pool(self, server: DatabaseServer | None) -> PooledDB:
        self.prepare_database(server)
        return PooledDB(
            sqlite3,
            mincached=0,
            maxcached=self.settings.pool_size,
            maxconnections=self.settings.pool_size,
            blocking=True,
            setsession=["PRAGMA foreign_keys = ON"],
            reset=True,
            ping=0,
            **self._connect_args(self.settings.write_timeout),
        )

    def connect_once(self, timeout: float, server: DatabaseServer | None) -> Any:
        return sqlite3.connect(**self._connect_args(timeout))

    def prepare_database(self, server: DatabaseServer | None) -> None:
        Path(self.settings.sqlite_path).expanduser().parent.mkdir(parents=True, exist_ok=True)

    def error_code(self, exc: Exception) -> int | None:
        return getattr(exc, "sqlite_errorcode", None)

    def classify(self, exc: Exception) -> type[StoreError]:
        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError)):
            return RowError
        if not isinstance(exc, sqlite3.Error):
            return UnclassifiedError
        code = self.error_code(exc)
        if code is not None and code & 0xFF in SQLITE_ERRORS:
            return SQLITE_ERRORS[code & 0xFF]
        if any(text in str(exc) for text in SQLITE_OPERATOR_MESSAGES):
            return OperatorError
        return UnclassifiedError

    def already_exists(self, exc: StoreError) -> bool:
        return "already exists" in str(exc) or "duplicate column name" in str(exc)

    greatest = "MAX"
    order_column_type = "INTEGER NOT NULL DEFAULT 0"
    upsert_clause = "ON CONFLICT ({key}) DO UPDATE SET"
    extra_updates = ("updated_at = CURRENT_TIMESTAMP",)

    def new_value(self, column: str) -> str:
        return f"excluded.{column}"

    def dead_letter_sql(self) -> str:
        return (
            "INSERT INTO persistence_dead_letters (record_type, record_key, payload, error_code,"
            " error_message, first_failed_at, last_failed_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (record_type, record_key) DO UPDATE SET payload = excluded.payload,"
            " error_code = excluded.error_code, error_message = excluded.error_message,"
            " last_failed_at = excluded.last_failed_at, attempts = attempts + 1"
        )


def dialect_for(settings: DatabaseSettings) -> Dialect:
    """The dialect that ``database.driver`` names (no fallback from one to the other)."""
    return {"mysql": MysqlDialect, "sqlite": SqliteDialect}[settings.driver](settings)
