"""The size of a record as SQL (persistence/sqlsize.py) and the limit validate_batch applies.

Sizes are checked against PyMySQL's own escaping of the parameters the MySQL
store builds (its row converter), and on a real connection against the row
PyMySQL writes into the statement.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymysql.converters import escape_item

from persistence.config import DatabaseSettings
from persistence.errors import InvalidRecords
from persistence.intake import validate_batch
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, RecordType
from persistence.schemas import TEXT_MAX_BYTES, build_session_schema, build_task_schema
from persistence.sqlsize import (
    FLOAT_BYTES,
    RecordSizer,
    field_bound,
    json_bytes,
    quoted_bytes,
    sizer_for,
    value_bytes,
)
from persistence.store.dialects import MysqlDialect
from tests.conftest import MysqlServer
from tests.factories import new_session_id, session, task

SESSION_SCHEMA = build_session_schema(["pending", "processing", "completed", "failed", "cancelled"])
TASK_SCHEMA = build_task_schema(["pending", "processing", "completed", "failed"])
SCHEMAS = {"session": SESSION_SCHEMA, "task": TASK_SCHEMA}
KINDS = {"session": SESSIONS, "task": TASKS}
DIALECT = MysqlDialect(DatabaseSettings())
STAMP = 1_780_000_000_123_456


def escaped(value: Any) -> int:
    """The bytes PyMySQL writes for one parameter (backslash-escaping mode)."""
    return len(escape_item(value, "utf8mb4").encode("utf-8"))


def row_text_bytes(kind: RecordType, record: dict[str, Any]) -> int:
    """The bytes of ``(v1, v2, ...)`` as PyMySQL builds it from the store's parameters."""
    params = DIALECT.row_converter(kind)(record)
    return sum(escaped(value) for value in params) + 2 * len(params)


def loaded(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    (result,) = SCHEMAS[kind].load([record])
    return result


# --- single values -------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
SPECIALS = st.text(alphabet="\x00\n\r\x1a'\"\\aé😀", max_size=40)


@settings(max_examples=300, deadline=None, database=None)
@given(
    value=st.one_of(
        st.none(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        ANY_TEXT,
        SPECIALS,
    )
)
def test_value_bytes_is_what_pymysql_writes(value: Any) -> None:
    assert value_bytes(value) == escaped(value)


@settings(max_examples=300, deadline=None, database=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_no_float_takes_more_than_float_bytes(value: float) -> None:
    assert value_bytes(value) <= FLOAT_BYTES


def test_float_bytes_is_reached() -> None:
    assert value_bytes(-0.00012345678901234567) == FLOAT_BYTES


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 2), ("abc", 5), ("it's", 7), ('\\"\n\r\x00\x1a', 14), ("é😀", 8)],
)
def test_quoted_bytes_counts_quotes_escapes_and_utf8(text: str, expected: int) -> None:
    assert quoted_bytes(text) == expected == escaped(text)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT
    | SPECIALS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SPECIALS, inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, database=None)
@given(value=JSON)
def test_json_bytes_is_what_the_store_sends_for_a_json_column(value: Any) -> None:
    record = loaded("session", session(metadata={"v": value}))
    row = DIALECT.row_converter(SESSIONS)({**record, ORDER_COLUMN: 1})
    params = dict(zip(SESSIONS.columns, row, strict=True))
    assert json_bytes(record["metadata"]) == escaped(params["metadata"])


