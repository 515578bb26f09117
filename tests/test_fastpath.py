"""The compiled loaders accept and refuse exactly what the marshmallow schemas do."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields

from persistence.fastpath import compile_loader
from persistence.schemas import build_session_schema, build_task_schema
from tests.factories import new_session_id, session, task

SESSION_SCHEMA = build_session_schema(["pending", "processing", "completed", "failed", "cancelled"])
TASK_SCHEMA = build_task_schema(["pending", "processing", "completed", "failed"])

# Text that may hold surrogates, blanks and multi-byte characters.
any_text = st.text(st.characters(exclude_categories=()), max_size=8)
# Integers on both sides of the 64-bit range a JSON column keeps exactly, and values
# only Python callers can make (tuples, bytes, ...), which no JSON column holds.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 1),
    st.integers(min_value=2**64 - 2, max_value=2**64 + 1),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
    st.sampled_from([(), (1,), b"x", frozenset()]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


def around(limit: int, char: str) -> st.SearchStrategy[str]:
    return st.integers(min_value=max(0, limit - 2), max_value=limit + 2).map(lambda n: char * n)


interesting = {
    "session_id": st.one_of(
        st.just(new_session_id()),
        st.just(new_session_id().upper()),
        st.just("{" + new_session_id()[:34] + "}"),
        st.just(new_session_id().replace("-", "_")),
        st.text(alphabet="0123456789abcdefABCDEF-+_ {}\n", min_size=34, max_size=38),
    ),
    "task_id": st.one_of(around(64, "t"), st.just(" t"), st.just("t\n"), st.just("\u3000")),
    "filename": st.one_of(around(255, "é"), st.just(""), st.just("  ")),
    "file_path": around(512, "a"),
    "llm_provider": around(50, "😀"),
    "batch_id": around(64, "b"),
    "source_text": st.one_of(around(21_845, "€"), around(16_383, "😀"), st.just(" \t")),
    "target_text": st.one_of(around(65_535, "a"), st.just("")),
    "status": st.sampled_from(
        ["pending", "processing", "completed", "failed", "cancelled", "Pending", "", "done"]
    ),
    "row_index": st.sampled_from([0, 1, 2_147_483_647, 2_147_483_648, -1, True, 1.0, 1.5, "1"]),
    "confidence": st.sampled_from(
        [0, 1, 0.5, 1.0000001, -0.0, -1e-9, True, "0.5", float("nan"), float("inf")]
    ),
    "start_time": st.sampled_from(
        [
            "2026-01-01T10:00:00",
            "2026-01-01T10:00:00+02:00",
            "2026-01-01 10:00:00.999Z",
            "1970-01-01T00:00:01Z",
            "1970-01-01T00:00:00Z",
            "2038-01-19T03:14:07.9Z",
            "2038-01-19T03:14:08Z",
            "0001-01-01T00:00:00+01:00",
            "2026-13-01T00:00:00",
            "2026-01-01",
            "",
            "now",
        ]
    ),
    "game_info": st.one_of(
        st.sampled_from([{}, {"a": [1, {"b": None}]}, deep(31), deep(32), [], "x"]),
        st.sampled_from([2**63 - 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]).map(
            lambda n: {"n": [n]}
        ),
        st.sampled_from([float("nan"), float("-inf"), 1e308, "\ud800", {"\udfff": 1}]).map(
            lambda v: {"v": v}
        ),
        json_values.map(lambda v: {"v": v}),
    ),
}
interesting["end_time"] = interesting["start_time"]
interesting["metadata"] = interesting["game_info"]
for counter in (
    "total_tasks",
    "completed_tasks",
    "failed_tasks",
    "processing_tasks",
    "retry_count",
    "duration_ms",
):
    interesting[counter] = interesting["row_index"]
for text_field in ("sheet_name", "column_name"):
    interesting[text_field] = interesting["filename"]
interesting["context"] = interesting["target_text"]
interesting["error_message"] = interesting["target_text"]

MISSING = object()


@st.composite
def records(draw: st.DrawFn, valid: dict[str, Any], schema: Schema) -> Any:
    """A valid record with a few fields removed, nulled or replaced by odd values."""
    if draw(st.integers(0, 20)) == 0:
        return draw(json_values)  # not even an object
    record = copy.deepcopy(valid)
    names = sorted(schema.load_fields)
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        choice = draw(st.sampled_from(["drop", "null", "any", "interesting"]))
        if choice == "drop":
            record.pop(name, None)
        elif choice == "null":
            record[name] = None
        elif choice == "any":
            record[name] = draw(json_values)
        else:
            record[name] = draw(interesting[name])
    if draw(st.booleans()):
        record[draw(any_text)] = draw(json_values)  # an unknown field
    return record


def same_outcome(schema: Schema, items: list[Any]) -> None:
    loader = compile_loader(schema)
    fast = loader(copy.deepcopy(items))
    try:
        slow = schema.load(copy.deepcopy(items))
    except ValidationError:
        assert fast is None, f"fast path accepted what marshmallow refuses: {items!r}"[:2000]
        return
    assert fast is not None, f"fast path refused what marshmallow accepts: {items!r}"[:2000]
    assert fast == slow


check = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@check
@given(st.data())
def test_task_loader_matches_the_schema(data: st.DataObject) -> None:
    sid = new_session_id()
    valid = task(
        sid,
        start_time="2026-01-01T10:00:00+02:00",
        confidence=0.5,
        target_text="cible",
        end_time="2026-01-01T10:00:01Z",
        duration_ms=1000,
    )
    items = data.draw(st.lists(records(valid, TASK_SCHEMA), min_size=1, max_size=4))
    same_outcome(TASK_SCHEMA, items)


@check
@given(st.data())
def test_session_loader_matches_the_schema(data: st.DataObject) -> None:
    items = data.draw(st.lists(records(session(), SESSION_SCHEMA), min_size=1, max_size=4))
    same_outcome(SESSION_SCHEMA, items)


json_columns = st.one_of(st.none(), st.dictionaries(any_text, json_values, max_size=3))


@check
@given(game_info=json_columns, metadata=json_columns)
def test_session_loader_matches_the_schema_on_json_columns(game_info: Any, metadata: Any) -> None:
    """Sessions valid but for their JSON objects, so that no other error hides a difference."""
    same_outcome(SESSION_SCHEMA, [session(game_info=game_info, metadata=metadata)])


def test_valid_batches_load_identically() -> None:
    sid = new_session_id()
    items = [task(sid, start_time="2026-03-01T10:00:00.5+01:00") for _ in range(50)]
    assert compile_loader(TASK_SCHEMA)(copy.deepcopy(items)) == TASK_SCHEMA.load(items)


def test_a_field_type_it_does_not_know_is_refused_at_compile_time() -> None:
    class Odd(Schema):
        when = fields.Date(required=True)

    with pytest.raises(TypeError, match="not compiled"):
        compile_loader(Odd(many=True))
