"""The marshmallow path from a request body to validated records: the envelope, the size,
each record.

Knows nothing of Flask: it parses the raw body with orjson (:func:`decode_json`),
loads it with the schema (:func:`validate_batch`) and raises
:mod:`persistence.errors` types, so a refused batch never reaches the buffer.
It decides every body the typed path (:mod:`persistence.typed`) does not vouch
for, and names every error of a refused one.

A 422 answer stays small whatever was sent: it echoes at most the start of a
record's key, never a value, and lists a bounded number of errors.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from marshmallow import Schema, ValidationError

from persistence.errors import BadRequest, InvalidRecords
from persistence.records import Record, RecordType
from persistence.sqlsize import sizer_for

# How many errors a 422 lists, and how many bytes of JSON they may take at most;
# `error_count` and the count in `detail` are always complete.
MAX_ERRORS_LISTED = 100
MAX_ERRORS_BYTES = 32_768
# How much of a record's key an error echoes (the longest valid key has 64 characters),
# and how long a message may be.
MAX_KEY_CHARS = 64
MAX_MESSAGE_CHARS = 500

# orjson reads an integer outside -2**63 .. 2**64-1 as the nearest float, silently.
# Such an integer has at least 19 digits; a body with no run of 19 digits holds none.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGIT_RUN = b"0" * 19


def decode_json(raw: bytes) -> Any:
    """Parse a request body, or refuse it with 400. Every integer is read exactly.

    orjson parses; a body that holds a run of 19 or more digits is read again
    with the standard library, which keeps integers of any size, so that the
    schemas see (and refuse, naming the field) an integer a JSON column
    cannot store. orjson has checked the syntax by then, so both give the same
    values otherwise.
    """
    if not raw.strip():
        raise BadRequest("Request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}.") from None
    if _LONG_DIGIT_RUN in raw.translate(_DIGITS_AS_ZERO):
        try:
            body = json.loads(raw)
        except RecursionError:  # orjson reads 1,024 levels, the standard library fewer
            raise BadRequest(
                "Request body is nested too deeply to be read exactly; records nest "
                "at most 31 levels."
            ) from None
    return body


def validate_batch(
    kind: RecordType,
    body: Any,
    schema: Schema,
    max_batch_size: int,
    *,
    max_record_bytes: int | None = None,
) -> list[Record]:
    """The records of a ``{"<kind.plural>": [...]}`` body, or an error naming what is wrong.

    ``max_record_bytes`` (None: no limit) refuses a record whose row in the SQL
    statement that writes it (:mod:`persistence.sqlsize`) would be longer.
    Safe to call from any number of threads.
    """
    name = kind.plural
    if not isinstance(body, dict):
        raise BadRequest(
            f'Request body must be a JSON object like {{"{name}": [...]}}, '
            f"not a JSON {_json_type(body)}."
        )
    if name not in body:
        raise BadRequest(f'Request body lacks the "{name}" list.')
    items = body[name]
    if not isinstance(items, list):
        raise BadRequest(f'"{name}" must be a list of records, not a JSON {_json_type(items)}.')
    if len(items) > max_batch_size:
        raise InvalidRecords(
            f"The batch holds {len(items)} {name}; at most {max_batch_size} are accepted per "
            "request (buffer.max_batch_size). Nothing was accepted.",
            errors=[
                {"index": None, "field": name, "message": f"Longer than {max_batch_size} records."}
            ],
        )
    try:
        records = schema.load(items)
    except ValidationError as exc:
        errors = describe_errors(kind, items, exc.messages)
        raise refusal(kind, len(items), "invalid", errors) from None
    if max_record_bytes is not None:
        check_record_bytes(kind, schema, items, records, max_record_bytes)
    return records


def check_record_bytes(
    kind: RecordType, schema: Schema, items: list[Any], records: list[Record], limit: int
) -> None:
    """Refuse with 422 the batch if a record's row as SQL would take more than ``limit`` bytes.

    ``records`` are the loaded ``items``. The common case costs nothing per
    task (every task column has a bounded size) and one JSON encoding per
    session object; only a record whose bound passes the limit is measured
    exactly.
    """
    sizer = sizer_for(kind, schema)
    if not sizer.measured and sizer.fixed_bytes <= limit:
        return
    errors = []
    for index, record in enumerate(records):
        if sizer.bound(record) <= limit:
            continue
        sizes = sizer.sizes(record)
        total = sizer.row_bytes(sizes)
        if total <= limit:
            continue
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
        fields = ", ".join(f"{column} {sizes[column]:,} bytes" for column in largest)
        errors.append(
            {
                "index": index,
                kind.key: _key_echo(items[index].get(kind.key)),
                "field": largest[0],
                "message": (
                    f"The record is {total:,} bytes as SQL; at most {limit:,} are accepted "
                    "(database.max_record_bytes, derived from the server's max_allowed_packet). "
                    f"Largest fields: {fields}."
                ),
            }
        )
    if errors:
        raise refusal(kind, len(records), "too large for the database", errors)


def refusal(
    kind: RecordType, count: int, reason: str, errors: list[dict[str, Any]]
) -> InvalidRecords:
    """The 422 refusing a batch of ``count`` records for ``errors`` (entries with an ``index``).

    ``detail`` counts the records in error; ``errors`` lists as many entries
    as MAX_ERRORS_LISTED and MAX_ERRORS_BYTES allow; ``error_count`` counts all.
    """
    invalid = len({error["index"] for error in errors})
    listed, size = [], 0
    for error in errors[:MAX_ERRORS_LISTED]:
        size += len(orjson.dumps(error)) + 1
        if listed and size > MAX_ERRORS_BYTES:
            break
        listed.append(error)
    return InvalidRecords(
        f"{invalid} of {count} {kind.plural} are {reason}; nothing was accepted.",
        errors=listed,
        error_count=len(errors),
    )


def describe_errors(kind: RecordType, items: list[Any], messages: Any) -> list[dict[str, Any]]:
    """Flatten marshmallow's ``{index: {field: [message]}}`` into one entry per field.

    Each entry is small: the key is cut to its first MAX_KEY_CHARS characters,
    and a message to MAX_MESSAGE_CHARS.
    """
    errors = []
    for index in sorted(messages):
        item = items[index]
        key = _key_echo(item.get(kind.key)) if isinstance(item, dict) else None
        for field, reasons in sorted(messages[index].items()):
            for reason in _flat(reasons):
                if field == "_schema":
                    field, reason = None, f"A {kind.name} must be a JSON object."
                errors.append(
                    {
                        "index": index,
                        kind.key: key,
                        "field": field,
                        "message": _cut(reason, MAX_MESSAGE_CHARS),
                    }
                )
    return errors


def _key_echo(key: Any) -> str | None:
    """A record's key as an error shows it: itself, or its start and its length when long."""
    if not isinstance(key, str):
        return None
    shown = key[:MAX_KEY_CHARS]
    if not shown.isascii():
        # An unpaired surrogate (possible from Python callers) would break the JSON answer.
        shown = shown.encode("utf-8", "replace").decode("utf-8")
    if len(key) <= MAX_KEY_CHARS:
        return shown
    return f"{shown}… ({len(key):,} characters)"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flat(reasons: Any) -> list[str]:
    if isinstance(reasons, list):
        return [str(reason) for reason in reasons]
    if isinstance(reasons, dict):  # a nested field: {"sub": ["msg"]}
        return [f"{sub}: {msg}" for sub, msgs in reasons.items() for msg in _flat(msgs)]
    return [str(reasons)]


def _json_type(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), "value")
