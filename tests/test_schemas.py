"""Unit tests of the record rules (persistence/schemas.py) and of intake (persistence/intake.py).

Each rule of SPEC §4 is checked on both sides of its limit, counted the way
MySQL counts it: VARCHAR(n) in characters, TEXT in UTF-8 bytes, INT and
TIMESTAMP by their ranges.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from persistence.errors import BadRequest, InvalidRecords
from persistence.intake import (
    MAX_ERRORS_BYTES,
    MAX_ERRORS_LISTED,
    MAX_KEY_CHARS,
    MAX_MESSAGE_CHARS,
    decode_json,
    describe_errors,
    validate_batch,
)
from persistence.intake import refusal as refusal_of
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS
from persistence.schemas import build_session_schema, build_task_schema, json_fault
from tests.factories import new_session_id, session, task

SESSION_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
TASK_STATUSES = ("pending", "processing", "completed", "failed")
SESSION_SCHEMA = build_session_schema(SESSION_STATUSES)
TASK_SCHEMA = build_task_schema(TASK_STATUSES)
SID = "0b7c52d4-5e7a-4b8e-9f3d-2a1c6e8f9b01"

INT_MAX = 2_147_483_647
TEXT_MAX_BYTES = 65_535

SESSION_REQUIRED = ("session_id", "filename", "file_path", "status", "llm_provider")
TASK_REQUIRED = (
    "task_id",
    "session_id",
    "batch_id",
    "sheet_name",
    "row_index",
    "column_name",
    "source_text",
    "status",
)
VARCHAR_LIMITS = [
    ("session", "filename", 255),
    ("session", "file_path", 512),
    ("session", "llm_provider", 50),
    ("task", "task_id", 64),
    ("task", "batch_id", 64),
    ("task", "sheet_name", 255),
    ("task", "column_name", 255),
]
REQUIRED_TEXT = [(kind, name) for kind, name, _ in VARCHAR_LIMITS] + [("task", "source_text")]
TEXT_FIELDS = ("source_text", "target_text", "context", "error_message")
OPTIONAL_TEXT_FIELDS = ("target_text", "context", "error_message")
COUNT_FIELDS = [
    ("session", "total_tasks"),
    ("session", "completed_tasks"),
    ("session", "failed_tasks"),
    ("session", "processing_tasks"),
    ("task", "row_index"),
    ("task", "retry_count"),
    ("task", "duration_ms"),
]
TIME_FIELDS = ("start_time", "end_time")
JSON_FIELDS = ("game_info", "metadata")


# --- helpers -------------------------------------------------------------------------------


def record(kind: str, **fields: Any) -> dict[str, Any]:
    if kind == "session":
        return session(**fields)
    return task(fields.pop("session_id", SID), **fields)


def schema_of(kind: str) -> Any:
    return SESSION_SCHEMA if kind == "session" else TASK_SCHEMA


def load(kind: str, rec: dict[str, Any], schema: Any = None) -> dict[str, Any]:
    """The one loaded record of ``rec``; fails the test if it is refused."""
    return (schema or schema_of(kind)).load([rec])[0]


def refusal(kind: str, rec: Any, schema: Any = None) -> dict[str, list[str]]:
    """The field errors of ``rec``, which must be refused."""
    with pytest.raises(ValidationError) as exc:
        (schema or schema_of(kind)).load([rec])
    assert list(exc.value.messages) == [0]
    return exc.value.messages[0]


def refused_on(kind: str, field: str, value: Any) -> list[str]:
    """The messages of ``field`` when it holds ``value``, which must be refused for that field."""
    errors = refusal(kind, record(kind, **{field: value}))
    assert set(errors) == {field}, errors
    return errors[field]


def utc_text(moment: datetime | None) -> str | None:
    """How a loaded record holds a time: UTC text ``YYYY-MM-DD HH:MM:SS`` (naive, whole seconds)."""
    return None if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def without(rec: dict[str, Any], field: str) -> dict[str, Any]:
    return {name: value for name, value in rec.items() if name != field}


def nested(depth: int, via_list: bool = False) -> dict[str, Any]:
    """A JSON object of exactly ``depth`` nested containers (objects, or arrays inside objects)."""
    value: Any = {"leaf": 1}
    for _ in range(depth - 2):
        value = [value] if via_list else {"k": value}
    return {"k": value}


# --- valid records, defaults, unknown fields -----------------------------------------------


def test_factory_session_loads_with_its_values() -> None:
    rec = session()
    assert load("session", rec) == rec


def test_factory_task_loads_with_its_values() -> None:
    rec = task(SID)
    assert load("task", rec) == rec


def test_session_defaults_fill_counters_with_zero_and_json_with_none() -> None:
    rec = {name: session()[name] for name in SESSION_REQUIRED}
    loaded = load("session", rec)
    assert set(loaded) == set(SESSIONS.columns) - {ORDER_COLUMN}
    assert loaded["game_info"] is None
    assert loaded["metadata"] is None
    for counter in ("total_tasks", "completed_tasks", "failed_tasks", "processing_tasks"):
        assert loaded[counter] == 0


def test_task_defaults_fill_optional_fields_with_none_and_retry_count_with_zero() -> None:
    rec = {name: task(SID)[name] for name in TASK_REQUIRED}
    loaded = load("task", rec)
    assert set(loaded) == set(TASKS.columns) - {ORDER_COLUMN}
    assert loaded["retry_count"] == 0
    for name in (
        "target_text",
        "context",
        "error_message",
        "confidence",
        "start_time",
        "end_time",
        "duration_ms",
    ):
        assert loaded[name] is None, name


@pytest.mark.parametrize("kind", ["session", "task"])
def test_unknown_fields_are_dropped(kind: str) -> None:
    rec = record(kind, created_at="2024-01-01T00:00:00Z", extra={"a": 1}, id=7)
    loaded = load(kind, rec)
    columns = SESSIONS.columns if kind == "session" else TASKS.columns
    assert set(loaded) == set(columns) - {ORDER_COLUMN}
    assert "extra" not in loaded
    assert "created_at" not in loaded


def test_errors_of_many_records_are_keyed_by_index() -> None:
    records = [task(SID), task(SID, row_index=-1), task(SID), task(SID, status="nope")]
    with pytest.raises(ValidationError) as exc:
        TASK_SCHEMA.load(records)
    assert set(exc.value.messages) == {1, 3}
    assert set(exc.value.messages[1]) == {"row_index"}
    assert set(exc.value.messages[3]) == {"status"}


# --- required fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field"),
    [("session", name) for name in SESSION_REQUIRED] + [("task", name) for name in TASK_REQUIRED],
)
def test_required_field_missing_is_refused(kind: str, field: str) -> None:
    errors = refusal(kind, without(record(kind), field))
    assert errors == {field: ["Missing data for required field."]}


@pytest.mark.parametrize(
    ("kind", "field"),
    [("session", name) for name in SESSION_REQUIRED] + [("task", name) for name in TASK_REQUIRED],
)
def test_required_field_null_is_refused(kind: str, field: str) -> None:
    assert refused_on(kind, field, None) == ["Field may not be null."]


# --- text: blank, type, surrogates, lengths ------------------------------------------------


@pytest.mark.parametrize(("kind", "field"), REQUIRED_TEXT)
@pytest.mark.parametrize("blank", ["", " ", "\t\n ", "\u3000"])
def test_required_text_blank_is_refused(kind: str, field: str, blank: str) -> None:
    assert refused_on(kind, field, blank) == ["Must not be empty."]


@pytest.mark.parametrize("field", OPTIONAL_TEXT_FIELDS)
@pytest.mark.parametrize("value", ["", "   ", None, "déjà vu"])
def test_optional_text_accepts_blank_null_and_text(field: str, value: str | None) -> None:
    assert load("task", task(SID, **{field: value}))[field] == value


@pytest.mark.parametrize(("kind", "field"), [*REQUIRED_TEXT, ("task", "target_text")])
@pytest.mark.parametrize("value", [5, 1.5, True, ["a"], {"a": "b"}])
def test_text_fields_refuse_non_strings(kind: str, field: str, value: Any) -> None:
    assert refused_on(kind, field, value) == ["Not a valid string."]


@pytest.mark.parametrize(
    ("kind", "field"), [*REQUIRED_TEXT, ("task", "target_text"), ("task", "error_message")]
)
@pytest.mark.parametrize("value", ["\ud800", "ok\udfffok", "\ude00\ud83d"])
def test_unpaired_surrogates_are_refused(kind: str, field: str, value: str) -> None:
    (message,) = refused_on(kind, field, value)
    assert "surrogate" in message


def test_paired_emoji_is_accepted_in_text() -> None:
    assert load("task", task(SID, source_text="go 😀"))["source_text"] == "go 😀"


@pytest.mark.parametrize(("kind", "field", "limit"), VARCHAR_LIMITS)
@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
def test_varchar_limit_counts_characters(kind: str, field: str, limit: int, char: str) -> None:
    value = char * limit
    assert load(kind, record(kind, **{field: value}))[field] == value
    assert refused_on(kind, field, char * (limit + 1)) == [f"Longer than {limit} characters."]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize(
    ("char", "fits"),
    [("a", 65_535), ("é", 32_767), ("€", 21_845), ("😀", 16_383)],
)
def test_text_limit_counts_utf8_bytes(field: str, char: str, fits: int) -> None:
    value = char * fits
    assert len(value.encode("utf-8")) <= TEXT_MAX_BYTES
    assert load("task", task(SID, **{field: value}))[field] == value
    too_long = char * (fits + 1)
    assert len(too_long.encode("utf-8")) > TEXT_MAX_BYTES
    (message,) = refused_on("task", field, too_long)
    assert "65535 bytes" in message
    assert f"({len(too_long.encode('utf-8'))} bytes)" in message


def test_text_limit_with_mixed_widths_at_exact_boundary() -> None:
    value = "😀" * 16_383 + "€"  # 65,532 + 3 = 65,535 bytes
    assert len(value.encode("utf-8")) == TEXT_MAX_BYTES
    assert load("task", task(SID, source_text=value))["source_text"] == value
    refused_on("task", "source_text", value + "a")


# --- identifiers ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["session", "task"])
def test_session_id_is_normalised_to_lower_case(kind: str) -> None:
    upper = SID.upper()
    assert load(kind, record(kind, session_id=upper))["session_id"] == SID


@pytest.mark.parametrize("kind", ["session", "task"])
def test_canonical_session_id_is_kept(kind: str) -> None:
    sid = new_session_id()
    assert load(kind, record(kind, session_id=sid))["session_id"] == sid


@pytest.mark.parametrize("kind", ["session", "task"])
@pytest.mark.parametrize(
    "value",
    [
        SID.replace("-", ""),  # 32 hex digits, no hyphens
        "{" + SID + "}",  # 38 characters
        "urn:uuid:" + SID,
        SID[:-1],  # 35 characters
        SID + "0",  # 37 characters
        "z" + SID[1:],  # not hexadecimal
        "",
        "x" * 36,
    ],
)
def test_session_id_must_be_a_36_character_uuid(kind: str, value: str) -> None:
    assert refused_on(kind, "session_id", value) == ["Must be a UUID of 36 characters."]


@pytest.mark.parametrize("kind", ["session", "task"])
@pytest.mark.parametrize(
    "value",
    [
        " " + SID[1:],  # 36 characters: a space and 35 of the id
        SID[:-1] + "\n",  # 36 characters: a truncated id and a newline
        "+" + SID[1:],  # a sign in front of the digits
        SID[:4] + "_" + SID[5:],  # an underscore among the digits
        "----" + SID.replace("-", ""),  # 36 characters, hyphens in the wrong places
    ],
)
def test_session_id_refuses_36_characters_that_are_not_the_uuid_text_form(
    kind: str, value: str
) -> None:
    # uuid.UUID() strips hyphens and braces and then calls int(hex, 16), which tolerates
    # surrounding whitespace, a sign and underscores: these strings would otherwise be
    # accepted and silently stored under a different (shifted) UUID.
    assert len(value) == 36
    assert refused_on(kind, "session_id", value) == ["Must be a UUID of 36 characters."]


@pytest.mark.parametrize("kind", ["session", "task"])
@pytest.mark.parametrize("value", [12345, ["a"], True])
def test_session_id_refuses_non_strings(kind: str, value: Any) -> None:
    refused_on(kind, "session_id", value)


@pytest.mark.parametrize("value", [" task-1", "task-1 ", "task-1\n", "\ttask-1", "\u00a0task-1"])
def test_task_id_with_surrounding_whitespace_is_refused(value: str) -> None:
    assert refused_on("task", "task_id", value) == ["Must not start or end with whitespace."]


def test_task_id_with_inner_space_is_accepted() -> None:
    assert load("task", task(SID, task_id="task 1"))["task_id"] == "task 1"


# --- integers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "field"), COUNT_FIELDS)
@pytest.mark.parametrize("value", [0, 1, INT_MAX])
def test_integers_accept_zero_to_int_max(kind: str, field: str, value: int) -> None:
    loaded = load(kind, record(kind, **{field: value}))[field]
    assert loaded == value
    assert type(loaded) is int


@pytest.mark.parametrize(("kind", "field"), COUNT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "1", "0", 1.5, 0.5, [1], {"n": 1}])
def test_integers_refuse_booleans_strings_and_fractions(kind: str, field: str, value: Any) -> None:
    assert refused_on(kind, field, value) == ["Must be an integer."]


@pytest.mark.parametrize(("kind", "field"), COUNT_FIELDS)
@pytest.mark.parametrize("value", [-1, -INT_MAX - 1, INT_MAX + 1, 2**63])
def test_integers_refuse_out_of_int_range(kind: str, field: str, value: int) -> None:
    (message,) = refused_on(kind, field, value)
    assert str(INT_MAX) in message


@pytest.mark.parametrize(
    "field", ["total_tasks", "completed_tasks", "failed_tasks", "processing_tasks"]
)
def test_session_counters_default_to_zero_when_omitted(field: str) -> None:
    assert load("session", without(session(), field))[field] == 0


def test_retry_count_defaults_to_zero_and_duration_to_none() -> None:
    loaded = load("task", without(without(task(SID), "retry_count"), "duration_ms"))
    assert loaded["retry_count"] == 0
    assert loaded["duration_ms"] is None


def test_duration_ms_accepts_null() -> None:
    assert load("task", task(SID, duration_ms=None))["duration_ms"] is None


# --- confidence ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.5, 0.9999, None])
def test_confidence_accepts_numbers_from_zero_to_one(value: float | None) -> None:
    loaded = load("task", task(SID, confidence=value))["confidence"]
    assert loaded == value
    assert loaded is None or isinstance(loaded, float)


@pytest.mark.parametrize("value", [-0.0001, -1, 1.0001, 2, 100])
def test_confidence_refuses_numbers_outside_zero_to_one(value: float) -> None:
    (message,) = refused_on("task", "confidence", value)
    assert "0" in message
    assert "1" in message


@pytest.mark.parametrize("value", [True, False, "0.5", "1", [0.5], {"v": 0.5}])
def test_confidence_refuses_booleans_and_strings(value: Any) -> None:
    assert refused_on("task", "confidence", value) == ["Must be a number."]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_confidence_refuses_nan_and_infinity(value: float) -> None:
    refused_on("task", "confidence", value)


# --- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T12:30:45+02:00", datetime(2024, 5, 1, 10, 30, 45)),
        ("2024-05-01T12:30:45-05:30", datetime(2024, 5, 1, 18, 0, 45)),
        ("2024-12-31T23:30:00-01:00", datetime(2025, 1, 1, 0, 30, 0)),
        ("2024-05-01T12:30:45Z", datetime(2024, 5, 1, 12, 30, 45)),
        ("2024-05-01T12:30:45+00:00", datetime(2024, 5, 1, 12, 30, 45)),
        ("2024-05-01T12:30:45", datetime(2024, 5, 1, 12, 30, 45)),
        ("2024-05-01T12:30:45.999999Z", datetime(2024, 5, 1, 12, 30, 45)),
        ("2024-05-01T12:30:45.5+01:00", datetime(2024, 5, 1, 11, 30, 45)),
        ("2024-05-01T12:30:45.123", datetime(2024, 5, 1, 12, 30, 45)),
        (None, None),
    ],
)
def test_timestamps_become_utc_text_in_whole_seconds(
    field: str, value: str | None, expected: datetime | None
) -> None:
    loaded = load("task", task(SID, **{field: value}))[field]
    assert loaded == utc_text(expected)


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1970-01-01T00:00:01Z", datetime(1970, 1, 1, 0, 0, 1)),
        ("1970-01-01T01:00:01+01:00", datetime(1970, 1, 1, 0, 0, 1)),
        ("2038-01-19T03:14:07Z", datetime(2038, 1, 19, 3, 14, 7)),
        ("2038-01-19T03:14:07.999999Z", datetime(2038, 1, 19, 3, 14, 7)),
        ("2038-01-19T02:14:07-01:00", datetime(2038, 1, 19, 3, 14, 7)),
    ],
)
def test_timestamps_at_the_column_limits_are_accepted(
    field: str, value: str, expected: datetime
) -> None:
    assert load("task", task(SID, **{field: value}))[field] == utc_text(expected)


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize(
    "value",
    [
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00.999999Z",  # whole seconds: 00:00:00
        "1970-01-01T00:00:01+01:00",  # 1969-12-31T23:00:01Z
        "1969-12-31T23:59:59Z",
        "1900-01-01T00:00:00",
        "2038-01-19T03:14:08Z",
        "2038-01-19T04:14:07-01:00",  # 05:14:07Z
        "2100-01-01T00:00:00Z",
    ],
)
def test_timestamps_outside_the_column_range_are_refused(field: str, value: str) -> None:
    (message,) = refused_on("task", field, value)
    assert "1970-01-01T00:00:01Z" in message
    assert "2038-01-19T03:14:07Z" in message


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",  # converting to UTC falls before year 1
        "9999-12-31T23:59:59-01:00",  # converting to UTC falls after year 9999
    ],
)
def test_timestamps_at_the_edges_of_the_calendar_are_refused_not_crashed(
    field: str, value: str
) -> None:
    # Must be a ValidationError (422), not an OverflowError escaping the schema (500).
    (message,) = refused_on("task", field, value)
    assert "1970-01-01T00:00:01Z" in message


@pytest.mark.parametrize("field", TIME_FIELDS)
@pytest.mark.parametrize(
    "value", ["yesterday", "2024-13-01T00:00:00", "2024-05-01T25:00:00", 1_700_000_000, True, ""]
)
def test_timestamps_refuse_non_dates(field: str, value: Any) -> None:
    refused_on("task", field, value)


# --- JSON objects --------------------------------------------------------------------------


@pytest.mark.parametrize("field", JSON_FIELDS)
@pytest.mark.parametrize("value", [[], [{"a": 1}], "text", 5, True])
def test_json_fields_refuse_non_objects(field: str, value: Any) -> None:
    refused_on("session", field, value)


@pytest.mark.parametrize("field", JSON_FIELDS)
@pytest.mark.parametrize("value", [None, {}, {"a": [1, {"b": None}], "c": "é😀"}])
def test_json_fields_accept_objects_and_null(field: str, value: Any) -> None:
    assert load("session", session(**{field: value}))[field] == value


@pytest.mark.parametrize("field", JSON_FIELDS)
@pytest.mark.parametrize("via_list", [False, True])
def test_json_nesting_of_31_levels_is_accepted_and_32_refused(field: str, via_list: bool) -> None:
    deepest_allowed = nested(31, via_list)
    assert load("session", session(**{field: deepest_allowed}))[field] == deepest_allowed
    assert refused_on("session", field, nested(32, via_list)) == ["Nested deeper than 31 levels."]


def test_nested_helper_counts_containers() -> None:
    assert nested(2) == {"k": {"leaf": 1}}
    assert nested(3, via_list=True) == {"k": [{"leaf": 1}]}


def test_json_nesting_far_too_deep_is_refused_without_recursion_error() -> None:
    refused_on("session", "metadata", nested(5000))


INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


@pytest.mark.parametrize("field", JSON_FIELDS)
@pytest.mark.parametrize(
    "number",
    [INT64_MIN, 2**63 - 1, 2**63, UINT64_MAX, 0, -0.0, 5e-324, 1.7976931348623157e308, 1e30],
)
def test_json_numbers_a_column_stores_exactly_are_accepted(field: str, number: Any) -> None:
    value = {"n": number, "in": [{"list": [number]}]}
    loaded = load("session", session(**{field: value}))[field]
    assert loaded == value
    assert type(loaded["n"]) is type(number)


@pytest.mark.parametrize("field", JSON_FIELDS)
@pytest.mark.parametrize("number", [INT64_MIN - 1, UINT64_MAX + 1, 10**30, -(10**300)])
def test_json_integers_outside_64_bits_are_refused_with_their_path(field: str, number: int) -> None:
    value = {"a": {"b": [1, {"c": number}]}}
    (message,) = refused_on("session", field, value)
    assert message == (
        f"Holds an integer outside the 64-bit range at {field}.a.b[1].c; a JSON column keeps "
        f"integers from {INT64_MIN} to {UINT64_MAX} exactly. Send larger numbers as strings."
    )


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_json_nan_and_infinities_are_refused(number: float) -> None:
    (message,) = refused_on("session", "metadata", {"x": [number]})
    assert (
        message == "Holds NaN or an infinite number at metadata.x[0], which JSON cannot represent."
    )


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"s": "\ud800"}, "metadata.s"),
        ({"\udfff": 1}, "a key of metadata"),
        ({"a": {"b": ["ok", "x\ud800"]}}, "metadata.a.b[1]"),
    ],
)
def test_json_text_with_unpaired_surrogates_is_refused(value: Any, where: str) -> None:
    assert refused_on("session", "metadata", value) == [
        f"Holds text with an unpaired surrogate at {where}."
    ]


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"t": (1, 2)}, "metadata.t"),
        ({"s": {1, 2}}, "metadata.s"),
        ({"b": b"x"}, "metadata.b"),
        ({1: "int key"}, "a key of metadata"),
        ({"a": [object()]}, "metadata.a[0]"),
    ],
)
def test_json_values_python_alone_can_make_are_refused(value: Any, where: str) -> None:
    assert refused_on("session", "metadata", value) == [
        f"Holds a value that is not JSON at {where}."
    ]


def test_json_error_path_cuts_long_keys_and_quotes_odd_ones() -> None:
    long_key = "k" * 100_000
    value = {"a b": {long_key: {"": [10**20]}}}
    (message,) = refused_on("session", "game_info", value)
    path = 'game_info["a b"].' + "k" * 32 + '…[""][0]'
    assert f" at {path};" in message
    assert len(message) < 300


def _json_fault_reference(value: Any, level: int = 1) -> bool:
    """Whether a JSON column could not store ``value``: the rules of json_fault, recursively."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return not INT64_MIN <= value <= UINT64_MAX
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return not _utf8(value)
    if level > 31 or type(value) not in (dict, list):
        return True
    if type(value) is dict:
        if any(type(key) is not str or not _utf8(key) for key in value):
            return True
        value = list(value.values())
    return any(_json_fault_reference(item, level + 1) for item in value)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(),
    st.text(st.characters(exclude_categories=()), max_size=3),
    st.sampled_from([(), b"", 1j]),
)


