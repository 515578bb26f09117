"""Client connections of the HTTP worker: a request is read whole before a thread takes it.

gunicorn's parser reads a request with blocking ``recv`` calls on a request
thread, so a client that sends half a request holds that thread for as long
as it likes. :class:`~persistence.http_worker.PersistenceWorker` instead reads
what each client sends on its main loop, with non-blocking calls, into the
connection's :class:`ClientSocket`, and asks :class:`RequestFraming` after
each read whether one whole request (head and body) has arrived. Only then
does a request thread parse it, and its ``recv`` calls are served from the
bytes already read.

Over HTTPS (``service.tls_cert``) the same holds for :class:`TlsClientSocket`:
the main loop also drives the TLS handshake, one non-blocking step per
event, and reads ahead through the TLS layer; a client stalled in the
middle of its handshake waits in the poller like one stalled in its request.

:class:`RequestFraming` only finds where a request ends. It does not
validate: a request whose head it cannot frame (malformed, two
Content-Length headers, an unknown transfer coding) is handed over at once,
and gunicorn's parser answers it with the right error; a malformed chunked
body, which gunicorn would wait on, is answered 400 by the worker.
"""

from __future__ import annotations

import contextlib
import enum
import re
import socket
import ssl

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
# A line ending without CR, which gunicorn refuses: no use waiting for more.
_BARE_LF = re.compile(rb"(?<!\r)\n")
# The longest chunk-size line and trailer section gunicorn accepts.
_MAX_CHUNK_LINE = 8190
_MAX_TRAILERS = 8190 * 32
_CHUNK_SIZE_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# The most one recv() hands over of what was read ahead: what Werkzeug reads at a time.
READ_AHEAD_PIECE = 64 * 1024


