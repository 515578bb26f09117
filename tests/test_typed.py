"""The typed path (persistence/typed.py) and the marshmallow path agree on every raw body.

Every test hands the same raw bytes to both: ``TypedDecoder.decode`` on one side,
``decode_json`` + ``validate_batch`` (orjson + marshmallow) on the other. Where
the typed path accepts a body, the marshmallow path must accept it too and load
the same records, down to the bytes the buffer keeps; where the marshmallow
path accepts a body, the typed path must accept it too, unless the body holds
something the typed path declines by design (a field the schema does not know,
a duplicate key, a record whose size bound passes the limit), in which case the
marshmallow path decides. Bodies are generated as text, spelled in many ways
(escapes, number forms, whitespace, duplicate keys, invalid bytes), so that
differences between the two JSON readers show too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, fields

from persistence.buffer import Buffer
from persistence.durable import DurableBuffer
from persistence.errors import ApiError
from persistence.intake import decode_json, validate_batch
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, DictBatch, RecordType, stamp_of
from persistence.schemas import build_session_schema, build_task_schema
from persistence.sqlsize import sizer_for
from persistence.typed import TypedDecoder
from tests.factories import new_session_id, session, task

SESSION_SCHEMA = build_session_schema(["pending", "processing", "completed", "failed", "cancelled"])
TASK_SCHEMA = build_task_schema(["pending", "processing", "completed", "failed"])
SCHEMAS = {SESSIONS.name: SESSION_SCHEMA, TASKS.name: TASK_SCHEMA}
DECODERS = {kind.name: TypedDecoder(kind, SCHEMAS[kind.name]) for kind in (SESSIONS, TASKS)}
KINDS = {"session": SESSIONS, "task": TASKS}
SID = "0b7c52d4-5e7a-4b8e-9f3d-2a1c6e8f9b01"
MAX_BATCH = 3


# --- the comparison ---------------------------------------------------------------------------


def canonical(data: bytes) -> str:
    """A buffered record's JSON, read as the flusher reads it, in a form that tells 1 from 1.0
    and 0.0 from -0.0."""
    return json.dumps(orjson.loads(data), sort_keys=True)


def marshmallow_path(
    kind: RecordType, raw: bytes, max_batch: int, limit: int | None
) -> list[dict[str, Any]] | int:
    """The records the marshmallow path loads from ``raw``, or the status it refuses it with."""
    try:
        return validate_batch(
            kind, decode_json(raw), SCHEMAS[kind.name], max_batch, max_record_bytes=limit
        )
    except ApiError as exc:
        return exc.status


def assert_same(
    kind: RecordType,
    raw: bytes,
    *,
    may_decline: bool = False,
    max_batch: int = MAX_BATCH,
    limit: int | None = None,
) -> bool:
    """Both paths agree on ``raw``; returns whether the typed path accepted it.

    ``may_decline``: the body holds something the typed path declines by design.
    """
    typed = DECODERS[kind.name].decode(raw, max_batch, limit)
    expected = marshmallow_path(kind, raw, max_batch, limit)
    shown = repr(raw[:1500])
    if typed is None:
        if isinstance(expected, list) and not may_decline:
            sizer = sizer_for(kind, SCHEMAS[kind.name])
            too_large = limit is not None and any(sizer.bound(r) > limit for r in expected)
            assert too_large, f"the typed path declined a body marshmallow accepts: {shown}"
        return False
    assert isinstance(expected, list), (
        f"the typed path accepted a body refused ({expected}): {shown}"
    )
    assert len(typed) == len(expected)
    assert typed.keys() == [record[kind.key] for record in expected]
    stamps = range(1_700_000_000_000_000, 1_700_000_000_000_000 + len(expected))
    typed_bytes = typed.encode_stamped(stamps)
    dict_bytes = DictBatch(kind, expected).encode_stamped(stamps)
    assert [canonical(b) for b in typed_bytes] == [canonical(b) for b in dict_bytes], shown
    for data, stamp in zip(typed_bytes, stamps, strict=True):
        assert list(orjson.loads(data)) == list(kind.columns)  # the stamp last
        assert stamp_of(data) == stamp
    return True


# --- raw JSON text, spelled in many ways --------------------------------------------------------


@dataclass
class Spelling:
    """How one body is written; ``duplicated`` is set when a key was written twice."""

    draw: st.DrawFn
    ascii_only: bool
    duplicated: bool = False

    def space(self) -> str:
        return self.draw(st.sampled_from(["", "", "", " ", "\n  ", "\t", "\r\n"]))

    def text(self, value: str) -> bytes:
        style = self.draw(st.integers(0, 9))
        if style == 0:  # every character escaped, astral ones as surrogate pairs
            units = value.encode("utf-16-le", "surrogatepass")
            codes = [int.from_bytes(units[i : i + 2], "little") for i in range(0, len(units), 2)]
            return ('"' + "".join(f"\\u{code:04x}" for code in codes) + '"').encode()
        ascii_only = self.ascii_only or style == 1
        # surrogatepass: a lone surrogate becomes a \\ud800 escape, or bytes that are not UTF-8.
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    def number(self, value: int | float) -> bytes:
        if isinstance(value, float) and value != value:
            return self.draw(st.sampled_from([b"NaN", b"null"]))
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            sign = b"-" if value < 0 else b""
            return sign + self.draw(st.sampled_from([b"Infinity", b"1e400", b"9" * 400]))
        if isinstance(value, int):
            forms = [str(value), f"{value}.0", f"{value}e0", f"{value}E+00"]
            if value == 0:
                forms.append("-0")
            return self.draw(st.sampled_from(forms)).encode()
        forms = [repr(value), f"{value:.17g}", f"{value:.25e}", f"{value:.3E}"]
        if repr(value).endswith(".0"):
            forms.append(repr(value)[:-2])  # 1.0 written 1: an integer in JSON
        return self.draw(st.sampled_from(forms)).encode()

    def value(self, value: Any) -> bytes:
        if value is None:
            return b"null"
        if value is True or value is False:
            return b"true" if value else b"false"
        if isinstance(value, (int, float)):
            return self.number(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            inner = b",".join(self.space().encode() + self.value(item) for item in value)
            return b"[" + inner + self.space().encode() + b"]"
        assert isinstance(value, dict), value
        pairs = []
        for key, item in value.items():
            if self.draw(st.integers(0, 59)) == 0:
                # The same key twice: the last one counts for both readers.
                self.duplicated = True
                decoy = self.draw(st.sampled_from([None, 0, "x", -1, [], True]))
                pairs.append(self.text(key) + b":" + self.value(decoy))
            pairs.append(self.text(key) + self.space().encode() + b":" + self.value(item))
        return b"{" + b",".join(self.space().encode() + pair for pair in pairs) + b"}"


def spelled(draw: st.DrawFn, body: Any) -> tuple[bytes, bool]:
    """``body`` as raw JSON text, and whether a key was written twice."""
    spelling = Spelling(draw, ascii_only=draw(st.booleans()))
    raw = spelling.space().encode() + spelling.value(body) + spelling.space().encode()
    return raw, spelling.duplicated


# --- generated records --------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates included
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 1),
    st.integers(min_value=2**64 - 2, max_value=2**64 + 1),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    any_text,
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


TIMES = [
    "2026-01-01T10:00:00",
    "2026-01-01T10:00:00+02:00",
    "2026-01-01 10:00:00.999Z",
    "2026-01-01T10:00:00.5-00:00",
    "2026-01-01T10:00:00.1234567Z",
    "1970-01-01T00:00:01Z",
    "1970-01-01T00:00:00Z",
    "2038-01-19T03:14:07.9Z",
    "2038-01-19T03:14:08Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-13-01T00:00:00",
    "2026-W01-1T10:00:00",
    "20260101T100000Z",
    "2026-01-01",
    "2026-01-01t10:00:00z",
    "",
    "now",
]
COUNTS = [0, 1, 2_147_483_647, 2_147_483_648, -1, True, 1.0, 1.5, "1", 2**64, -0.0, 1e400]
interesting: dict[str, st.SearchStrategy[Any]] = {
    "session_id": st.one_of(
        st.just(new_session_id()),
        st.just(new_session_id().upper()),
        st.just("{" + new_session_id()[:34] + "}"),
        st.just(new_session_id().replace("-", "_")),
        st.just(SID[:-1] + "\n"),
        st.text(alphabet="0123456789abcdefABCDEF-+_ {}\n", min_size=34, max_size=38),
    ),
    "task_id": st.one_of(
        around(64, "t"), st.sampled_from([" t", "t\n", "\u3000", "t\u00a0", "a b", "\ud800"])
    ),
    "filename": st.one_of(around(255, "é"), st.sampled_from(["", "  ", "\u2003", "x\udfff"])),
    "file_path": around(512, "a"),
    "llm_provider": around(50, "😀"),
    "batch_id": around(64, "b"),
    "source_text": st.one_of(
        around(21_845, "€"), around(16_383, "😀"), around(65_535, "a"), st.just(" \t")
    ),
    "target_text": st.one_of(around(65_535, "a"), around(32_767, "é"), st.just("")),
    "status": st.sampled_from(
        ["pending", "processing", "completed", "failed", "cancelled", "Pending", "", "done"]
    ),
    "row_index": st.sampled_from(COUNTS),
    "confidence": st.sampled_from(
        [0, 1, 0.5, 1.0000001, -0.0, -1e-9, True, "0.5", float("nan"), float("inf"), 2**70]
    ),
    "start_time": st.sampled_from(TIMES),
    "game_info": st.one_of(
        st.sampled_from([{}, {"a": [1, {"b": None}]}, deep(31), deep(32), [], "x"]),
        st.sampled_from([2**63 - 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]).map(
            lambda n: {"n": [n]}
        ),
        st.sampled_from([float("nan"), float("-inf"), 1e308, 5e-324, "\ud800", {"\udfff": 1}]).map(
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


@st.composite
def records(draw: st.DrawFn, valid: dict[str, Any], schema: Schema) -> tuple[Any, bool]:
    """A valid record with a few fields removed, nulled or replaced by odd values; and
    whether it holds a field the schema does not know."""
    if draw(st.integers(0, 20)) == 0:
        return draw(json_values), False  # not even an object
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
    unknown = draw(st.integers(0, 3)) == 0
    if unknown:
        record[draw(st.sampled_from(["created_at", "id", ORDER_COLUMN, "x"]))] = draw(json_values)
    return record, unknown


@st.composite
def bodies(draw: st.DrawFn, kind: RecordType, valid: Callable[[], dict[str, Any]]) -> Any:
    """A raw body of a few such records, and whether the typed path may decline it."""
    drawn = draw(st.lists(records(valid(), SCHEMAS[kind.name]), max_size=MAX_BATCH + 1))
    body: Any = {kind.plural: [record for record, _ in drawn]}
    extra = draw(st.integers(0, 10))
    if extra == 0:
        body["note"] = draw(json_values)  # unknown in the envelope
    elif extra == 1:
        body = draw(json_values)  # no envelope at all
    raw, duplicated = spelled(draw, body)
    may_decline = extra == 0 or duplicated or any(unknown for _, unknown in drawn)
    return raw, may_decline


check = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_task() -> dict[str, Any]:
    return task(
        new_session_id(),
        start_time="2026-01-01T10:00:00+02:00",
        confidence=0.5,
        target_text="cible",
        end_time="2026-01-01T10:00:01Z",
        duration_ms=1000,
    )


@check
@given(st.data())
def test_task_bodies_decode_as_marshmallow_loads_them(data: st.DataObject) -> None:
    raw, may_decline = data.draw(bodies(TASKS, valid_task))
    assert_same(TASKS, raw, may_decline=may_decline)


@check
@given(st.data())
def test_session_bodies_decode_as_marshmallow_loads_them(data: st.DataObject) -> None:
    raw, may_decline = data.draw(bodies(SESSIONS, session))
    assert_same(SESSIONS, raw, may_decline=may_decline)


json_columns = st.one_of(st.none(), st.dictionaries(any_text, json_values, max_size=3))


@check
@given(st.data(), json_columns, json_columns)
def test_session_json_columns_decode_as_marshmallow_loads_them(
    data: st.DataObject, game_info: Any, metadata: Any
) -> None:
    """Sessions valid but for their JSON objects, so that no other error hides a difference."""
    body = {"sessions": [session(game_info=game_info, metadata=metadata)]}
    raw, duplicated = spelled(data.draw, body)
    assert_same(SESSIONS, raw, may_decline=duplicated)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.data(),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-2.0, max_value=2.0)
    | st.from_regex(r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,30})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
)
def test_confidence_literals_read_to_the_same_double(data: st.DataObject, number: Any) -> None:
    """Both readers round any number literal to the same double (or both refuse it)."""
    literal = repr(number) if isinstance(number, float) else number
    raw = b'{"tasks": [%s]}' % orjson.dumps(task(SID, confidence=0.5)).replace(
        b'"confidence":0.5', b'"confidence":' + literal.encode()
    )
    assert_same(TASKS, raw)


# --- the edge cases of tests/test_schemas.py, each written several ways ---------------------------

HUGE = "9" * 100_000
EDGES: list[tuple[str, str, Any]] = [
    *[
        (k, f, v)
        for k in ("session", "task")
        for f in ("session_id",)
        for v in [
            SID,
            SID.upper(),
            SID.replace("-", ""),
            "{" + SID + "}",
            "urn:uuid:" + SID,
            SID[:-1],
            SID + "0",
            "z" + SID[1:],
            "",
            " " + SID[1:],
            SID[:-1] + "\n",
            "+" + SID[1:],
            SID[:4] + "_" + SID[5:],
            "----" + SID.replace("-", ""),
            12345,
            ["a"],
            True,
            None,
        ]
    ],
    *[
        ("task", "task_id", v)
        for v in [
            " task-1",
            "task-1 ",
            "task-1\n",
            "\ttask-1",
            "\u00a0task-1",
            "task 1",
            "t" * 64,
            "t" * 65,
            "\u3000",
            "\ud800",
            "ok\udfffok",
            17,
            None,
        ]
    ],
    *[
        (k, f, v)
        for k, f, n in [
            ("session", "filename", 255),
            ("session", "file_path", 512),
            ("session", "llm_provider", 50),
            ("task", "batch_id", 64),
            ("task", "sheet_name", 255),
            ("task", "column_name", 255),
        ]
        for v in ["", " ", "\t\n ", "\u3000", "a" * n, "😀" * n, "€" * (n + 1), 5, 1.5, True]
    ],
    *[
        ("task", f, v)
        for f in ("source_text", "target_text", "context", "error_message")
        for v in [
            "",
            "   ",
            None,
            "déjà vu",
            "a" * 65_535,
            "a" * 65_536,
            "é" * 32_767,
            "é" * 32_768,
            "€" * 21_845,
            "€" * 21_846,
            "😀" * 16_383,
            "😀" * 16_384,
            "😀" * 16_383 + "€",
            "😀" * 16_383 + "€a",
            "\ude00\ud83d",
            5,
            ["a"],
            {"a": "b"},
        ]
    ],
    *[
        (k, f, v)
        for k, f in [
            ("session", "total_tasks"),
            ("session", "failed_tasks"),
            ("task", "row_index"),
            ("task", "retry_count"),
            ("task", "duration_ms"),
        ]
        for v in [
            0,
            1,
            2_147_483_647,
            -1,
            -2_147_483_648,
            2_147_483_648,
            2**63,
            True,
            False,
            "1",
            1.5,
            0.5,
            1.0,
            [1],
            {"n": 1},
            None,
        ]
    ],
    *[
        ("task", "confidence", v)
        for v in [
            0,
            1,
            0.0,
            1.0,
            0.5,
            0.9999,
            None,
            -0.0001,
            -1,
            1.0001,
            2,
            100,
            True,
            False,
            "0.5",
            [0.5],
            {"v": 0.5},
            float("nan"),
            float("inf"),
        ]
    ],
    *[
        ("task", f, v)
        for f in ("start_time", "end_time")
        for v in [
            *TIMES,
            "2024-05-01T12:30:45-05:30",
            "2024-12-31T23:30:00-01:00",
            "2038-01-19T03:14:07.999999Z",
            "1970-01-01T00:00:00.999999Z",
            "1969-12-31T23:59:59Z",
            "yesterday",
            "2024-05-01T25:00:00",
            1_700_000_000,
            True,
            None,
        ]
    ],
    *[
        ("session", f, v)
        for f in ("game_info", "metadata")
        for v in [
            None,
            {},
            {"a": [1, {"b": None}], "c": "é😀"},
            [],
            "text",
            5,
            True,
            deep(31),
            deep(32),
            {"k": [[[[{"leaf": 1}]]]]},
            {"n": -(2**63)},
            {"n": 2**64 - 1},
            {"n": 2**64},
            {"n": -(2**63) - 1},
            {"n": 10**30},
            {"n": -0.0},
            {"n": 5e-324},
            {"x": [float("nan")]},
            {"x": float("-inf")},
            {"s": "\ud800"},
            {"\udfff": 1},
            {"a": {"b": ["ok", "x\ud800"]}},
            {HUGE: [{HUGE: 10**4000}]},
        ]
    ],
    *[
        (k, "status", v)
        for k in ("session", "task")
        for v in [
            "pending",
            "cancelled",
            "Pending",
            "",
            " pending",
            None,
            1,
            ["pending"],
        ]
    ],
]


def edge_record(kind: str, field: str, value: Any) -> dict[str, Any]:
    if kind == "session":
        return session(**{field: value})
    fields = {field: value}
    return task(fields.pop("session_id", SID), **fields)


@pytest.mark.parametrize(
    ("kind", "field", "value"), EDGES, ids=[f"{k}-{f}-{i}" for i, (k, f, _) in enumerate(EDGES)]
)
def test_schema_edge_cases_decode_as_marshmallow_loads_them(
    kind: str, field: str, value: Any
) -> None:
    body = {KINDS[kind].plural: [edge_record(kind, field, value)]}
    for ascii_only in (False, True):
        raw = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        assert_same(KINDS[kind], raw)


@pytest.mark.parametrize("kind", ["session", "task"])
def test_a_field_missing_or_null_decodes_as_marshmallow_loads_it(kind: str) -> None:
    for name in SCHEMAS[KINDS[kind].name].load_fields:
        present = edge_record(kind, "status", "pending")
        absent = {key: value for key, value in present.items() if key != name}
        for record in (absent, {**present, name: None}):
            assert_same(KINDS[kind], orjson.dumps({KINDS[kind].plural: [record]}))


# --- the raw text itself -------------------------------------------------------------------------

VALID = orjson.dumps(task(SID))[1:-1]  # the fields of a valid task, without braces


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (b'{"tasks": [{%s}]}' % VALID, True),
        (b' \r\n\t{"tasks":[{%s}]} \n' % VALID, True),
        (b'{"tasks": []}', True),
        (b'{"tasks": [{%s, "row_index": 1.0}]}' % VALID, False),
        (b'{"tasks": [{%s, "row_index": 1e0}]}' % VALID, False),
        (b'{"tasks": [{%s, "row_index": -0}]}' % VALID, True),
        (b'{"tasks": [{%s, "row_index": true}]}' % VALID, False),
        (b'{"tasks": [{%s, "confidence": -0}]}' % VALID, True),
        (b'{"tasks": [{%s, "confidence": 1}]}' % VALID, True),
        (b'{"tasks": [{%s, "confidence": NaN}]}' % VALID, False),
        (b'{"tasks": [{%s, "confidence": Infinity}]}' % VALID, False),
        (b'{"tasks": [{%s, "confidence": 1e400}]}' % VALID, False),
        (b'{"tasks": [{%s, "target_text": "\\ud800"}]}' % VALID, False),
        (b'{"tasks": [{%s, "target_text": "\\ud83d\\ude00"}]}' % VALID, True),
        (b'{"tasks": [{%s, "target_text": "\xed\xa0\x80"}]}' % VALID, False),
        (b'{"tasks": [{%s, "target_text": "\xff"}]}' % VALID, False),
        (b'{"tasks": [{%s, "target_text": "\x01"}]}' % VALID, False),
        (b'{"tasks": [{%s, "status": "p\\u0065nding"}]}' % VALID, True),
        (b'{"tasks": [{%s, "retry_count": null}]}' % VALID, False),
        (b'{"tasks": [{%s, "duration_ms": null}]}' % VALID, True),
        (b'{"tasks": [{%s}], "tasks": []}' % VALID, True),
        (b'{"tasks": [], "tasks": [{%s}]}' % VALID, True),
        (b'{"tasks": [{%s}]} x' % VALID, False),
        (b'\xef\xbb\xbf{"tasks": [{%s}]}' % VALID, False),
        (b'{"tasks": [{%s},]}' % VALID, False),
        (b'{"tasks": [{%s}]' % VALID, False),
        (b"", False),
        (b"null", False),
        (b'{"tasks": {}}', False),
    ],
)
def test_raw_spellings_decode_as_marshmallow_reads_them(raw: bytes, accepted: bool) -> None:
    assert assert_same(TASKS, raw) is accepted


@pytest.mark.parametrize(
    "unknown",
    [
        b'"note": "\xff"',  # not UTF-8: orjson refuses the body, msgspec would skip it
        b'"\xff": 1',
        b'"note": "\\ud800"',
        b'"note": ' + b"[" * 1025 + b"]" * 1025,  # deeper than orjson reads
        b'"note": ' + b"[" * 500 + b"12345678901234567890" + b"]" * 500,
        b'"note": 123456789012345678901234567890',
        b'"note": NaN',
        b'"created_at": "2024-01-01T00:00:00Z"',
        b'"ingest_seq": "not a stamp"',
    ],
)
@pytest.mark.parametrize("where", ["record", "envelope"])
def test_unknown_fields_are_left_to_marshmallow(unknown: bytes, where: str) -> None:
    if where == "record":
        raw = b'{"tasks": [{%s, %s}]}' % (VALID, unknown)
    else:
        raw = b'{"tasks": [{%s}], %s}' % (VALID, unknown)
    assert DECODERS[TASKS.name].decode(raw, MAX_BATCH) is None
    assert_same(TASKS, raw, may_decline=True)


def test_a_stamp_sent_by_the_client_is_replaced_on_arrival() -> None:
    raw = b'{"tasks": [{%s, "ingest_seq": 99}]}' % VALID
    batch = DECODERS[TASKS.name].decode(raw, MAX_BATCH)
    assert batch is not None
    [data] = batch.encode_stamped([5])
    assert stamp_of(data) == 5
    assert marshmallow_path(TASKS, raw, MAX_BATCH, None) == TASK_SCHEMA.load(
        [orjson.loads(b"{%s}" % VALID)]
    )


@pytest.mark.parametrize("levels", [31, 32, 900, 1000, 1024, 1025, 3000])
@pytest.mark.parametrize("opening", [b'{"x":', b"["])
def test_deep_json_columns_decode_as_marshmallow_reads_them(levels: int, opening: bytes) -> None:
    closing = b"}" if opening == b'{"x":' else b"]"
    # ``levels`` nested containers: the column's object, then levels - 1 more.
    value = b'{"x":' + opening * (levels - 1) + b"1" + closing * (levels - 1) + b"}"
    raw = orjson.dumps({"sessions": [session(metadata=None)]})
    raw = raw.replace(b'"metadata":null', b'"metadata":' + value)
    assert assert_same(SESSIONS, raw) is (levels <= 31)


@pytest.mark.parametrize("number", [2**63 - 1, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**30])
def test_json_column_integers_are_read_exactly(number: int) -> None:
    raw = orjson.dumps({"sessions": [session()]}).replace(
        b'"metadata":{', b'"metadata":{"n":%d,' % number
    )
    accepted = assert_same(SESSIONS, raw)
    assert accepted is (-(2**63) <= number <= 2**64 - 1)
    if accepted:
        batch = DECODERS[SESSIONS.name].decode(raw, MAX_BATCH)
        assert batch is not None
        assert orjson.loads(batch.encode_stamped([1])[0])["metadata"]["n"] == number


# --- what the typed path takes, and what it declines by design -----------------------------------


def test_valid_batches_take_the_typed_path() -> None:
    sid = new_session_id()
    items = [
        task(sid.upper(), start_time="2026-03-01T10:00:00.5+01:00", source_text="😀" * 16_383),
        task(sid, target_text="a" * 65_535, end_time="2026-03-01T10:00:00.123Z"),
        task(sid, confidence=1, retry_count=2, duration_ms=0),
    ]
    assert assert_same(TASKS, orjson.dumps({"tasks": items}))
    sessions = [session(session_id=sid.upper()), session(game_info=deep(31), metadata=None)]
    assert assert_same(SESSIONS, orjson.dumps({"sessions": sessions}))


def test_more_records_than_the_batch_limit_are_left_to_marshmallow() -> None:
    raw = orjson.dumps({"tasks": [task(SID) for _ in range(MAX_BATCH + 1)]})
    assert DECODERS[TASKS.name].decode(raw, MAX_BATCH) is None
    assert marshmallow_path(TASKS, raw, MAX_BATCH, None) == 422


@pytest.mark.parametrize("kind", [SESSIONS, TASKS])
def test_records_near_the_size_limit_are_left_to_marshmallow(kind: RecordType) -> None:
    record = session(metadata={"blob": "x" * 5000}) if kind is SESSIONS else task(SID)
    raw = orjson.dumps({kind.plural: [record]})
    exact = sizer_for(kind, SCHEMAS[kind.name])
    [loaded] = SCHEMAS[kind.name].load([record])
    size = exact.row_bytes(exact.sizes(loaded))
    assert DECODERS[kind.name].decode(raw, MAX_BATCH, 1 << 24) is not None
    for limit in (size, size - 1):
        assert DECODERS[kind.name].decode(raw, MAX_BATCH, limit) is None  # bound > exact
        assert_same(kind, raw, limit=limit)
    assert marshmallow_path(kind, raw, MAX_BATCH, size - 1) == 422


def test_a_typed_batch_buffers_the_records_marshmallow_loads() -> None:
    sid = new_session_id()
    items = [task(sid.upper(), start_time="2026-01-01T10:00:00+02:00") for _ in range(5)]
    raw = orjson.dumps({"tasks": items})
    batch = DECODERS[TASKS.name].decode(raw, 1000)
    assert batch is not None
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    assert durable.add(TASKS, batch) == 5
    buffered = durable.drain().of(TASKS)
    loaded = TASK_SCHEMA.load(items)
    assert list(buffered) == [record["task_id"] for record in loaded]
    for record in loaded:
        stamped = buffered[record["task_id"]]
        assert {k: v for k, v in stamped.items() if k != ORDER_COLUMN} == record
        assert stamped["session_id"] == sid
    assert len({record[ORDER_COLUMN] for record in buffered.values()}) == 5


def test_statuses_come_from_the_schema_it_was_built_from() -> None:
    decoder = TypedDecoder(TASKS, build_task_schema(["queued", "fertig", "ü{0}"]))
    for status, accepted in [("queued", True), ("ü{0}", True), ("pending", False)]:
        raw = orjson.dumps({"tasks": [task(SID, status=status)]})
        assert (decoder.decode(raw, MAX_BATCH) is not None) is accepted


@pytest.mark.parametrize(
    "field",
    [
        fields.Date(required=True),
        fields.String(required=True),  # no rule the typed path knows
        fields.Integer(required=True),
        fields.String(required=True, data_key="other"),
        fields.String(load_default=lambda: "now"),
    ],
    ids=["date", "plain-string", "integer", "data-key", "callable-default"],
)
def test_a_field_it_does_not_translate_is_refused_when_built(field: fields.Field) -> None:
    class Odd(Schema):
        when = field

    with pytest.raises(TypeError, match="when"):
        TypedDecoder(TASKS, Odd(many=True))