def _json_trees(depth: int) -> st.SearchStrategy[Any]:
    inner = _json_leaves if depth == 1 else _json_trees(depth - 1)
    keys = st.text(st.characters(exclude_categories=()), max_size=2) | st.integers(0, 2)
    return st.one_of(
        _json_leaves,
        st.lists(inner, max_size=2),
        st.dictionaries(keys, inner, max_size=2),
    )


@settings(max_examples=300, deadline=None, database=None)
@given(
    value=st.dictionaries(st.text(max_size=2), _json_trees(4), max_size=3),
    depth=st.integers(27, 31),
)
def test_json_fault_refuses_exactly_what_the_rules_say(value: dict[str, Any], depth: int) -> None:
    for _ in range(depth - 1):  # buried so that the depth limit falls inside the tree
        value = {"d": value}
    assert (json_fault(value) is not None) == _json_fault_reference(value)


# --- statuses --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", SESSION_STATUSES)
def test_session_accepts_default_statuses(status: str) -> None:
    assert load("session", session(status=status))["status"] == status


@pytest.mark.parametrize("status", TASK_STATUSES)
def test_task_accepts_default_statuses(status: str) -> None:
    assert load("task", task(SID, status=status))["status"] == status


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("session", "unknown"),
        ("session", "Pending"),
        ("session", " pending"),
        ("session", ""),
        ("task", "cancelled"),  # a session status, not a task status
        ("task", "PENDING"),
        ("task", "done"),
    ],
)
def test_unknown_statuses_are_refused_with_the_allowed_list(kind: str, status: Any) -> None:
    (message,) = refused_on(kind, "status", status)
    allowed = SESSION_STATUSES if kind == "session" else TASK_STATUSES
    assert message == f"Must be one of: {', '.join(allowed)}."