# --- the schema's bounds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field", "value", "tight"),
    [
        ("task", "task_id", "😀" * 64, True),
        ("task", "batch_id", "'" * 64, False),
        ("task", "source_text", "'" * TEXT_MAX_BYTES, True),
        ("task", "target_text", "\\" * TEXT_MAX_BYTES, True),
        ("task", "context", "😀" * (TEXT_MAX_BYTES // 4), False),
        ("task", "row_index", 2_147_483_647, True),
        ("task", "duration_ms", 2_147_483_647, True),
        ("task", "start_time", "2030-01-01T00:00:00Z", True),
        ("task", "status", "processing", True),
        ("task", "confidence", 0.00012345678901234567, False),  # no sign
        ("session", "filename", "😀" * 255, True),
        ("session", "file_path", '"' * 512, False),
        ("session", "session_id", new_session_id(), True),
        ("session", "status", "processing", True),
    ],
)
def test_field_bounds_hold_for_the_widest_values_accepted(
    kind: str, field: str, value: Any, tight: bool
) -> None:
    raw = task(new_session_id(), **{field: value}) if kind == "task" else session(**{field: value})
    size = value_bytes(loaded(kind, raw)[field])
    bound = field_bound(SCHEMAS[kind].load_fields[field])
    assert bound is not None
    assert size <= bound
    assert (size == bound) == tight


def test_json_columns_have_no_schema_bound() -> None:
    assert field_bound(SESSION_SCHEMA.load_fields["metadata"]) is None
    sizer = RecordSizer(SESSIONS, SESSION_SCHEMA)
    assert sizer.measured == ("game_info", "metadata")
    assert RecordSizer(TASKS, TASK_SCHEMA).measured == ()


@st.composite
def records_near_their_limits(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid record whose texts and JSON objects are drawn with many escaped characters."""
    kind = draw(st.sampled_from(["session", "task"]))
    text = st.text(alphabet="\x00\n'\"\\a é😀", min_size=1, max_size=200).filter(str.strip)
    if kind == "task":
        fields = {name: draw(text) for name in ("source_text", "target_text", "context")}
        fields["task_id"] = draw(text.map(str.strip).filter(bool).map(lambda t: t[:64]))
        return kind, loaded(kind, task(new_session_id(), **fields))
    fields = {"filename": draw(text.map(lambda t: t[:255])), "metadata": {"v": draw(JSON)}}
    return kind, loaded(kind, session(**fields))


@settings(max_examples=200, deadline=None, database=None)
@given(case=records_near_their_limits())
def test_the_cheap_bound_is_never_below_the_exact_size(case: tuple[str, dict[str, Any]]) -> None:
    kind, record = case
    sizer = RecordSizer(KINDS[kind], SCHEMAS[kind])
    exact = sizer.row_bytes(sizer.sizes(record))
    assert sizer.bound(record) >= exact
    stamped = {**record, ORDER_COLUMN: STAMP}
    assert sizer.row_bytes(sizer.sizes(stamped)) == row_text_bytes(KINDS[kind], stamped)
    assert exact >= row_text_bytes(KINDS[kind], stamped)  # the stamp counted at its widest


def test_sizers_are_built_once_per_kind_and_schema() -> None:
    assert sizer_for(SESSIONS, SESSION_SCHEMA) is sizer_for(SESSIONS, SESSION_SCHEMA)
    assert sizer_for(TASKS, TASK_SCHEMA) is not sizer_for(SESSIONS, SESSION_SCHEMA)


# --- validate_batch(max_record_bytes=...) --------------------------------------------------


def exact_size(kind: str, record: dict[str, Any]) -> int:
    sizer = RecordSizer(KINDS[kind], SCHEMAS[kind])
    return sizer.row_bytes(sizer.sizes(loaded(kind, record)))


def test_a_session_too_large_for_the_database_is_refused_with_its_size_and_the_limit() -> None:
    big = session(metadata={"notes": "'" * 4_718_592})  # 9 MB once escaped
    small = session()
    size = exact_size("session", big)
    limit = 8_388_096
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(
            SESSIONS, {"sessions": [small, big]}, SESSION_SCHEMA, 1000, max_record_bytes=limit
        )
    assert exc.value.status == 422
    assert exc.value.detail == (
        "1 of 2 sessions are too large for the database; nothing was accepted."
    )
    (entry,) = exc.value.extra["errors"]
    assert entry["index"] == 1
    assert entry["session_id"] == big["session_id"]
    assert entry["field"] == "metadata"
    assert entry["message"].startswith(
        f"The record is {size:,} bytes as SQL; at most 8,388,096 are accepted "
        "(database.max_record_bytes, derived from the server's max_allowed_packet). "
        f"Largest fields: metadata {json_bytes(big['metadata']):,} bytes, "
    )
    assert size > 9_437_000


@pytest.mark.parametrize("kind", ["session", "task"])
def test_a_record_of_exactly_the_limit_is_accepted_and_one_byte_more_refused(kind: str) -> None:
    if kind == "session":
        record = session(metadata={"notes": "a\\'" * 50_000}, game_info=None)
    else:
        record = task(new_session_id(), source_text="a\\'" * 20_000, context="é" * 30_000)
    size = exact_size(kind, record)
    body = {KINDS[kind].plural: [record]}
    schema = SCHEMAS[kind]
    assert validate_batch(KINDS[kind], body, schema, 10, max_record_bytes=size)
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(KINDS[kind], body, schema, 10, max_record_bytes=size - 1)
    assert (
        f"The record is {size:,} bytes as SQL; at most {size - 1:,} are accepted"
        in (exc.value.extra["errors"][0]["message"])
    )


def _unexpected(*args: Any) -> int:
    raise AssertionError("measured a record the cheap check should have passed")


def test_tasks_are_not_measured_when_the_schema_bounds_them_under_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    widest = sizer_for(TASKS, TASK_SCHEMA).fixed_bytes
    monkeypatch.setattr(RecordSizer, "bound", _unexpected)
    monkeypatch.setattr(RecordSizer, "sizes", _unexpected)
    records = [task(new_session_id(), source_text="'" * TEXT_MAX_BYTES) for _ in range(3)]
    body = {"tasks": records}
    assert len(validate_batch(TASKS, body, TASK_SCHEMA, 10, max_record_bytes=widest)) == 3
    with pytest.raises(AssertionError, match="measured"):
        validate_batch(TASKS, body, TASK_SCHEMA, 10, max_record_bytes=widest - 1)


def test_small_sessions_are_not_measured_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RecordSizer, "sizes", _unexpected)
    records = [session() for _ in range(3)]
    body = {"sessions": records}
    assert len(validate_batch(SESSIONS, body, SESSION_SCHEMA, 10, max_record_bytes=8 << 20)) == 3


def test_no_limit_accepts_any_size() -> None:
    record = session(metadata={"notes": "x" * 2_000_000})
    body = {"sessions": [record]}
    assert validate_batch(SESSIONS, body, SESSION_SCHEMA, 10, max_record_bytes=None)
    assert validate_batch(SESSIONS, body, SESSION_SCHEMA, 10)


def test_largest_fields_are_named_largest_first() -> None:
    record = task(new_session_id(), source_text="s" * 3000, target_text="t" * 2000, context="c")
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": [record]}, TASK_SCHEMA, 10, max_record_bytes=4000)
    (entry,) = exc.value.extra["errors"]
    assert entry["field"] == "source_text"
    assert re.search(
        r"Largest fields: source_text 3,002 bytes, target_text 2,002 bytes, \w+ \d+ bytes\.$",
        entry["message"],
    )


def test_every_record_over_the_limit_is_counted_and_the_list_stays_short() -> None:
    records = [session(metadata={"n": "x" * 5000}) for _ in range(300)] + [session()]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(SESSIONS, {"sessions": records}, SESSION_SCHEMA, 1000, max_record_bytes=4000)
    assert (
        exc.value.detail
        == "300 of 301 sessions are too large for the database; nothing was accepted."
    )
    assert exc.value.extra["error_count"] == 300
    assert len(exc.value.extra["errors"]) == 100


# --- against a real connection -------------------------------------------------------------


@pytest.mark.mysql
@pytest.mark.parametrize("kind", ["session", "task"])
def test_sizes_match_the_row_pymysql_writes_on_a_real_connection(
    kind: str, mysql_server: MysqlServer
) -> None:
    odd = 'it\'s a "quote", a \\ backslash,\n a NUL \x00, ctrl-Z \x1a, é, 😀'
    if kind == "session":
        raw = session(filename=odd[:60], metadata={"odd": odd, "n": [2**64 - 1, 0.1]})
    else:
        raw = task(new_session_id(), source_text=odd, context=odd * 3, confidence=0.3333)
    record = {**loaded(kind, raw), ORDER_COLUMN: STAMP}
    row = DIALECT.row_converter(KINDS[kind])(record)
    values = "(" + ", ".join(["%s"] * len(row)) + ")"  # the VALUES group of the upsert
    conn = mysql_server.connect()
    try:
        with conn.cursor() as cur:
            written = cur.mogrify(values, row).encode("utf-8")
    finally:
        conn.close()
    sizer = RecordSizer(KINDS[kind], SCHEMAS[kind])
    assert sizer.row_bytes(sizer.sizes(record)) == len(written)
