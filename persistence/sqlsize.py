"""How many bytes a record takes in the SQL statement that writes it.

The MySQL store writes records with PyMySQL's ``executemany``, which sends each
record as one row ``(v1, v2, ...)`` of a multi-row ``INSERT ... VALUES``. A
row alone in its statement must still fit in the server's
``max_allowed_packet`` (16 MiB by default on MariaDB, 64 MiB on MySQL 8);
otherwise the server refuses the statement and drops the connection, and every
retry fails the same way. The API refuses such a record up front instead
(``validate_batch(..., max_record_bytes=...)`` in :mod:`persistence.intake`).

A value takes the bytes PyMySQL writes for it: ``NULL``; an integer in
decimal; a float as its ``repr``, plus ``e0`` when that has no exponent; text
as a quoted UTF-8 literal in which each of ``\\0 \\n \\r \\x1a ' " \\`` is
escaped with a backslash; a JSON column as the text the store makes of it with
orjson (``store/dialects.py``), quoted the same way. A server in
``NO_BACKSLASH_ESCAPES`` mode only doubles quotes, which is never longer, so
these sizes stay upper bounds there. The row adds its parentheses and a
``", "`` between values; the statement's head and update clause (about 1 KB)
are not part of it.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from marshmallow import Schema, fields, validate

from persistence import schemas
from persistence.records import ORDER_COLUMN, Record, RecordType

# The bytes PyMySQL's escape_string writes as two: a backslash, then a letter or themselves.
_ESCAPED = tuple(bytes([byte]) for byte in b"\x00\n\r\x1a'\"\\")
NULL_BYTES = len("NULL")
# The arrival stamp is added after validation: a BIGINT, at most 20 characters with its sign.
STAMP_BYTES = len(str(-(2**63)))
# The longest escape_float of any finite double: repr has at most 23 characters
# without an exponent ("-0.00012345678901234567"), to which "e0" is added.
FLOAT_BYTES = 25
# A UUID's 36 characters, quoted; none is escaped.
UUID_BYTES = 38
# "'YYYY-MM-DD HH:MM:SS'"
TIMESTAMP_BYTES = 21


def quoted_bytes(text: str | bytes) -> int:
    """The bytes of ``text`` as a quoted, escaped SQL string literal (exact)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return len(data) + 2 + sum(map(data.count, _ESCAPED))


def value_bytes(value: Any) -> int:
    """The bytes PyMySQL writes for a scalar ``value`` (exact)."""
    if value is None:
        return NULL_BYTES
    kind = type(value)
    if kind is str:
        return quoted_bytes(value)
    if kind is bool:
        return 1
    if kind is int:
        return len(str(value))
    if kind is float:
        text = repr(value)
        return len(text) if "e" in text else len(text) + 2
    raise TypeError(f"no SQL size for a {kind.__name__}")


def json_bytes(value: Any) -> int:
    """The bytes of a JSON column's value as SQL: its orjson text, quoted (exact)."""
    return NULL_BYTES if value is None else quoted_bytes(orjson.dumps(value))


def _json_bound(value: Any) -> int:
    # Escaping at most doubles each byte of the text; counting the escapes costs a pass more.
    return NULL_BYTES if value is None else 2 * len(orjson.dumps(value)) + 2


def field_bound(field: fields.Field) -> int | None:
    """The most bytes, as SQL, of any value ``field`` accepts; None when it sets no bound."""
    widest: int | None = None
    if isinstance(field, schemas.Text):
        # A character takes at most 4 bytes in UTF-8, an escaped one 2; only one-byte
        # characters are escaped, so escaping at most doubles the UTF-8 size.
        limits = [4 * field.max_chars] if field.max_chars is not None else []
        limits += [2 * field.max_bytes] if field.max_bytes is not None else []
        widest = min(limits) + 2 if limits else None
    elif isinstance(field, schemas.UuidText):
        widest = UUID_BYTES
    elif isinstance(field, schemas.Count):
        ranges = [rule for rule in field.validators if isinstance(rule, validate.Range)]
        if ranges and all(r.min is not None and r.max is not None for r in ranges):
            widest = max(len(str(end)) for r in ranges for end in (r.min, r.max))
    elif isinstance(field, schemas.Fraction):
        widest = FLOAT_BYTES
    elif isinstance(field, schemas.UtcTimestamp):
        widest = TIMESTAMP_BYTES
    else:
        choices = [rule for rule in field.validators if isinstance(rule, validate.OneOf)]
        if choices and all(isinstance(c, str) for rule in choices for c in rule.choices):
            widest = max(quoted_bytes(c) for rule in choices for c in rule.choices)
    if widest is not None and field.allow_none:
        widest = max(widest, NULL_BYTES)
    return widest


class RecordSizer:
    """The bytes of one record type's rows as SQL: a bound that is cheap to check, and exact sizes.

    Columns whose size the schema bounds (texts with a limit, numbers, times,
    statuses) count at their widest, once for all; the others (the JSON
    objects) are measured in each record. Immutable once built, so any number
    of threads may share one.
    """

    def __init__(self, kind: RecordType, schema: Schema) -> None:
        self.kind = kind
        # The parentheses, and ", " between values: two bytes per column.
        fixed = 2 * len(kind.columns)
        measured = []
        for column in kind.columns:
            if column == ORDER_COLUMN:
                widest: int | None = STAMP_BYTES
            else:
                field = schema.load_fields.get(column)
                widest = None if field is None else field_bound(field)
            if widest is None:
                measured.append(column)
            else:
                fixed += widest
        self.fixed_bytes = fixed
        self.measured = tuple(measured)

    def bound(self, record: Record) -> int:
        """At least the bytes of ``record``'s row, cheaply: the bounded columns at their widest,
        the others at twice their length (escaping at most doubles a text)."""
        total = self.fixed_bytes
        for column in self.measured:
            value = record.get(column)
            if column in self.kind.json_columns:
                total += _json_bound(value)
            elif type(value) is str:
                # A character takes at most 4 bytes, escaped or not.
                total += (2 if value.isascii() else 4) * len(value) + 2
            else:
                total += value_bytes(value)
        return total

    def sizes(self, record: Record) -> dict[str, int]:
        """The exact bytes of each column of ``record``'s row (the arrival stamp at its widest)."""
        sizes = {}
        for column in self.kind.columns:
            if column == ORDER_COLUMN and column not in record:
                sizes[column] = STAMP_BYTES
            elif column in self.kind.json_columns:
                sizes[column] = json_bytes(record.get(column))
            else:
                sizes[column] = value_bytes(record.get(column))
        return sizes

    @staticmethod
    def row_bytes(sizes: dict[str, int]) -> int:
        """The bytes of a row ``(v1, v2, ...)`` whose values take ``sizes``."""
        return sum(sizes.values()) + 2 * len(sizes)


@functools.lru_cache(maxsize=64)
def sizer_for(kind: RecordType, schema: Schema) -> RecordSizer:
    """The sizer of ``kind`` under ``schema``, built once per pair (thread-safe)."""
    return RecordSizer(kind, schema)