@pytest.mark.parametrize("kind", ["session", "task"])
@pytest.mark.parametrize("status", [1, True, ["pending"]])
def test_non_string_statuses_are_refused(kind: str, status: Any) -> None:
    refused_on(kind, "status", status)


def test_custom_session_statuses_accept_their_own_and_refuse_missing_defaults() -> None:
    schema = build_session_schema(["draft", "live"])
    assert load("session", session(status="draft"), schema)["status"] == "draft"
    assert load("session", session(status="live"), schema)["status"] == "live"
    for default in ("pending", "processing", "cancelled"):
        errors = refusal("session", session(status=default), schema)
        assert errors == {"status": ["Must be one of: draft, live."]}


def test_custom_task_statuses_accept_their_own_and_refuse_missing_defaults() -> None:
    schema = build_task_schema(("queued", "pending", "done"))
    for status in ("queued", "pending", "done"):
        assert load("task", task(SID, status=status), schema)["status"] == status
    for default in ("processing", "completed", "failed"):
        errors = refusal("task", task(SID, status=default), schema)
        assert errors == {"status": ["Must be one of: queued, pending, done."]}


def test_status_sets_of_two_schemas_are_independent() -> None:
    build_task_schema(("only",))
    assert load("task", task(SID, status="pending"))["status"] == "pending"
    refused_on("task", "status", "only")