class ClientSocket(socket.socket):
    """An accepted client connection that holds bytes read ahead of gunicorn's parser.

    - :meth:`receive_available` (the worker's main loop) appends what has
      arrived to :attr:`read_ahead` without blocking;
    - :meth:`recv` (gunicorn's parser, on a request thread) returns those
      bytes first, then reads the socket;
    - "blocking" mode, which gunicorn selects before it parses a request,
      means "blocking at most :attr:`read_timeout` seconds per read", so a
      thread never waits on a client without limit.

    Threading contract: the main loop and a request thread never use the same
    connection at once. The main loop touches :attr:`read_ahead` only while
    the connection waits in its poller; a request thread only while it serves
    it. The thread pool's queue and gunicorn's completion queue hand it over.
    """

    read_timeout: float
    read_ahead: bytearray
    framing: RequestFraming | None

    @classmethod
    def adopt(cls, accepted: socket.socket, read_timeout: float) -> ClientSocket:
        """Take over the descriptor of a socket returned by ``accept()``."""
        sock = cls(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        sock.init_read_ahead(read_timeout)
        return sock

    def init_read_ahead(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.read_ahead = bytearray()
        self.framing = None

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(self.read_timeout)
        else:
            super().setblocking(False)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.read_ahead and not flags:
            # At most a piece at a time: gunicorn's body reader asks for the whole rest
            # of the body and keeps what its caller did not take, copying that rest
            # again for each 64 KiB Werkzeug reads (quadratic in the body's size).
            bufsize = min(bufsize, READ_AHEAD_PIECE)
            data = bytes(self.read_ahead[:bufsize])
            del self.read_ahead[:bufsize]
            return data
        return super().recv(bufsize, flags)

    def receive_available(self, max_bytes: int) -> bool:
        """Append up to ``max_bytes`` the kernel already holds; False once the peer is gone."""
        super().setblocking(False)
        try:
            data = super().recv(max_bytes)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # reset by the peer
        self.read_ahead += data
        return bool(data)

    def holds_unseen_bytes(self) -> bool:
        """Whether bytes of the client wait where the poller cannot see them."""
        return bool(self.read_ahead)

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of :attr:`read_ahead` (what the parser read ahead)."""
        self.read_ahead[:0] = data


class Handshake(enum.Enum):
    """Where :meth:`TlsClientSocket.advance_handshake` left the TLS handshake."""

    DONE = "done"
    #: Wait until the socket is readable (or writable) and call again.
    WANT_READ = "want read"
    WANT_WRITE = "want write"
    #: The client speaks something else than TLS, such as plain HTTP.
    NOT_TLS = "not TLS"
    #: The client closed the connection before its first byte.
    CLOSED = "closed"


# The first byte of a TLS handshake record (RFC 8446 5.1).
_TLS_HANDSHAKE_RECORD = 0x16


class TlsClientSocket(ClientSocket, ssl.SSLSocket):
    """A :class:`ClientSocket` over TLS, its handshake driven by the worker's main loop.

    Made by an :class:`ssl.SSLContext` whose ``sslsocket_class`` is this class
    (:meth:`wrap`), without a handshake at connect. :meth:`advance_handshake`
    takes one non-blocking step; once it is done, :meth:`receive_available`
    reads ahead through the TLS layer, including what the TLS object has
    already decrypted (``pending()``), which the poller cannot see.
    """

    handshake_done: bool
    _first_byte_checked: bool

    @classmethod
    def wrap(
        cls,
        context: ssl.SSLContext,
        accepted: socket.socket,
        read_timeout: float,
        suppress_ragged_eofs: bool,
    ) -> TlsClientSocket:
        """Wrap a socket returned by ``accept()``; ``context.sslsocket_class`` is ``cls``."""
        sock = context.wrap_socket(
            accepted,
            server_side=True,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
        )
        if not isinstance(sock, cls):
            raise TypeError(f"the context makes {type(sock).__name__}, not {cls.__name__}")
        sock.init_read_ahead(read_timeout)
        sock.handshake_done = False
        sock._first_byte_checked = False
        return sock

    def advance_handshake(self) -> Handshake:
        """Take the handshake as far as the bytes that arrived allow, without blocking.

        Before it starts, the first byte is looked at without taking it: a
        client that is not starting a TLS handshake (plain HTTP on the HTTPS
        port) is told apart from a failed handshake. Raises :class:`OSError`
        (:class:`ssl.SSLError` among them) when the handshake fails.
        """
        socket.socket.setblocking(self, False)
        if not self._first_byte_checked:
            try:
                first = socket.socket.recv(self, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return Handshake.WANT_READ
            if not first:
                return Handshake.CLOSED
            if first[0] != _TLS_HANDSHAKE_RECORD:
                return Handshake.NOT_TLS
            self._first_byte_checked = True
        try:
            self.do_handshake()
        except ssl.SSLWantReadError:
            return Handshake.WANT_READ
        except ssl.SSLWantWriteError:
            return Handshake.WANT_WRITE
        self.handshake_done = True
        return Handshake.DONE

    def receive_available(self, max_bytes: int) -> bool:
        """Append what can be decrypted now, up to ``max_bytes`` and at least all that the TLS
        object holds already; False once the peer is gone."""
        socket.socket.setblocking(self, False)
        received = 0
        try:
            while (want := max(max_bytes - received, self.pending())) > 0:
                data = ssl.SSLSocket.recv(self, want)
                if not data:
                    return False  # closed (close_notify, or an EOF taken as one)
                self.read_ahead += data
                received += len(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
            return True
        except OSError:
            return False  # reset, or a TLS error: the connection cannot go on
        return True

    def holds_unseen_bytes(self) -> bool:
        return bool(self.read_ahead) or self.pending() > 0

    def send_unencrypted(self, data: bytes) -> None:
        """Best effort, without blocking: for a client that does not speak TLS."""
        with contextlib.suppress(OSError):
            socket.socket.send(self, data)


class Verdict(enum.Enum):
    """What :meth:`RequestFraming.check` found in the bytes received so far."""

    #: More bytes are needed.
    WAIT = "wait"
    #: A whole request, or one its reader refuses on what is there (gunicorn with
    #: 400/414/417/431/501, the application with 413): hand it to a request thread.
    READY = "ready"
    #: The chunked body is malformed; gunicorn's parser would wait for a line end that
    #: may never come, so the worker answers 400 itself.
    BAD_CHUNKING = "bad chunking"


class RequestFraming:
    """Finds where one HTTP/1.x request ends in the bytes received so far.

    :meth:`check` is called again with the same, longer buffer after each
    read; it resumes where it stopped. One instance frames one request.

    ``max_head`` bounds the request line and headers, ``max_body`` the body:
    past either, the request is handed over as it is and refused by whoever
    reads it (gunicorn with 414/431, the application with 413).
    """

    def __init__(self, max_head: int, max_body: int) -> None:
        self.max_head = max_head
        self.max_body = max_body
        #: The client waits for ``100 Continue`` before it sends the body.
        self.continue_expected = False
        self._searched = 0  # where the search for the end of the head resumes
        self._body_start: int | None = None
        self._length: int | None = None  # Content-Length, or None for a chunked body
        self._chunk_at = 0  # chunked: where the next chunk-size line (or the trailers) starts
        self._chunked_bytes = 0
        self._in_trailers = False

    def check(self, data: bytes | bytearray) -> Verdict:
        """Whether ``data`` (all bytes received on the connection so far) is a request."""
        if self._body_start is None:
            searched = self._searched
            if not self._find_head(data):
                too_long = len(data) > self.max_head
                bare_lf = _BARE_LF.search(data, max(0, searched - 1)) is not None
                return Verdict.READY if too_long or bare_lf else Verdict.WAIT
            if self._body_start is None:
                return Verdict.READY  # the head cannot be framed: gunicorn refuses it
        if self._length is not None:
            whole = len(data) - self._body_start >= self._length
            verdict = Verdict.READY if whole else Verdict.WAIT
        else:
            verdict = self._check_chunks(data)
        if verdict is not Verdict.WAIT:
            self.continue_expected = False
        return verdict

    def _find_head(self, data: bytes | bytearray) -> bool:
        end = data.find(_HEAD_END, max(0, self._searched - 3))
        if end < 0:
            self._searched = len(data)
            return False
        if _BARE_LF.search(data, 0, end):
            return True  # malformed: handed over as it is
        lines = bytes(data[:end]).split(_CRLF)
        if lines and not lines[0]:
            lines = lines[1:]
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return True  # malformed: handed over as it is
            fields.setdefault(name.strip().lower(), []).append(value.strip())
        self._frame_body(end + len(_HEAD_END), lines[0] if lines else b"", fields)
        return True

    def _frame_body(
        self, start: int, request_line: bytes, fields: dict[bytes, list[bytes]]
    ) -> None:
        """Note where the body starts and how it ends; leave it unset to hand over at once."""
        lengths = fields.get(b"content-length", [])
        codings = b",".join(fields.get(b"transfer-encoding", [])).lower().split(b",")
        expect = b",".join(fields.get(b"expect", [])).lower()
        if codings != [b""]:
            # Framed by chunked when it is the last coding; gunicorn refuses other lists.
            if lengths or codings[-1].strip(b" \t") != b"chunked":
                return
            length = None
        elif not lengths:
            length = 0
        elif len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) <= self.max_body:
            length = int(lengths[0])
        else:
            return  # repeated, malformed or too large: refused without waiting for the body
        if expect and expect != b"100-continue":
            return  # gunicorn answers 417
        self._body_start, self._length = start, length
        self._chunk_at = start
        # RFC 9110 10.1.1: an HTTP/1.0 client's expectation is ignored.
        self.continue_expected = bool(expect) and request_line.endswith(b"HTTP/1.1")

    def _check_chunks(self, data: bytes | bytearray) -> Verdict:
        while not self._in_trailers:
            line_end = data.find(_CRLF, self._chunk_at, self._chunk_at + _MAX_CHUNK_LINE + 2)
            stop = line_end if line_end >= 0 else min(len(data), self._chunk_at + _MAX_CHUNK_LINE)
            line = bytes(data[self._chunk_at : stop])
            if line_end < 0:
                line = line.removesuffix(b"\r")  # the line end may be arriving
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not set(size_text) <= _CHUNK_SIZE_DIGITS:
                return Verdict.BAD_CHUNKING  # not a chunk size, however the line goes on
            if line_end < 0:
                too_long = len(data) - self._chunk_at > _MAX_CHUNK_LINE
                return Verdict.BAD_CHUNKING if too_long else Verdict.WAIT
            if not size_text:
                return Verdict.BAD_CHUNKING
            size = int(size_text, 16)
            if size == 0:
                self._chunk_at = line_end + len(_CRLF)
                self._in_trailers = True
                break
            chunk_start = line_end + len(_CRLF)
            if self._chunked_bytes + min(size, len(data) - chunk_start) > self.max_body:
                return Verdict.READY  # the application refuses it (413) from what is there
            chunk_end = chunk_start + size
            if len(data) < chunk_end + len(_CRLF):
                return Verdict.WAIT
            if data[chunk_end : chunk_end + len(_CRLF)] != _CRLF:
                return Verdict.BAD_CHUNKING
            self._chunked_bytes += size
            self._chunk_at = chunk_end + len(_CRLF)
        if data[self._chunk_at : self._chunk_at + len(_CRLF)] == _CRLF:
            return Verdict.READY  # no trailers
        if data.find(_HEAD_END, self._chunk_at) >= 0:
            return Verdict.READY
        too_long = len(data) - self._chunk_at > _MAX_TRAILERS
        return Verdict.BAD_CHUNKING if too_long else Verdict.WAIT
