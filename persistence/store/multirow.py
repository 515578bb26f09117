"""The PyMySQL cursor of the store's connections: multi-row inserts built with less Python.

PyMySQL's ``executemany`` of an ``INSERT ... VALUES (%s, ...) ...`` sends
the rows as multi-row statements of up to ``Cursor.max_stmt_length`` bytes,
each row's values escaped by ``Connection.escape``: several Python calls per
value, and for a string a ``str.translate`` through a 128-entry list that
looks every character up, the slowest part for long non-ASCII texts. The
flusher spent about a third of a write's wall time there, holding the GIL
that its other connection's thread needs too.

:class:`MultiRowCursor` sends the very same statements (same text, same
splits): strings are escaped by one regular-expression substitution of the
seven characters PyMySQL escapes, whole integers with ``str``, and every other
value by ``Connection.escape`` itself. Whatever it does not recognise as such
an insert with positional parameters, or a connection whose server escapes
quotes without backslashes (``NO_BACKSLASH_ESCAPES``), goes to PyMySQL's own
``executemany``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pymysql.constants import SERVER_STATUS
from pymysql.cursors import RE_INSERT_VALUES, Cursor

# What pymysql.converters.escape_string replaces, and with what.
_ESCAPES = {
    "\0": "\\0",
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\x1a": "\\Z",
    '"': '\\"',
    "'": "\\'",
}
_SPECIAL = re.compile("[" + re.escape("".join(_ESCAPES)) + "]")
_POSITIONAL = re.compile(r"\(\s*%s\s*(?:,\s*%s\s*)*\)")


def _escaped(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def escape_string(value: str) -> str:
    """``value`` escaped for a quoted MySQL string literal, as PyMySQL escapes it."""
    return _SPECIAL.sub(_escaped, value)


def multi_row_statements(
    conn: Any, query: str, rows: Sequence[Sequence[Any]], max_length: int
) -> list[bytes] | None:
    """The statements PyMySQL's ``executemany(query, rows)`` sends on ``conn``, or None
    when ``query`` is not an insert with positional parameters that this builds."""
    match = RE_INSERT_VALUES.match(query)
    template = match.group(2).rstrip() if match else ""
    if match is None or not _POSITIONAL.fullmatch(template):
        return None
    if conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
        return None
    encoding = conn.encoding
    prefix = (match.group(1) % ()).encode(encoding)
    postfix = ((match.group(3) or "") % ()).encode(encoding)
    width = template.count("%s")
    escape, sub = conn.escape, _SPECIAL.sub
    statements: list[bytes] = []
    sql = bytearray(prefix)
    for row in rows:
        if len(row) != width:
            return None  # PyMySQL raises its own error for this
        values = tuple(
            [
                "NULL"
                if value is None
                else "'" + sub(_escaped, value) + "'"
                if type(value) is str
                else str(value)
                if type(value) is int
                else escape(value)
                for value in row
            ]
        )
        encoded = (template % values).encode(encoding)
        if len(sql) > len(prefix):
            if len(sql) + len(encoded) + len(postfix) + 1 > max_length:
                statements.append(bytes(sql + postfix))
                sql = bytearray(prefix)
            else:
                sql += b","
        sql += encoded
    statements.append(bytes(sql + postfix))
    return statements


class MultiRowCursor(Cursor):
    """A PyMySQL cursor whose ``executemany`` of an insert builds its statements with
    :func:`multi_row_statements` (see the module docstring)."""

    def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> int | None:
        if not args or isinstance(args[0], dict):
            return super().executemany(query, args)
        statements = multi_row_statements(self._get_db(), query, args, self.max_stmt_length)
        if statements is None:
            return super().executemany(query, args)
        rows = 0
        for statement in statements:
            rows += self.execute(statement)
        self.rowcount = rows
        return rows