# --- property: TEXT columns accept exactly what fits in 65,535 bytes -----------------------


def _text_errors(field: str, value: str) -> dict[str, Any]:
    """The errors of a task holding ``value`` in ``field`` ({} when it is accepted)."""
    try:
        TASK_SCHEMA.load([task(SID, **{field: value})])
    except ValidationError as exc:
        return exc.messages[0]
    return {}


def _text_fits(field: str, value: str) -> bool:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    blank_allowed = field != "source_text"
    return size <= TEXT_MAX_BYTES and (blank_allowed or bool(value.strip()))


ANY_CHAR = st.characters(exclude_categories=())  # surrogates included


@st.composite
def near_text_limit(draw: st.DrawFn) -> str:
    """A prefix, then one character repeated up to a few characters around 65,535 bytes."""
    prefix = draw(st.text(ANY_CHAR, max_size=4))
    char = draw(st.characters(codec="utf-8"))
    width = len(char.encode("utf-8"))
    try:
        budget = TEXT_MAX_BYTES - len(prefix.encode("utf-8"))
    except UnicodeEncodeError:
        budget = TEXT_MAX_BYTES
    count = max(0, budget // width + draw(st.integers(-2, 2)))
    return prefix + char * count


@settings(max_examples=150, deadline=None, database=None)
@given(
    field=st.sampled_from(TEXT_FIELDS),
    value=st.one_of(st.text(ANY_CHAR, max_size=50), st.text(max_size=300), near_text_limit()),
)
def test_text_fields_accept_exactly_what_fits_in_65535_utf8_bytes(field: str, value: str) -> None:
    errors = _text_errors(field, value)
    assert set(errors) <= {field}
    assert (not errors) == _text_fits(field, value), errors


# --- intake: decode_json ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t \r\n"])
def test_decode_json_refuses_empty_body(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="empty") as exc:
        decode_json(raw)
    assert exc.value.status == 400


@pytest.mark.parametrize(
    "raw", [b"{", b"{'a': 1}", b"nope", b"\xff\xfe", b'{"a": NaN}', b'"\\ud800"', b"[1,]"]
)
def test_decode_json_refuses_invalid_json(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="not valid JSON") as exc:
        decode_json(raw)
    assert exc.value.status == 400


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"tasks": []}', {"tasks": []}),
        (b' {"s": "\\u00e9\\ud83d\\ude00"} ', {"s": "é😀"}),
        (b"[1, 2]", [1, 2]),
        (b"null", None),
    ],
)
def test_decode_json_parses_valid_json(raw: bytes, expected: Any) -> None:
    assert decode_json(raw) == expected


