"""What a database error means for the records being written.

Every exception a database driver raises inside the store is mapped, in one
place (:meth:`persistence.store.Store._run`, through the dialect's table), to
the most specific of these classes::

    StoreError
    ├── TransientError      the database is unreachable, busy or restarting: retry later
    │   ├── ConnectionLost  the connection died during a statement; also what a server
    │   │                   does to a statement larger than max_allowed_packet
    │   ├── Conflict        a deadlock or a certification conflict: the transaction
    │   │                   lost a race with another writer; retry it at once
    │   └── ServerNotReady  the server does not accept writes now (a Galera node out of
    │                       the primary component, joining or donating)
    ├── RowError            the rows written caused it: retrying them cannot help
    ├── OperatorError       the database needs an operator (grants, a missing table or
    │                       column, a full disk, a TLS certificate that does not verify):
    │                       retried, and reported on /health
    └── UnclassifiedError   nothing says which: retried like a transient error, until
                            it has failed often enough to suspect the rows

The flusher decides what to do from the class alone: retry the whole batch,
split it to isolate bad rows, or report the database as needing attention.
Independently of the class, :data:`SERVER_UNAVAILABLE` names the codes that
say the server itself cannot serve now: with several servers in
``database.host`` the store moves on to the next one
(:mod:`persistence.store.servers`).
"""

from __future__ import annotations


class StoreError(Exception):
    """A database operation failed. ``code`` is the driver's error code, if any."""

    #: The word /stats and the logs use for this class of error.
    category = "error"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def row_error(self) -> bool:
        """Whether the rows written caused the error (retrying them will fail again)."""
        return isinstance(self, RowError)


class TransientError(StoreError):
    """Connection refused or lost, a timeout, a deadlock, too many connections."""

    category = "transient"


class ConnectionLost(TransientError):
    """The connection broke during a statement.

    Usually the server restarted or a network hiccup; but a server also drops
    the connection of a client that sends a statement larger than its
    ``max_allowed_packet``, so a batch that loses its connection again and
    again while the server answers probes is suspected to hold such a row.
    """

    category = "connection_lost"


class Conflict(TransientError):
    """A deadlock or a Galera certification conflict (both error 1213), or a Group
    Replication certification conflict (3101): another writer won the race."""

    category = "conflict"


class ServerNotReady(TransientError):
    """The server answers but does not accept writes: a Galera node that lost quorum
    (error 1047), is joining, or donates its state while blocked."""

    category = "server_not_ready"


class RowError(StoreError):
    """A value refused, a constraint failed, a trigger said no, a row too large."""

    category = "row"


class OperatorError(StoreError):
    """Access denied, a missing table or column, a read-only or full database, TLS that
    cannot be set up (a certificate that does not verify, a server without TLS)."""

    category = "needs_operator"


class UnclassifiedError(StoreError):
    """An error no table names, including a driver's own exceptions (TypeError ...)."""

    category = "unclassified"


