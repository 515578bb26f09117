"""marshmallow schemas for sessions and tasks: the single source of truth of the record rules.

The limits follow the columns of the tables (docs/DATA_MODELS.md), counted the
way MySQL counts them: VARCHAR(n) holds n characters, TEXT holds 65,535 bytes of
UTF-8, INT holds up to 2,147,483,647, TIMESTAMP holds 1970-01-01 00:00:01 to
2038-01-19 03:14:07 UTC, and JSON nests at most 31 levels (MariaDB's limit).
What these schemas accept can therefore be written.

Loaded records are plain dicts holding exactly the columns of their table
(unknown fields are dropped), with defaults filled in and date-times
converted to UTC text (``YYYY-MM-DD HH:MM:SS``, which MySQL, MariaDB and
SQLite all read), so that a record is plain JSON data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

INT_MAX = 2_147_483_647
TEXT_MAX_BYTES = 65_535
# MySQL's JSON type holds 100 levels; MariaDB's JSON_VALID check refuses 32 and more.
JSON_MAX_DEPTH = 31
# The integers a JSON column keeps exactly: MySQL stores them as int64 or uint64 (and
# larger ones as doubles); orjson, which writes the column's text, stops there too.
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
TIMESTAMP_MIN = datetime(1970, 1, 1, 0, 0, 1)
TIMESTAMP_MAX = datetime(2038, 1, 19, 3, 14, 7)
UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


class Text(fields.String):
    """A string that must be valid UTF-8 and fit its column.

    ``max_chars`` bounds characters (VARCHAR), ``max_bytes`` bounds the UTF-8
    encoding (TEXT). ``blank`` allows empty or whitespace-only strings;
    ``identifier`` refuses surrounding whitespace, which MySQL would ignore
    when comparing keys.
    """

    default_error_messages = {
        "blank": "Must not be empty.",
        "encoding": "Must be valid Unicode text (it holds an unpaired surrogate).",
        "too_many_chars": "Longer than {max} characters.",
        "too_many_bytes": "Longer than {max} bytes in UTF-8 ({actual} bytes).",
        "whitespace": "Must not start or end with whitespace.",
    }

    def __init__(
        self,
        *,
        max_chars: int | None = None,
        max_bytes: int | None = None,
        blank: bool = False,
        identifier: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_chars = max_chars
        self.max_bytes = max_bytes
        self.blank = blank
        self.identifier = identifier

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise self.make_error("encoding") from None
        if not self.blank and not text.strip():
            raise self.make_error("blank")
        if self.identifier and text != text.strip():
            raise self.make_error("whitespace")
        if self.max_chars is not None and len(text) > self.max_chars:
            raise self.make_error("too_many_chars", max=self.max_chars)
        if self.max_bytes is not None and size > self.max_bytes:
            raise self.make_error("too_many_bytes", max=self.max_bytes, actual=size)
        return text


class UuidText(fields.String):
    """A UUID in its 36-character text form, normalised to lower case."""

    default_error_messages = {"invalid_uuid": "Must be a UUID of 36 characters."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        # uuid.UUID() alone would accept braces, a sign, underscores or misplaced hyphens.
        if not UUID_TEXT.fullmatch(text):
            raise self.make_error("invalid_uuid")
        return text.lower()


class Count(fields.Integer):
    """A JSON integer (not a boolean, not a string, not 1.5) that fits a signed INT."""

    default_error_messages = {"invalid": "Must be an integer."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, validate=validate.Range(0, INT_MAX), **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._validated(value)


class Fraction(fields.Float):
    """A JSON number between 0 and 1 (not a boolean, not a string)."""

    default_error_messages = {"invalid": "Must be a number."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Range(0, 1), **kwargs)

    def _validated(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._validated(value)


class UtcTimestamp(fields.DateTime):
    """An ISO-8601 date-time, with or without offset, returned as UTC ``YYYY-MM-DD HH:MM:SS``.

    A value without offset is taken as UTC. Sub-second digits are dropped
    (the column holds whole seconds; MySQL would round, MariaDB truncate).
    """

    default_error_messages = {
        "range": "Must be between 1970-01-01T00:00:01Z and 2038-01-19T03:14:07Z.",
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(format="iso", **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE)
        try:
            text = iso_to_utc_text(value)
        except ValueError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None
        if text is None:
            raise self.make_error("range")
        return text


_UTC_SUFFIXES = ("", "Z", "+00:00")
_TEXT_MIN = TIMESTAMP_MIN.isoformat(" ")
_TEXT_MAX = TIMESTAMP_MAX.isoformat(" ")


def iso_to_utc_text(value: str) -> str | None:
    """An ISO-8601 date-time as UTC ``YYYY-MM-DD HH:MM:SS``; None outside the TIMESTAMP range.

    Raises ValueError when ``value`` is not a date-time ``datetime.fromisoformat``
    reads. The common ``YYYY-MM-DDTHH:MM:SS`` form in UTC (bare, ``Z`` or ``+00:00``,
    with or without sub-seconds) is answered by slicing once it has parsed, which
    is several times faster.
    """
    moment = datetime.fromisoformat(value)
    if (
        (value[19:] in _UTC_SUFFIXES or (value[19:20] == "." and not moment.utcoffset()))
        and len(value) >= 19
        and value[10] in "T "
        and value[13] == ":"
        and value[16] == ":"
        and value[4] == "-"
        and value[7] == "-"
    ):
        text = f"{value[:10]} {value[11:19]}"
        return text if _TEXT_MIN <= text <= _TEXT_MAX else None
    return utc_text(moment)


def utc_text(moment: datetime) -> str | None:
    """``moment`` as UTC ``YYYY-MM-DD HH:MM:SS``, or None outside the TIMESTAMP range."""
    offset = moment.utcoffset()
    if offset is not None:
        try:
            moment = (moment - offset).replace(tzinfo=None)
        except OverflowError:  # before year 1 or after 9999 in UTC
            return None
    if moment.microsecond:
        moment = moment.replace(microsecond=0)
    if not TIMESTAMP_MIN <= moment <= TIMESTAMP_MAX:
        return None
    return moment.isoformat(" ")


class JsonObject(fields.Dict):
    """A JSON object that MySQL's and MariaDB's JSON columns store as sent (:func:`json_fault`)."""

    default_error_messages = {
        "too_deep": f"Nested deeper than {JSON_MAX_DEPTH} levels.",
        "integer_range": (
            "Holds an integer outside the 64-bit range at {path}; a JSON column keeps "
            f"integers from {JSON_INT_MIN} to {JSON_INT_MAX} exactly. Send larger numbers as "
            "strings."
        ),
        "not_finite": "Holds NaN or an infinite number at {path}, which JSON cannot represent.",
        "encoding": "Holds text with an unpaired surrogate at {path}.",
        "not_json": "Holds a value that is not JSON at {path}.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict:
        result = super()._deserialize(value, attr, data, **kwargs)
        fault = json_fault(result)
        if fault == "too_deep":
            raise self.make_error(fault)
        if fault is not None:
            raise self.make_error(fault, path=json_fault_path(result, attr or self.name or ""))
        return result


# Leaf checks of json_fault: the error key of a value a JSON column cannot keep exactly.
def _int_fault(value: int) -> str | None:
    return None if JSON_INT_MIN <= value <= JSON_INT_MAX else "integer_range"


def _float_fault(value: float) -> str | None:
    return None if value - value == 0.0 else "not_finite"  # NaN and ±inf give NaN


def _str_fault(value: str) -> str | None:
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "encoding"
    return None


def _leaf_fault(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return _str_fault(value)
    if kind is int:
        return _int_fault(value)
    if kind is float:
        return _float_fault(value)
    if value is None or kind is bool:
        return None
    return "not_json"


def json_fault(value: Any) -> str | None:
    """Why a JSON column could not store ``value`` exactly, as an error key of JsonObject; or None.

    ``too_deep``: more than JSON_MAX_DEPTH nested objects and arrays.
    ``integer_range``: an integer outside -2**63 .. 2**64-1, which MySQL would
    turn into a float, and which the service's JSON encoder (orjson) cannot write.
    ``not_finite``: NaN or an infinity, which JSON has no words for.
    ``encoding``: a string (or key) with an unpaired surrogate, not UTF-8.
    ``not_json``: anything but dict, list, str, int, float, bool and None.
    Walks level by level without recursion: the depth check stops at level
    JSON_MAX_DEPTH + 1, however deep the value goes.
    """
    level, containers = 0, [value]
    while containers:
        level += 1
        if level > JSON_MAX_DEPTH:
            return "too_deep"
        inner = []
        for container in containers:
            if type(container) is dict:
                for key, item in container.items():
                    fault = _leaf_fault(key) if type(key) is str else "not_json"
                    if fault is None and type(item) in _CONTAINERS:
                        inner.append(item)
                    elif fault is None:
                        fault = _leaf_fault(item)
                    if fault is not None:
                        return fault
            else:
                for item in container:
                    if type(item) in _CONTAINERS:
                        inner.append(item)
                    elif (fault := _leaf_fault(item)) is not None:
                        return fault
        containers = inner
    return None


_CONTAINERS = (dict, list)
# Keys shown in full in an error's path up to this many characters.
_PATH_KEY_CHARS = 32
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def json_fault_path(value: Any, name: str) -> str:
    """Where in ``value`` (a field called ``name``) its first faulty leaf sits: ``metadata.a[2]``.

    Keys longer than a few dozen characters are cut, so that the path stays
    short whatever the input; keys that are not plain words are quoted.
    """
    queue: list[tuple[Any, str]] = [(value, name)]
    for container, path in queue:
        pairs = container.items() if type(container) is dict else enumerate(container)
        for key, item in pairs:
            if type(container) is dict:
                if type(key) is not str or _leaf_fault(key) is not None:
                    return f"a key of {path}"
                here = path + _path_key(key)
            else:
                here = f"{path}[{key}]"
            if type(item) in _CONTAINERS:
                queue.append((item, here))
            elif _leaf_fault(item) is not None:
                return here
    return name


def _path_key(key: str) -> str:
    shown, cut = key[:_PATH_KEY_CHARS], "…" if len(key) > _PATH_KEY_CHARS else ""
    if _PLAIN_KEY.fullmatch(shown):
        return f".{shown}{cut}"
    return "[" + json.dumps(shown + cut, ensure_ascii=False) + "]"


def _optional_text() -> Text:
    return Text(max_bytes=TEXT_MAX_BYTES, blank=True, allow_none=True, load_default=None)


def _optional_count() -> Count:
    return Count(load_default=0)


def _status(allowed: Iterable[str]) -> fields.String:
    choices = tuple(allowed)
    # "{choices}" rather than the names themselves: marshmallow formats the message, so a
    # configured name holding braces would break it or echo the input.
    return fields.String(
        required=True, validate=validate.OneOf(choices, error="Must be one of: {choices}.")
    )


class _RecordSchema(Schema):
    class Meta:
        unknown = EXCLUDE


def build_session_schema(statuses: Iterable[str]) -> Schema:
    """A schema (``many=True``) for session records with the given status set."""

    class SessionSchema(_RecordSchema):
        session_id = UuidText(required=True)
        filename = Text(required=True, max_chars=255)
        file_path = Text(required=True, max_chars=512)
        status = _status(statuses)
        game_info = JsonObject(allow_none=True, load_default=None)
        llm_provider = Text(required=True, max_chars=50)
        metadata = JsonObject(allow_none=True, load_default=None)
        total_tasks = _optional_count()
        completed_tasks = _optional_count()
        failed_tasks = _optional_count()
        processing_tasks = _optional_count()

    return SessionSchema(many=True)


def build_task_schema(statuses: Iterable[str]) -> Schema:
    """A schema (``many=True``) for task records with the given status set."""

    class TaskSchema(_RecordSchema):
        task_id = Text(required=True, max_chars=64, identifier=True)
        session_id = UuidText(required=True)
        batch_id = Text(required=True, max_chars=64)
        sheet_name = Text(required=True, max_chars=255)
        row_index = Count(required=True)
        column_name = Text(required=True, max_chars=255)
        source_text = Text(required=True, max_bytes=TEXT_MAX_BYTES)
        target_text = _optional_text()
        context = _optional_text()
        status = _status(statuses)
        confidence = Fraction(allow_none=True, load_default=None)
        error_message = _optional_text()
        retry_count = _optional_count()
        start_time = UtcTimestamp(allow_none=True, load_default=None)
        end_time = UtcTimestamp(allow_none=True, load_default=None)
        duration_ms = Count(allow_none=True, load_default=None)

    return TaskSchema(many=True)