def test_orjson_alone_reads_integers_beyond_64_bits_as_floats() -> None:
    """Why decode_json reads some bodies twice: orjson changes such integers silently."""
    assert orjson.loads(b"[18446744073709551616]") == [1.8446744073709552e19]
    assert orjson.loads(b"[18446744073709551615]") == [2**64 - 1]


@pytest.mark.parametrize(
    "number", [2**64, -(2**63) - 1, 123456789012345678901234567890, -(10**300), 10**19]
)
@pytest.mark.parametrize("separator", [b":", b": ", b":\n\t "])
def test_decode_json_keeps_integers_of_any_size_exactly(number: int, separator: bytes) -> None:
    raw = b'{"sessions"' + separator + b'[{"metadata": {"n": [%d]}}]}' % number
    decoded = decode_json(raw)
    assert decoded == {"sessions": [{"metadata": {"n": [number]}}]}
    assert type(decoded["sessions"][0]["metadata"]["n"][0]) is int


def test_decode_json_refuses_an_exact_read_nested_too_deeply() -> None:
    raw = b"[" * 1020 + b"12345678901234567890" + b"]" * 1020  # orjson reads 1,024 levels
    with pytest.raises(BadRequest, match="nested too deeply") as exc:
        decode_json(raw)
    assert exc.value.status == 400


