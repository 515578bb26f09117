"""The database side: a DBUtils pool, batched upserts, dead letters, health probes.

Threading contract: a :class:`Store` may be used from any thread, and several
threads may write at once (a flush writes over :attr:`Store.write_connections`
connections in parallel). Each write takes a pooled connection for one
``executemany`` and one ``commit`` and returns it; no method holds one pooled
connection while it waits for another, so a pool smaller than the number of
writers makes them take turns, never deadlock. The pool is created on first
use, never at import or in ``create_app``, so it is always created in the
process that uses it (after gunicorn forks). :meth:`Store.probe` uses a
connection of its own with short timeouts, so a hung pool never delays
``/health``.

With several servers in ``database.host`` the pool and the probes follow the
server in use (:mod:`persistence.store.servers`): an error that says the
server cannot serve moves the store to the next one, and the next use of the
pool connects there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from dbutils.pooled_db import PooledDB

from persistence.config import DatabaseServer, DatabaseSettings
from persistence.records import ORDER_COLUMN, RECORD_TYPES, SESSIONS, Record, RecordType
from persistence.store.dialects import Dialect, dialect_for, split_statements, sql_file
from persistence.store.errors import (
    SERVER_UNAVAILABLE,
    Conflict,
    ConnectionLost,
    OperatorError,
    RowError,
    ServerNotReady,
    StoreError,
    TransientError,
    UnclassifiedError,
)
from persistence.store.probe import ServerState, read_server_state
from persistence.store.servers import ServerList

__all__ = [
    "Conflict",
    "ConnectionLost",
    "DeadLetter",
    "OperatorError",
    "RowError",
    "ServerNotReady",
    "ServerState",
    "Store",
    "StoreError",
    "TransientError",
    "UnclassifiedError",
]

log = logging.getLogger(__name__)
sql_log = logging.getLogger("persistence.sql")

DEAD_LETTER_COLUMNS = (
    "id",
    "record_type",
    "record_key",
    "payload",
    "error_code",
    "error_message",
    "attempts",
    "first_failed_at",
    "last_failed_at",
)
# How many keys one existence query asks about.
_IN_CHUNK = 500
# Room a statement needs around one record's values: the SQL text of the upsert and,
# for a dead letter, the error message (at most 60,000 characters are kept).
STATEMENT_OVERHEAD = 64 * 1024
# A dead letter's payload keeps values up to this size when the whole record is too large.
_DEAD_LETTER_VALUE_MAX = 64 * 1024
# The longest a start waits for another instance's schema change (GET_LOCK), in seconds;
# after that it goes on and tolerates what the other one created meanwhile.
_SCHEMA_LOCK_WAIT = 30


@dataclass(frozen=True)
class DeadLetter:
    """A record the database refused for good, with the reason."""

    kind: RecordType
    record: Record
    error_code: int | None
    error_message: str
    reason: str = "refused_by_database"


class Store:
    """Writes records to the configured database (MySQL/MariaDB or SQLite)."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.dialect: Dialect = dialect_for(settings)
        # The MySQL servers of database.host; None for SQLite (one file, nothing to move to).
        self.servers = ServerList(settings.servers) if self.dialect.name == "mysql" else None
        self._pool: PooledDB | None = None
        self._pool_server: DatabaseServer | None = None
        self._pool_born = 0.0
        self._pool_lock = threading.Lock()
        # Set by prepare(); until then every write calls it first.
        self._prepared = False
        # The server's max_allowed_packet, read by prepare() (None: no such limit known).
        self.max_allowed_packet: int | None = None
        self._upsert_sql = {kind.name: self.dialect.upsert_sql(kind) for kind in RECORD_TYPES}
        self._to_row = {kind.name: self.dialect.row_converter(kind) for kind in RECORD_TYPES}

    @property
    def driver(self) -> str:
        return self.dialect.name

    @property
    def server(self) -> str:
        """The server in use (``host:port``), or the SQLite file."""
        if self.servers is None:
            return self.settings.sqlite_path
        return str(self.servers.current)

    @property
    def write_connections(self) -> int:
        """How many connections a flush writes over at once: ``database.flush_connections``,
        or 1 where the database takes one writer at a time (SQLite)."""
        return self.settings.flush_connections if self.dialect.concurrent_writers else 1

    def create_schema(self, create_database: bool = False) -> None:
        """Create what is missing of the tables; with ``create_database``, the database too.

        Safe when several instances start together: nothing is changed when the
        schema is complete (on Galera every DDL statement, even a ``CREATE TABLE
        IF NOT EXISTS`` that does nothing, takes a cluster-wide lock and aborts
        other nodes' transactions on the table); changes are made under a named
        lock where the server has one; and a table or column another instance
        created first is taken as done.
        """
        if create_database:
            self._run(self.dialect.prepare_database, self._current_server())
        with self._connection() as conn:
            cur = conn.cursor()
            if self._missing_schema(conn, cur):
                with self._schema_lock(cur):
                    missing = self._missing_schema(conn, cur)
                    if missing:
                        self._create_missing(conn, cur, missing)
            self._run(conn.rollback)
        if self.driver == "sqlite":
            self._enable_wal()

    def prepare(self) -> None:
        """Get the tables ready for writing: create what is missing of them
        (``database.create_tables``), or at least add the ``ingest_seq`` column that
        tables from older versions lack."""
        if self.settings.create_tables:
            self.create_schema()
        else:
            with self._connection() as conn:
                cur = conn.cursor()
                missing = [kind for kind in self._missing_schema(conn, cur) if kind is not None]
                if missing:
                    with self._schema_lock(cur):
                        self._add_order_column(conn, cur, missing)
                self._run(conn.rollback)
        self.max_allowed_packet = self._read_max_allowed_packet()
        self._prepared = True

    def _missing_schema(self, conn: Any, cur: Any) -> list[RecordType | None]:
        """The record tables that lack ``ingest_seq`` (or do not exist), and None when the
        dead-letter table does not exist.

        The read transaction ends before this returns: a connection that kept the
        tables' metadata locks while it waited for the schema lock would block the
        schema change of the instance holding that lock.
        """
        missing: list[RecordType | None] = []
        checks: list[tuple[RecordType | None, str]] = [
            (kind, f"SELECT {ORDER_COLUMN} FROM {kind.table} WHERE 1 = 0") for kind in RECORD_TYPES
        ]
        checks.append((None, "SELECT id FROM persistence_dead_letters WHERE 1 = 0"))
        for kind, sql in checks:
            try:
                self._run(cur.execute, sql)
                self._run(cur.fetchall)
            except OperatorError:
                missing.append(kind)
        self._run(conn.rollback)
        return missing

    @contextlib.contextmanager
    def _schema_lock(self, cur: Any) -> Iterator[None]:
        """Hold the dialect's named schema lock (if any) on ``cur``'s connection.

        A lock not granted in time is not an error: the changes that follow
        tolerate what another instance did meanwhile.
        """
        if self.dialect.schema_lock_sql is None:
            yield
            return
        take, release = self.dialect.schema_lock_sql
        name = f"persistence_service.schema.{self.settings.database}"[:64]
        wait = max(1, min(_SCHEMA_LOCK_WAIT, int(self.settings.read_timeout) - 1))
        self._run(cur.execute, take, (name, wait))
        (granted,) = self._run(cur.fetchone)
        if granted != 1:
            log.info("schema lock not granted in %d s; changing the schema without it", wait)
        try:
            yield
        finally:
            if granted == 1:
                self._run(cur.execute, release, (name,))
                self._run(cur.fetchall)

    def _create_missing(self, conn: Any, cur: Any, missing: list[RecordType | None]) -> None:
        names = [f"{k.table}.{ORDER_COLUMN}" if k else "persistence_dead_letters" for k in missing]
        log.info("creating what is missing of the schema: %s", ", ".join(names))
        for statement in split_statements(sql_file(self.dialect.ddl_file)):
            self._tolerate_existing(cur, statement)
        self._run(conn.commit)
        still_missing = self._missing_schema(conn, cur)
        self._add_order_column(conn, cur, [kind for kind in still_missing if kind is not None])

    def _add_order_column(self, conn: Any, cur: Any, kinds: list[RecordType]) -> None:
        """Add ``ingest_seq`` to tables created before it existed."""
        for kind in kinds:
            log.warning("adding column %s to %s", ORDER_COLUMN, kind.table)
            self._tolerate_existing(
                cur,
                f"ALTER TABLE {kind.table} ADD COLUMN {ORDER_COLUMN} "
                f"{self.dialect.order_column_type}",
            )
        self._run(conn.commit)

    def _tolerate_existing(self, cur: Any, statement: str) -> None:
        """Run a DDL statement; a table or column that exists already is no error."""
        try:
            self._run(cur.execute, statement)
        except StoreError as exc:
            if not self.dialect.already_exists(exc):
                raise
            log.info("another process created it first: %s", exc)

    def max_record_bytes(self) -> int | None:
        """The largest record, in bytes of SQL, that one statement can carry.

        ``database.max_record_bytes`` when set; else derived from the server's
        ``max_allowed_packet`` (read by :meth:`prepare`); None when neither is known.
        """
        return self.settings.max_record_bytes or self.statement_budget()

    def statement_budget(self) -> int | None:
        """Bytes of values one statement can carry on this server (None: no known limit)."""
        if self.max_allowed_packet is None:
            return None
        return max(0, self.max_allowed_packet - STATEMENT_OVERHEAD)

    def newest_stamp(self) -> int:
        """The largest arrival stamp in the tables (0 when they are empty)."""
        newest = 0
        with self._connection() as conn:
            cur = conn.cursor()
            for kind in RECORD_TYPES:
                self._run(cur.execute, f"SELECT MAX({ORDER_COLUMN}) FROM {kind.table}")
                row = self._run(cur.fetchone)
                newest = max(newest, int(row[0] or 0))
            self._run(conn.rollback)
        return newest

    def _read_max_allowed_packet(self) -> int | None:
        if self.dialect.max_packet_query is None:
            return None
        with self._connection() as conn:
            cur = conn.cursor()
            self._run(cur.execute, self.dialect.max_packet_query)
            row = self._run(cur.fetchone)
            self._run(conn.rollback)
        return int(row[0])

    def upsert(self, kind: RecordType, records: Sequence[Record]) -> None:
        """Write ``records`` (one per key) in one ``executemany`` and one commit."""
        if not records:
            return
        if not self._prepared:
            self.prepare()
        to_row = self._to_row[kind.name]
        rows = [to_row(record) for record in records]
        sql = self._upsert_sql[kind.name]
        self._echo(sql, len(rows))
        with self._connection() as conn:
            cur = conn.cursor()
            try:
                self._run(cur.executemany, sql, rows)
                self._run(conn.commit)
            finally:
                cur.close()

    def existing_sessions(self, session_ids: Iterable[str]) -> set[str]:
        """Which of ``session_ids`` are rows of translation_sessions."""
        wanted = list(session_ids)
        found: set[str] = set()
        if not wanted:
            return found
        if not self._prepared:
            self.prepare()
        with self._connection() as conn:
            cur = conn.cursor()
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ", ".join([self.dialect.placeholder] * len(chunk))
                sql = (
                    f"SELECT {SESSIONS.key} FROM {SESSIONS.table} WHERE {SESSIONS.key} IN ({marks})"
                )
                self._echo(sql, len(chunk))
                self._run(cur.execute, sql, chunk)
                found.update(row[0] for row in self._run(cur.fetchall))
            self._run(conn.rollback)
        return found

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Record ``letters`` in persistence_dead_letters (one row per record key)."""
        if not letters:
            return
        if not self._prepared:
            self.prepare()
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows = [
            (
                letter.kind.name,
                str(letter.record[letter.kind.key]),
                self._dead_letter_payload(letter),
                letter.error_code,
                letter.error_message[:60_000],
                now,
                now,
            )
            for letter in letters
        ]
        sql = self.dialect.dead_letter_sql()
        self._echo(sql, len(rows))
        with self._connection() as conn:
            cur = conn.cursor()
            self._run(cur.executemany, sql, rows)
            self._run(conn.commit)

    def _dead_letter_payload(self, letter: DeadLetter) -> str:
        """The record as JSON text; values too large for one statement are described instead.

        A record dead-lettered because it is too large for the server would be
        refused again inside the dead letter; its large values (each over 64 KiB)
        are replaced by a note of their size, so the dead letter still lands.
        """
        payload = orjson.dumps(letter.record, default=str).decode("utf-8")
        limit = self.statement_budget()
        # Escaping for SQL at most doubles a text.
        if limit is None or 2 * len(payload.encode("utf-8")) <= limit:
            return payload
        shrunk = {}
        for column, value in letter.record.items():
            size = len(orjson.dumps(value, default=str))
            shrunk[column] = (
                f"<{size} bytes, too large to keep in a dead letter>"
                if size > _DEAD_LETTER_VALUE_MAX
                else value
            )
        return orjson.dumps(shrunk, default=str).decode("utf-8")

    def fetch_dead_letters(
        self, record_type: str | None = None, ids: Sequence[int] = (), limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Dead letters, oldest first, optionally of one record type or with given ids."""
        mark = self.dialect.placeholder
        where, params = [], []
        if record_type:
            where.append(f"record_type = {mark}")
            params.append(record_type)
        if ids:
            where.append(f"id IN ({', '.join([mark] * len(ids))})")
            params.extend(ids)
        sql = f"SELECT {', '.join(DEAD_LETTER_COLUMNS)} FROM persistence_dead_letters"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._connection() as conn:
            cur = conn.cursor()
            self._run(cur.execute, sql, params)
            rows = self._run(cur.fetchall)
            self._run(conn.rollback)
        return [dict(zip(DEAD_LETTER_COLUMNS, row, strict=True)) for row in rows]

    def remove_dead_letter(self, letter_id: int) -> None:
        self._execute(
            f"DELETE FROM persistence_dead_letters WHERE id = {self.dialect.placeholder}",
            (letter_id,),
        )

    def note_dead_letter_failure(self, letter_id: int, error: StoreError) -> None:
        """Record that replaying a dead letter failed again, and why."""
        mark = self.dialect.placeholder
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        self._execute(
            f"UPDATE persistence_dead_letters SET attempts = attempts + 1, error_code = {mark}, "
            f"error_message = {mark}, last_failed_at = {mark} WHERE id = {mark}",
            (error.code, str(error)[:60_000], now, letter_id),
        )

    def _execute(self, sql: str, params: Sequence[Any]) -> None:
        self._echo(sql, 1)
        with self._connection() as conn:
            cur = conn.cursor()
            self._run(cur.execute, sql, params)
            self._run(conn.commit)

    def probe(self, timeout: float, failover: bool = True) -> ServerState:
        """Find a server that takes writes, each step bounded by ``timeout`` seconds.

        The server in use is probed first; with ``failover``, when it does not
        answer or does not take writes, the others of ``database.host`` follow in
        failover order and the first writable one becomes the server in use.
        Raises the server in use's error when none is writable
        (:class:`ServerNotReady` when it answered but refused writes).
        """
        if self.servers is None:
            self._probe_sqlite(timeout)
            return ServerState(self.settings.sqlite_path)
        candidates = self.servers.in_probe_order()
        first_error: StoreError | None = None
        for server in candidates if failover else candidates[:1]:
            try:
                state = self._probe_server(server, timeout)
            except StoreError as exc:
                first_error = first_error or exc
                continue
            if state.writable:
                if server != candidates[0]:
                    assert first_error is not None
                    self.servers.use(server, f"does not take writes ({first_error})")
                return state
            first_error = first_error or ServerNotReady(f"{server}: {state.refusal}")
        assert first_error is not None
        raise first_error

    def _probe_server(self, server: DatabaseServer, timeout: float) -> ServerState:
        conn = self._run(self.dialect.connect_once, timeout, server)
        try:
            return self._run(read_server_state, conn, str(server))
        finally:
            try:
                conn.close()
            except Exception:
                log.debug("closing the probe connection failed", exc_info=True)

    def _probe_sqlite(self, timeout: float) -> None:
        conn = self._run(self.dialect.connect_once, timeout, None)
        try:
            cur = conn.cursor()
            self._run(cur.execute, "SELECT 1")
            self._run(cur.fetchall)
        finally:
            try:
                conn.close()
            except Exception:
                log.debug("closing the probe connection failed", exc_info=True)

    def close(self) -> None:
        """Close the pool's idle connections; the next use opens a new pool."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def _current_server(self) -> DatabaseServer | None:
        return self.servers.current if self.servers is not None else None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection to the server in use, returned to the pool at the end.

        The pool is opened anew when it is too old or the server in use has
        changed. A :class:`StoreError` that says the server cannot serve moves
        the store to the next server before it propagates.
        """
        with self._pool_lock:
            server = self._current_server()
            recycle = self.settings.pool_recycle
            expired = recycle and time.monotonic() - self._pool_born > recycle
            if self._pool is not None and (expired or server != self._pool_server):
                self._pool.close()
                self._pool = None
            if self._pool is None:
                self._pool = self._run(self.dialect.create_pool, server)
                self._pool_server, self._pool_born = server, time.monotonic()
            pool = self._pool
        try:
            with self._run(pool.connection) as conn:
                yield conn
        except StoreError as exc:
            if server is not None and self.servers is not None and exc.code in SERVER_UNAVAILABLE:
                self.servers.failed(server, str(exc))
            raise

    def _enable_wal(self) -> None:
        """Switch the SQLite file to WAL, which lets the health probe and readers work
        while the flusher writes. The mode is stored in the file: once one process has
        switched it, the others find it done (the switch itself fails while another
        connection is busy, which is no matter if that other process switched it)."""
        conn = self._run(self.dialect.connect_once, self.settings.write_timeout, None)
        try:
            if self._journal_mode(conn) == "wal":
                return
            try:
                self._run(conn.execute, "PRAGMA journal_mode = WAL")
            except TransientError:
                if self._journal_mode(conn) != "wal":
                    raise
        finally:
            conn.close()

    def _journal_mode(self, conn: Any) -> str:
        return str(self._run(conn.execute, "PRAGMA journal_mode").fetchone()[0]).lower()

    def _run(self, func: Any, *args: Any) -> Any:
        """Call a driver function, turning its exceptions into the :class:`StoreError` class
        that says what they mean (:mod:`persistence.store.errors`)."""
        try:
            return func(*args)
        except StoreError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> StoreError:
        code = self.dialect.error_code(exc)
        cls = self.dialect.classify(exc)
        message = " ".join(str(exc).split())[:1000]
        if code in (None, 0) and message in ("", "(0, '')"):
            message = "the connection to the database was lost"
        if cls is OperatorError:
            # A table or column may have been dropped: check the schema again before
            # the next write (and create what is missing, with database.create_tables).
            self._prepared = False
        return cls(f"{type(exc).__name__}: {message}", code)

    def _echo(self, sql: str, count: int) -> None:
        if self.settings.echo:
            sql_log.info("%s [%d parameter sets]", sql, count)
