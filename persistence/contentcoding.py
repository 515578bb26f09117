"""Compressed request bodies: ``Content-Encoding: gzip`` and ``deflate``, inflated within a limit.

Knows nothing of Flask: :func:`coding_of` reads the ``Content-Encoding``
header (415 for a coding the service does not read) and :func:`inflate`
turns the body as sent into the body as meant, raising
:mod:`persistence.errors` types.

``service.max_request_bytes`` bounds the body as sent (the HTTP worker reads
no more) *and* as inflated: :func:`inflate` works in steps of at most
:data:`STEP` output bytes (``zlib.decompressobj`` with ``max_length``) and
stops with 413 as soon as the output passes the limit, so a small body that
would inflate to gigabytes (a "gzip bomb") costs at most the limit in
memory and the time to inflate that much.

``deflate`` is the zlib format (RFC 1950) by the HTTP specification, but
some clients send raw deflate (RFC 1951) under that name; both are read,
told apart by the zlib header's check bits. ``gzip`` (and its old name
``x-gzip``) may hold several members, read one after the other as
``gzip -d`` does.

Thread-safe: no shared state.
"""

from __future__ import annotations

import zlib

from persistence.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

#: The codings read, by their names in ``Content-Encoding`` (lower case).
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
#: The most output one inflating step produces.
STEP = 1024 * 1024

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_WBITS = -zlib.MAX_WBITS


def coding_of(header: str | None) -> str | None:
    """The coding a ``Content-Encoding`` header names: ``gzip``, ``deflate``, or None (none).

    ``identity`` means none and may appear anywhere in the list; more than
    one other coding, or any other name, is refused with 415.
    """
    names = [name.strip().lower() for name in (header or "").split(",")]
    names = [name for name in names if name and name != "identity"]
    if not names:
        return None
    if len(names) == 1 and names[0] in CODINGS:
        return CODINGS[names[0]]
    raise UnsupportedMediaType(
        "Content-Encoding must be gzip, deflate or identity (one coding), "
        f"not {_quoted(header or '')}."
    )


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` inflated from ``coding``; 413 once it passes ``limit`` bytes, 400 if corrupt."""
    if coding == "gzip":
        wbits = _GZIP_WBITS
    else:
        wbits = _ZLIB_WBITS if _has_zlib_header(body) else _RAW_WBITS
    pieces: list[bytes] = []
    size = 0
    pending = body
    while True:
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof:
            try:
                piece = inflater.decompress(pending, min(STEP, limit + 1 - size))
            except zlib.error:
                raise BadRequest(
                    f"The request body is not valid {coding} data (Content-Encoding: {coding})."
                ) from None
            size += len(piece)
            if size > limit:
                raise PayloadTooLarge(
                    f"The request body inflates to more than the limit of {limit} bytes "
                    "(service.max_request_bytes). Send smaller batches."
                )
            pieces.append(piece)
            pending = inflater.unconsumed_tail
            if not pending and not piece and not inflater.eof:
                raise BadRequest(
                    f"The request body ends inside its {coding} data (Content-Encoding: "
                    f"{coding}): it was cut short."
                )
        pending = inflater.unused_data
        if not pending:
            return b"".join(pieces)
        if coding != "gzip":
            raise BadRequest(
                f"The request body holds bytes after the end of its {coding} data "
                f"(Content-Encoding: {coding})."
            )


def _has_zlib_header(data: bytes) -> bool:
    """Whether ``data`` starts like RFC 1950: method 8 (deflate), and the check bits hold."""
    return (
        len(data) >= 2
        and data[0] & 0x0F == 8
        and data[0] >> 4 <= 7
        and (data[0] << 8 | data[1]) % 31 == 0
    )


def _quoted(header: str) -> str:
    """The header as an error shows it: at most 64 characters, printable only."""
    shown = "".join(c if c.isprintable() else "?" for c in header[:64])
    return repr(shown + ("…" if len(header) > 64 else ""))