json_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=25)
    | st.from_regex(r"[0-9]{15,25}", fullmatch=True),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, database=None)
@given(document=json_documents, indent=st.sampled_from([None, 1]))
def test_decode_json_reads_every_document_as_the_standard_library_does(
    document: Any, indent: int | None
) -> None:
    raw = json.dumps({"doc": document}, indent=indent, ensure_ascii=False).encode("utf-8")
    decoded = decode_json(raw)
    assert json.dumps(decoded, sort_keys=True) == json.dumps({"doc": document}, sort_keys=True)


# --- intake: validate_batch envelope ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "json_type"),
    [
        ([session()], "array"),
        ("sessions", "string"),
        (42, "number"),
        (4.2, "number"),
        (True, "boolean"),
        (None, "null"),
    ],
)
def test_non_object_body_is_a_bad_request_naming_its_type(body: Any, json_type: str) -> None:
    with pytest.raises(BadRequest) as exc:
        validate_batch(SESSIONS, body, SESSION_SCHEMA, 1000)
    assert exc.value.status == 400
    assert exc.value.detail.endswith(f"not a JSON {json_type}.")
    assert '{"sessions": [...]}' in exc.value.detail


@pytest.mark.parametrize(
    ("kind", "schema", "body"),
    [
        (SESSIONS, SESSION_SCHEMA, {}),
        (SESSIONS, SESSION_SCHEMA, {"tasks": []}),
        (TASKS, TASK_SCHEMA, {"sessions": [task(SID)]}),
    ],
)
def test_body_without_the_list_is_a_bad_request(kind: Any, schema: Any, body: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        validate_batch(kind, body, schema, 1000)
    assert f'"{kind.plural}"' in exc.value.detail
    assert "lacks" in exc.value.detail


@pytest.mark.parametrize(
    ("value", "json_type"),
    [({"a": 1}, "object"), ("x", "string"), (3, "number"), (None, "null"), (False, "boolean")],
)
def test_list_that_is_not_a_list_is_a_bad_request(value: Any, json_type: str) -> None:
    with pytest.raises(BadRequest) as exc:
        validate_batch(TASKS, {"tasks": value}, TASK_SCHEMA, 1000)
    assert exc.value.detail == f'"tasks" must be a list of records, not a JSON {json_type}.'


def test_valid_batch_returns_loaded_records() -> None:
    sid = new_session_id()
    records = [task(sid.upper(), start_time="2024-05-01T12:00:00+02:00"), task(sid)]
    loaded = validate_batch(TASKS, {"tasks": records, "extra": 1}, TASK_SCHEMA, 1000)
    assert [r["task_id"] for r in loaded] == [r["task_id"] for r in records]
    assert loaded[0]["session_id"] == sid
    assert loaded[0]["start_time"] == utc_text(datetime(2024, 5, 1, 10, 0, 0))


def test_empty_list_is_accepted_as_no_records() -> None:
    assert validate_batch(SESSIONS, {"sessions": []}, SESSION_SCHEMA, 1000) == []


def test_batch_of_exactly_max_batch_size_is_accepted() -> None:
    records = [session() for _ in range(3)]
    assert len(validate_batch(SESSIONS, {"sessions": records}, SESSION_SCHEMA, 3)) == 3


def test_batch_larger_than_max_batch_size_is_refused_whole() -> None:
    records = [session() for _ in range(4)]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(SESSIONS, {"sessions": records}, SESSION_SCHEMA, 3)
    assert exc.value.status == 422
    assert "4 sessions" in exc.value.detail
    assert "at most 3" in exc.value.detail
    assert exc.value.extra["errors"] == [
        {"index": None, "field": "sessions", "message": "Longer than 3 records."}
    ]


# --- intake: invalid records -----------------------------------------------------------------


def test_invalid_tasks_are_listed_with_index_key_field_and_message() -> None:
    records = [
        task(SID, task_id="ok-1"),
        task(SID, task_id="bad-1", row_index=-1, status="nope"),
        task(SID, task_id="ok-2"),
        task(SID, task_id=17, source_text=""),
    ]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": records}, TASK_SCHEMA, 1000)
    err = exc.value
    assert err.status == 422
    assert err.detail == "2 of 4 tasks are invalid; nothing was accepted."
    entries = err.extra["errors"]
    assert err.extra["error_count"] == len(entries) == 4
    assert {(e["index"], e["task_id"], e["field"]) for e in entries} == {
        (1, "bad-1", "row_index"),
        (1, "bad-1", "status"),
        (3, None, "task_id"),  # the key is not a string: None
        (3, None, "source_text"),
    }
    by_field = {(e["index"], e["field"]): e["message"] for e in entries}
    assert by_field[(3, "source_text")] == "Must not be empty."
    assert by_field[(3, "task_id")] == "Not a valid string."
    assert by_field[(1, "status")] == f"Must be one of: {', '.join(TASK_STATUSES)}."
    for entry in entries:
        assert set(entry) == {"index", "task_id", "field", "message"}


def test_invalid_sessions_carry_the_session_id_as_sent() -> None:
    upper = SID.upper()
    records = [session(session_id=upper, filename="")]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(SESSIONS, {"sessions": records}, SESSION_SCHEMA, 1000)
    assert exc.value.detail == "1 of 1 sessions are invalid; nothing was accepted."
    assert exc.value.extra["errors"] == [
        {"index": 0, "session_id": upper, "field": "filename", "message": "Must not be empty."}
    ]


@pytest.mark.parametrize("item", ["text", 5, None, [1, 2], True])
def test_non_object_item_gets_field_none(item: Any) -> None:
    records = [task(SID), item]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": records}, TASK_SCHEMA, 1000)
    assert exc.value.detail == "1 of 2 tasks are invalid; nothing was accepted."
    assert exc.value.extra["errors"] == [
        {"index": 1, "task_id": None, "field": None, "message": "A task must be a JSON object."}
    ]


def test_missing_key_field_gives_key_none() -> None:
    records = [without(session(), "session_id")]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(SESSIONS, {"sessions": records}, SESSION_SCHEMA, 1000)
    (entry,) = exc.value.extra["errors"]
    assert entry == {
        "index": 0,
        "session_id": None,
        "field": "session_id",
        "message": "Missing data for required field.",
    }


def test_timestamp_beyond_the_calendar_is_an_invalid_record_not_a_crash() -> None:
    records = [task(SID, task_id="t-edge", end_time="9999-12-31T23:59:59-01:00")]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": records}, TASK_SCHEMA, 1000)
    (entry,) = exc.value.extra["errors"]
    assert (entry["index"], entry["task_id"], entry["field"]) == (0, "t-edge", "end_time")


def test_error_list_is_capped_but_the_count_is_complete() -> None:
    count = MAX_ERRORS_LISTED + 50
    records = [task(SID, row_index=-1) for _ in range(count)] + [task(SID)]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": records}, TASK_SCHEMA, 10_000)
    assert exc.value.detail == f"{count} of {count + 1} tasks are invalid; nothing was accepted."
    assert len(exc.value.extra["errors"]) == MAX_ERRORS_LISTED
    assert exc.value.extra["error_count"] == count
    assert [e["index"] for e in exc.value.extra["errors"]] == list(range(MAX_ERRORS_LISTED))


def test_a_long_key_is_echoed_by_its_start_and_its_length() -> None:
    long_id = "é" * 1_000_000
    records = [task(SID, task_id=long_id), session(session_id=long_id)]
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(TASKS, {"tasks": records[:1]}, TASK_SCHEMA, 1000)
    (entry,) = exc.value.extra["errors"]
    assert entry["task_id"] == "é" * MAX_KEY_CHARS + "… (1,000,000 characters)"
    with pytest.raises(InvalidRecords) as exc:
        validate_batch(SESSIONS, {"sessions": records[1:]}, SESSION_SCHEMA, 1000)
    (entry,) = exc.value.extra["errors"]
    assert entry["session_id"] == "é" * MAX_KEY_CHARS + "… (1,000,000 characters)"


def test_a_key_of_exactly_the_echo_length_is_echoed_whole() -> None:
    key = "k" * MAX_KEY_CHARS
    errors = describe_errors(TASKS, [{"task_id": key}], {0: {"status": ["bad"]}})
    assert errors[0]["task_id"] == key


HUGE = "9" * 1_000_000
HOSTILE_VALUES = [
    HUGE,
    " " + HUGE,
    "2026-01-01T00:00:00" + HUGE,
    [HUGE],
    {HUGE: HUGE},
    {HUGE: [{HUGE: 10**4000}]},
    10**4000,
    -(10**4000),
    1e308,
    [[[[HUGE]]]],
]


@pytest.mark.parametrize("kind", ["session", "task"])
@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: type(v).__name__)
def test_no_message_echoes_the_value_it_refuses(kind: str, value: Any) -> None:
    schema = schema_of(kind)
    rec = {name: value for name in schema.load_fields}
    with pytest.raises(ValidationError) as exc:
        schema.load([rec])
    messages = describe_errors(SESSIONS if kind == "session" else TASKS, [rec], exc.value.messages)
    assert {m["field"] for m in messages} >= set(schema.load_fields) - set(JSON_FIELDS)
    for entry in messages:
        assert len(entry["message"]) < 300, entry["message"][:300]
        assert "9" * 40 not in entry["message"]


