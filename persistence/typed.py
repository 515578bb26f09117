"""Typed decoding: the schemas' rules as msgspec types, for request bodies that are valid.

marshmallow (:mod:`persistence.schemas`) stays the single source of truth of the
record rules and of every error message. :class:`TypedDecoder` reads a schema's
fields and their parameters once, when the receiver builds its schemas (the
statuses are configurable), and derives from them:

- a ``msgspec.Struct`` per record type, whose annotations carry every rule
  msgspec checks in C while it decodes: the JSON type (an integer field refuses
  ``1.0``, ``1e0``, ``true`` and ``"1"``, as marshmallow's strict ``Count`` does;
  a number field refuses booleans), ``Meta(min_length, max_length, ge, le)``,
  ``Literal`` statuses, required fields, defaults and nulls;
- a post-pass over the whole batch for the rules msgspec cannot express:
  blank and whitespace-bounded texts, UTF-8 byte limits (only strings longer
  than a quarter of the limit in characters are measured), the UUID text form
  (lower-cased), date-times converted to UTC text within the TIMESTAMP range
  (:func:`persistence.schemas.iso_to_utc_text`), JSON columns
  (:func:`persistence.schemas.json_fault`), and the record size as SQL
  (:mod:`persistence.sqlsize`).

The raw body, envelope included, is decoded straight into these types: no dict
is built per record, and :class:`TypedBatch` encodes each record to the bytes
the buffer keeps without one either. :meth:`TypedDecoder.decode` returns None
whenever it cannot vouch for a batch; the caller then takes the orjson +
marshmallow path, which accepts what it accepts and answers the full 400 or
422 otherwise. It declines, besides every invalid batch:

- a body holding a field the schema does not know (in a record or in the
  envelope). msgspec would skip such a field without checking that its bytes
  are UTF-8, where orjson refuses the whole body (400); the marshmallow path
  ignores unknown fields of a body orjson reads, as SPEC.md asks;
- a batch of more than ``buffer.max_batch_size`` records;
- a batch with a record whose cheap size bound as SQL passes the limit (the
  marshmallow path measures it exactly).

What msgspec reads is what the marshmallow path reads: integers of any size
exactly (the marshmallow path re-reads bodies with long digit runs for the
same reason), numbers beyond a double refused, lone surrogate escapes, invalid
UTF-8, control characters, ``NaN`` and ``Infinity`` refused as malformed (so no
decoded string can hold a surrogate and the schemas' encoding rule holds), and
the last of duplicate keys kept. tests/test_typed.py checks this on raw
bodies against the marshmallow path: same acceptance, same records.

A field type or validator not translated here raises TypeError when the
decoder is built, so that a new rule cannot silently escape the typed path.

Threading contract: a :class:`TypedDecoder` is immutable once built; any number
of request threads may call :meth:`~TypedDecoder.decode` at once (msgspec keeps
each call's state on its own stack and holds the GIL throughout). A
:class:`TypedBatch` belongs to the one request thread that decoded it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec
from marshmallow import Schema, fields, validate

from persistence import schemas
from persistence.records import ORDER_COLUMN, RecordType
from persistence.sqlsize import RecordSizer, sizer_for

# A post-pass rule over a whole batch of decoded records: False refuses the batch.
# It may convert values in place (date-times to UTC text, UUIDs to lower case).
Check = Callable[[list[Any]], bool]
Values = Callable[[list[Any]], Iterable[Any]]

# UTF-8 takes at most this many bytes per character.
_MAX_UTF8_WIDTH = 4


class TypedBatch:
    """Records the typed path decoded and checked, to be stamped and encoded by the buffer."""

    __slots__ = ("_encode", "_key", "records")

    def __init__(
        self, records: list[Any], key: Callable[[Any], str], encode: Callable[[Any], bytes]
    ) -> None:
        self.records = records
        self._key = key
        self._encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def keys(self) -> list[str]:
        """The records' primary keys, in order."""
        return list(map(self._key, self.records))

    def encode_stamped(self, stamps: Iterable[int]) -> list[bytes]:
        """Give each record its arrival stamp, then encode it as compact JSON.

        The stamp is the record type's last field, so it is the encoding's last
        key, as :func:`persistence.records.stamp_of` expects.
        """
        for record, stamp in zip(self.records, stamps, strict=True):
            setattr(record, ORDER_COLUMN, stamp)
        encode = self._encode
        # Copied to their exact length: msgspec's result keeps its working buffer's spare
        # room (about a third more per record), and these bytes stay in the buffer.
        return [bytes(memoryview(encode(record))) for record in self.records]


