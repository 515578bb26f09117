"""The store's cursor sends exactly the statements PyMySQL's own executemany would send.

Both are run on an unconnected PyMySQL connection whose ``execute`` is
captured, so every byte of every statement can be compared: the escaping of
any text (quotes, backslashes, NUL, control and non-ASCII characters), NULLs,
numbers, and where a long batch is split into statements.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymysql.constants import SERVER_STATUS
from pymysql.converters import escape_string as pymysql_escape_string
from pymysql.cursors import Cursor

from persistence.config import DatabaseSettings
from persistence.records import SESSIONS, TASKS
from persistence.store.dialects import MysqlDialect
from persistence.store.multirow import MultiRowCursor, escape_string, multi_row_statements
from tests.factories import new_session_id, session, task

UPSERT = MysqlDialect(DatabaseSettings(driver="mysql")).upsert_sql(TASKS)
WIDTH = len(TASKS.columns)


def unconnected(server_status: int = 0) -> pymysql.connections.Connection:
    conn = pymysql.connections.Connection(defer_connect=True, charset="utf8mb4")
    conn.server_status = server_status  # what the server's handshake would have set
    return conn


class Captured:
    """A cursor class whose statements are kept instead of sent."""

    def __init__(self, base: type[Cursor]) -> None:
        class Capturing(base):  # type: ignore[misc, valid-type]
            def execute(cursor, query: Any, args: Any = None) -> int:  # noqa: N805
                if args is not None:
                    query = cursor.mogrify(query, args)
                self.sent.append(bytes(query) if not isinstance(query, str) else query.encode())
                return 1

        self.cls = Capturing
        self.sent: list[bytes] = []

    def executemany(self, conn: Any, query: str, rows: list[Any], max_length: int) -> list[bytes]:
        cursor = self.cls(conn)
        cursor.max_stmt_length = max_length
        cursor.executemany(query, rows)
        return self.sent


def pymysql_sends(conn: Any, query: str, rows: list[Any], max_length: int) -> list[bytes]:
    return Captured(Cursor).executemany(conn, query, rows, max_length)


values = st.one_of(
    st.none(),
    st.text(),
    st.text(alphabet="\0\\\n\r\x1a'\"%s aé字"),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.decimals(allow_nan=False, allow_infinity=False, places=4),
    st.datetimes(timezones=st.just(UTC)),
)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_strings_are_escaped_as_pymysql_escapes_them(text: str) -> None:
    assert escape_string(text) == pymysql_escape_string(text)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(values, min_size=WIDTH, max_size=WIDTH), min_size=1, max_size=30),
    max_length=st.integers(50, 5000),
)
def test_any_values_give_the_statements_pymysql_sends(
    rows: list[list[Any]], max_length: int
) -> None:
    conn = unconnected()
    expected = pymysql_sends(conn, UPSERT, rows, max_length)
    assert multi_row_statements(conn, UPSERT, rows, max_length) == expected
    assert Captured(MultiRowCursor).executemany(conn, UPSERT, rows, max_length) == expected


def test_the_service_records_give_the_statements_pymysql_sends() -> None:
    dialect = MysqlDialect(DatabaseSettings(driver="mysql"))
    sid = new_session_id()
    records = [
        session(session_id=sid, metadata={"note": 'it\'s \\ "quoted"\n'}),
        session(game_info=None, filename="ünïcödé 字幕.xlsx"),
    ]
    tasks = [
        task(sid, source_text=f'line {n}: O\'Neil said "hi"\r\n\0\x1a', confidence=0.5)
        for n in range(500)
    ]
    conn = unconnected()
    for kind, batch in ((SESSIONS, records), (TASKS, tasks)):
        for record in batch:
            record["ingest_seq"] = 1_700_000_000_000_000
        rows = [dialect.row_converter(kind)(record) for record in batch]
        sql = dialect.upsert_sql(kind)
        expected = pymysql_sends(conn, sql, rows, 20_000)
        assert len(expected) > (1 if kind is TASKS else 0)
        assert multi_row_statements(conn, sql, rows, 20_000) == expected


def test_a_server_without_backslash_escapes_is_left_to_pymysql() -> None:
    conn = unconnected(SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
    rows = [["it's"] + [None] * (WIDTH - 1)]
    assert multi_row_statements(conn, UPSERT, rows, 10_000) is None
    sent = Captured(MultiRowCursor).executemany(conn, UPSERT, rows, 10_000)
    assert sent == pymysql_sends(conn, UPSERT, rows, 10_000)
    assert b"'it''s'" in sent[0]


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("UPDATE t SET a = %s", [(1,), (2,)]),  # not an insert: one statement per row
        ("INSERT INTO t (a, b) VALUES (%(a)s, %(b)s)", [{"a": 1, "b": "x"}]),  # named
        ("INSERT INTO t (a, b) VALUES (%s, 'fixed')", [(1,), (2,)]),  # not only parameters
    ],
)
def test_what_it_does_not_build_goes_to_pymysql(query: str, rows: list[Any]) -> None:
    conn = unconnected()
    if not isinstance(rows[0], dict):
        assert multi_row_statements(conn, query, rows, 10_000) is None
    sent = Captured(MultiRowCursor).executemany(conn, query, rows, 10_000)
    assert sent == pymysql_sends(conn, query, rows, 10_000)


def test_a_value_pymysql_refuses_is_refused_alike() -> None:
    conn = unconnected()
    rows = [[float("nan")] + [None] * (WIDTH - 1)]
    with pytest.raises(pymysql.err.ProgrammingError):
        multi_row_statements(conn, UPSERT, rows, 10_000)
    decimals = [[Decimal("1.5"), datetime(2026, 1, 1, tzinfo=UTC)] + [None] * (WIDTH - 2)]
    assert multi_row_statements(conn, UPSERT, decimals, 10_000) == pymysql_sends(
        conn, UPSERT, decimals, 10_000
    )


def test_a_batch_is_split_exactly_where_pymysql_splits_it() -> None:
    conn = unconnected()
    rows = [[f"row {n}"] + [None] * (WIDTH - 1) for n in range(3)]
    whole = pymysql_sends(conn, UPSERT, rows, 1 << 20)
    assert len(whole) == 1
    for max_length in range(len(whole[0]) - 3, len(whole[0]) + 3):
        expected = pymysql_sends(conn, UPSERT, rows, max_length)
        assert multi_row_statements(conn, UPSERT, rows, max_length) == expected
    assert len(pymysql_sends(conn, UPSERT, rows, len(whole[0]) - 1)) == 2