# MySQL/MariaDB server and client error codes, by class. Codes not listed are unclassified.
MYSQL_ERRORS: dict[int, type[StoreError]] = {
    **dict.fromkeys(
        (
            1040,  # too many connections
            1053,  # server shutdown in progress
            1158,  # got an error reading communication packets
            1159,  # got timeout reading communication packets
            1160,  # got an error writing communication packets
            1161,  # got timeout writing communication packets
            1180,  # got error during COMMIT
            1181,  # got error during ROLLBACK
            1203,  # user has more than max_user_connections
            1205,  # lock wait timeout
            1317,  # query execution was interrupted
            1613,  # transaction rolled back, retry
            1927,  # connection was killed (MariaDB)
            1969,  # query execution was interrupted, max_statement_time (MariaDB)
            2002,  # can't connect through socket
            2003,  # can't connect to server
            2005,  # unknown server host
            2055,  # lost connection at reading or writing
            3024,  # max_execution_time exceeded (MySQL)
            3572,  # NOWAIT: row locked (MySQL)
            4031,  # disconnected for inactivity (MariaDB)
        ),
        TransientError,
    ),
    1213: Conflict,  # deadlock (and Galera certification conflict)
    3101: Conflict,  # transaction rolled back at commit (Group Replication certification)
    1047: ServerNotReady,  # WSREP has not yet prepared node for application use (Galera)
    **dict.fromkeys(
        (
            0,  # PyMySQL's "(0, '')": the server closed the connection
            2006,  # server has gone away
            2013,  # lost connection during query
        ),
        ConnectionLost,
    ),
    **dict.fromkeys(
        (
            1048,  # column cannot be null
            1062,  # duplicate entry (unique key other than the primary key)
            1136,  # column count does not match
            1153,  # packet bigger than max_allowed_packet
            1264,  # out of range value
            1265,  # data truncated
            1292,  # incorrect datetime/timestamp value
            1366,  # incorrect string or integer value
            1406,  # data too long
            1451,  # cannot delete or update a parent row
            1452,  # foreign key constraint fails
            1644,  # SIGNAL from a trigger
            1690,  # value out of range
            3140,  # invalid JSON text (MySQL)
            3819,  # check constraint violated (MySQL)
            4025,  # CONSTRAINT failed (MariaDB)
            4038,  # syntax error in JSON text (MariaDB)
        ),
        RowError,
    ),
    **dict.fromkeys(
        (
            1017,  # can't find file
            1021,  # disk full
            1036,  # table is read only
            1044,  # access denied to database
            1045,  # access denied for user
            1049,  # unknown database
            1054,  # unknown column
            1114,  # table is full
            1142,  # command denied to user
            1143,  # column command denied to user
            1146,  # table doesn't exist
            1227,  # access denied, needs a privilege
            1290,  # server runs with --read-only (or similar option)
            1698,  # access denied (socket authentication)
            1792,  # cannot execute statement in a READ ONLY transaction
            1836,  # running in read-only mode
            # SSL connection error. PyMySQL raises it when TLS is required (database.ssl_ca)
            # and the server does not offer it; the C client also for a failed handshake.
            # Either way a server or certificate to fix, not a hiccup to retry at once.
            # (A certificate that fails verification arrives as 2003 with the ssl error
            # attached: persistence/store/tls.py tells it apart.)
            2026,
            3100,  # error on observer while running replication hook (MySQL)
        ),
        OperatorError,
    ),
}

# Codes that say the server itself cannot serve this client now (rather than the statement
# or the rows): unreachable, gone, shutting down, full of connections, not ready (Galera)
# or read-only. With several servers in database.host, the store moves to the next one.
SERVER_UNAVAILABLE = frozenset(
    (0, 1040, 1047, 1053, 1290, 1792, 1836, 2002, 2003, 2005, 2006, 2013, 2055)
)

# SQLite primary result codes (extended code & 0xFF), by class.
SQLITE_ERRORS: dict[int, type[StoreError]] = {
    5: TransientError,  # SQLITE_BUSY
    6: TransientError,  # SQLITE_LOCKED
    7: TransientError,  # SQLITE_NOMEM
    15: TransientError,  # SQLITE_PROTOCOL
    3: OperatorError,  # SQLITE_PERM
    8: OperatorError,  # SQLITE_READONLY
    10: OperatorError,  # SQLITE_IOERR
    11: OperatorError,  # SQLITE_CORRUPT
    13: OperatorError,  # SQLITE_FULL
    14: OperatorError,  # SQLITE_CANTOPEN
    23: OperatorError,  # SQLITE_AUTH
    26: OperatorError,  # SQLITE_NOTADB
    18: RowError,  # SQLITE_TOOBIG
    19: RowError,  # SQLITE_CONSTRAINT
    20: RowError,  # SQLITE_MISMATCH
}

# SQLITE_ERROR (1) is generic; its message tells a missing table or column apart.
SQLITE_OPERATOR_MESSAGES = ("no such table", "no such column", "has no column named")