class TypedDecoder:
    """Decodes and checks one record type's request bodies with types derived from its schema."""

    def __init__(self, kind: RecordType, schema: Schema) -> None:
        self.kind = kind
        annotations: list[tuple[Any, ...]] = []
        checks: list[Check] = []
        for name, field in schema.load_fields.items():
            if name == ORDER_COLUMN:
                raise TypeError(f"field {name!r}: the arrival stamp is not an input field")
            annotation, field_checks = _translate(name, field)
            if field.required:
                annotations.append((name, annotation))
            else:
                annotations.append((name, annotation, _default(name, field)))
            checks += field_checks
        # The stamp, last so that it ends the encoding. A body that sends a field of
        # that name has it overwritten on arrival, as if ignored like any unknown field.
        annotations.append((ORDER_COLUMN, int, 0))
        # gc=False: a record holds strings, numbers and JSON values, never itself, so
        # the cycle collector need not track a thousand more objects per request.
        self.record_type = msgspec.defstruct(
            f"{kind.name.title()}Record",
            annotations,
            kw_only=True,
            forbid_unknown_fields=True,
            gc=False,
        )
        self.body_type = msgspec.defstruct(
            f"{kind.plural.title()}Body",
            [(kind.plural, list[self.record_type])],
            forbid_unknown_fields=True,
        )
        self._decoder = msgspec.json.Decoder(self.body_type)
        self._records = attrgetter(kind.plural)
        self._key = attrgetter(kind.key)
        self._encode = msgspec.json.Encoder().encode
        self._checks = tuple(checks)
        self._sizer: RecordSizer = sizer_for(kind, schema)

    def decode(
        self, raw: bytes, max_batch_size: int, max_record_bytes: int | None = None
    ) -> TypedBatch | None:
        """The records of a ``{"<plural>": [...]}`` body, checked; None when the typed path
        cannot vouch for the body (then the marshmallow path decides).

        ``max_record_bytes`` is the limit of a record's row as SQL (None: no limit).
        """
        try:
            records = self._records(self._decoder.decode(raw))
        except (msgspec.DecodeError, RecursionError):
            # DecodeError covers ValidationError. RecursionError: nested deeper than
            # msgspec reads at this stack depth.
            return None
        if len(records) > max_batch_size:
            return None
        for check in self._checks:
            if not check(records):
                return None
        if max_record_bytes is not None and not self._fit(records, max_record_bytes):
            return None
        return TypedBatch(records, self._key, self._encode)

    def _fit(self, records: list[Any], limit: int) -> bool:
        """Whether every record's cheap size bound as SQL is within ``limit``."""
        sizer = self._sizer
        if not sizer.measured:
            return sizer.fixed_bytes <= limit  # every column bounded: nothing per record
        return all(sizer.bound(msgspec.structs.asdict(record)) <= limit for record in records)


# --- translating one field ------------------------------------------------------------------


def _translate(name: str, field: fields.Field) -> tuple[Any, list[Check]]:
    """The msgspec annotation of ``field`` and the post-pass checks msgspec cannot do."""
    if field.data_key is not None:
        raise TypeError(f"field {name!r}: a data_key is not translated to the typed path")
    values = _values(name, field.allow_none)
    checks: list[Check] = []
    if isinstance(field, schemas.Text):
        _no_validators(name, field)
        annotation, checks = _text(field, values)
    elif isinstance(field, schemas.UuidText):
        _no_validators(name, field)
        length = len("00000000-0000-0000-0000-000000000000")
        annotation = Annotated[str, msgspec.Meta(min_length=length, max_length=length)]
        checks = [_uuid_check(name, values)]
    elif isinstance(field, schemas.Count):
        annotation = Annotated[int, msgspec.Meta(**_range(name, field))]
    elif isinstance(field, schemas.Fraction):
        annotation = Annotated[float, msgspec.Meta(**_range(name, field))]
    elif isinstance(field, schemas.UtcTimestamp):
        _no_validators(name, field)
        annotation = str
        checks = [_timestamp_check(name)]
    elif isinstance(field, schemas.JsonObject):
        _no_validators(name, field)
        annotation = dict[str, Any]
        checks = [_json_check(values)]
    elif type(field) is fields.String:
        annotation = Literal.__getitem__(_choices(name, field))
    else:
        raise TypeError(f"field {name!r}: {type(field).__name__} is not translated")
    if field.allow_none:
        annotation = annotation | None
    return annotation, checks


def _default(name: str, field: fields.Field) -> Any:
    default = field.load_default
    if default is not None and type(default) not in (int, float, str):
        # marshmallow omits a field without a load_default; a typed record cannot.
        raise TypeError(f"field {name!r}: default {default!r} is not a constant")
    return default


