"""Records to the bytes the service reads: one JSON document per record, joined per batch."""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

# Level 5 compresses record JSON almost as well as 9 at a fraction of its CPU.
_GZIP_LEVEL = 5


def encode_records(kind: str, records: Iterable[Mapping[str, Any]]) -> list[bytes]:
    """Each record as compact UTF-8 JSON, taken now: later changes to the dicts are not sent.

    Raises ``TypeError`` for an item that is not a mapping and ``ValueError``
    for a value JSON cannot hold (NaN, an arbitrary object), naming the index.
    ``datetime``/``date`` become ISO-8601 strings, ``UUID`` its string and
    ``Decimal`` a number, as the service reads them.
    """
    encoded = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"{kind} record at index {index} is a {type(record).__name__}, not a mapping"
            )
        try:
            text = json.dumps(
                dict(record),
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
                default=_json_value,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{kind} record at index {index} cannot be sent as JSON: {exc}"
            ) from None
        encoded.append(text.encode("utf-8"))
    return encoded


def batch_body(kind: str, payloads: Iterable[bytes]) -> bytes:
    """The request body ``{"<kind>": [record, ...]}`` from already encoded records."""
    return b'{"' + kind.encode("ascii") + b'":[' + b",".join(payloads) + b"]}"


def gzip_body(body: bytes) -> bytes:
    """``body`` compressed for ``Content-Encoding: gzip``."""
    return gzip.compress(body, compresslevel=_GZIP_LEVEL)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