def test_status_names_with_braces_appear_as_configured() -> None:
    schema = build_task_schema(["{input}", "a{0}", "b}"])
    errors = refusal("task", task(SID, status="x" * 1000), schema)
    assert errors == {"status": ["Must be one of: {input}, a{0}, b}."]}


def test_the_listed_errors_stop_at_a_byte_budget_but_the_count_is_complete() -> None:
    message = "m" * MAX_MESSAGE_CHARS
    errors = [
        {"index": i, "task_id": "t" * 64, "field": "status", "message": message} for i in range(300)
    ]
    answer = refusal_of(TASKS, 300, "invalid", errors)
    listed = answer.extra["errors"]
    assert 0 < len(listed) < MAX_ERRORS_LISTED
    assert len(orjson.dumps(listed)) <= MAX_ERRORS_BYTES
    assert listed == errors[: len(listed)]
    assert answer.extra["error_count"] == 300
    assert answer.detail == "300 of 300 tasks are invalid; nothing was accepted."


def test_messages_are_cut_to_a_bounded_length() -> None:
    errors = describe_errors(TASKS, [{}], {0: {"status": ["x" * 10_000]}})
    assert errors[0]["message"] == "x" * (MAX_MESSAGE_CHARS - 1) + "…"


def test_describe_errors_flattens_nested_and_sorts_by_index() -> None:
    items = [{"task_id": "a"}, "x", {"task_id": "c"}]
    messages = {
        2: {"status": ["bad status"], "metadata": {"key": ["bad key"]}},
        1: {"_schema": ["Invalid input type."]},
        0: {"row_index": ["one", "two"]},
    }
    assert describe_errors(TASKS, items, messages) == [
        {"index": 0, "task_id": "a", "field": "row_index", "message": "one"},
        {"index": 0, "task_id": "a", "field": "row_index", "message": "two"},
        {"index": 1, "task_id": None, "field": None, "message": "A task must be a JSON object."},
        {"index": 2, "task_id": "c", "field": "metadata", "message": "key: bad key"},
        {"index": 2, "task_id": "c", "field": "status", "message": "bad status"},
    ]