def _no_validators(name: str, field: fields.Field) -> None:
    if field.validators:
        raise TypeError(f"field {name!r}: its validators are not translated")


def _range(name: str, field: fields.Field) -> dict[str, Any]:
    """The field's one Range validator as msgspec Meta bounds."""
    if len(field.validators) != 1 or not isinstance(field.validators[0], validate.Range):
        raise TypeError(f"field {name!r}: only a single Range validator is translated")
    rule = field.validators[0]
    bounds = {}
    if rule.min is not None:
        bounds["ge" if rule.min_inclusive else "gt"] = rule.min
    if rule.max is not None:
        bounds["le" if rule.max_inclusive else "lt"] = rule.max
    return bounds


def _choices(name: str, field: fields.Field) -> tuple[str, ...]:
    """The field's one OneOf validator's choices, all strings."""
    if len(field.validators) != 1 or not isinstance(field.validators[0], validate.OneOf):
        raise TypeError(f"field {name!r}: only a single OneOf validator is translated")
    choices = tuple(field.validators[0].choices)
    if not choices or not all(type(choice) is str for choice in choices):
        raise TypeError(f"field {name!r}: OneOf choices must be strings")
    return choices


def _values(name: str, nullable: bool) -> Values:
    """The values of field ``name`` across a batch; without nulls when it may be null."""
    get = attrgetter(name)
    if nullable:
        # filter(None) also drops "" and {}: every check below accepts those.
        return lambda records: filter(None, map(get, records))
    return lambda records: map(get, records)


def _text(field: schemas.Text, values: Values) -> tuple[Any, list[Check]]:
    limits = [limit for limit in (field.max_chars, field.max_bytes) if limit is not None]
    # A character takes at least one byte: a byte limit bounds the characters too.
    meta = msgspec.Meta(min_length=0 if field.blank else 1, max_length=min(limits, default=None))
    checks = []
    if field.identifier:
        # Equal to its stripped self: no surrounding whitespace, and with min_length 1
        # not blank either.
        checks.append(_unstripped_check(values))
    elif not field.blank:
        checks.append(_not_blank_check(values))
    if field.max_bytes is not None and (
        field.max_chars is None or _MAX_UTF8_WIDTH * field.max_chars > field.max_bytes
    ):
        checks.append(_utf8_bytes_check(values, field.max_bytes))
    return Annotated[str, meta], checks


# --- post-pass checks -------------------------------------------------------------------------
# Each walks the batch once, in C where it can (map, filter, set); Python runs per
# record only to convert a value.


def _not_blank_check(values: Values) -> Check:
    def check(records: list[Any]) -> bool:
        # Empty strings are refused by min_length; str.isspace is what str.strip strips.
        return not any(map(str.isspace, values(records)))

    return check


def _unstripped_check(values: Values) -> Check:
    def check(records: list[Any]) -> bool:
        texts = list(values(records))
        return texts == list(map(str.strip, texts))

    return check


def _utf8_bytes_check(values: Values, max_bytes: int) -> Check:
    # A string of at most this many characters cannot pass max_bytes in UTF-8.
    safe_chars = max_bytes // _MAX_UTF8_WIDTH

    def check(records: list[Any]) -> bool:
        if max(map(len, values(records)), default=0) <= safe_chars:
            return True
        return all(
            len(text.encode("utf-8")) <= max_bytes
            for text in values(records)
            if len(text) > safe_chars
        )

    return check


def _uuid_check(name: str, values: Values) -> Check:
    match = schemas.UUID_TEXT.fullmatch

    def check(records: list[Any]) -> bool:
        # A batch holds few distinct session ids: check each once.
        lowered = {}
        for text in set(values(records)):
            if not match(text):
                return False
            lower = text.lower()
            if lower != text:
                lowered[text] = lower
        if lowered:
            get = attrgetter(name)
            for record in records:
                text = get(record)
                if text in lowered:
                    setattr(record, name, lowered[text])
        return True

    return check


def _timestamp_check(name: str) -> Check:
    to_utc_text = schemas.iso_to_utc_text
    get = attrgetter(name)

    def check(records: list[Any]) -> bool:
        for record in records:
            value = get(record)
            if value is None:
                continue
            try:
                text = to_utc_text(value)
            except ValueError:
                return False
            if text is None:
                return False
            setattr(record, name, text)
        return True

    return check


def _json_check(values: Values) -> Check:
    fault = schemas.json_fault

    def check(records: list[Any]) -> bool:
        return all(fault(value) is None for value in values(records))

    return check
