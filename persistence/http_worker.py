"""The gunicorn worker of the service: gthread, hardened against slow and hostile clients.

``worker_class = "persistence.http_worker.PersistenceWorker"`` (gunicorn.conf.py).
It is gunicorn 27's ``ThreadWorker`` with the changes below. Each overrides
one method of ``ThreadWorker`` or of gunicorn's base ``Worker`` and relies on
gthread's internals (its poller, ``pending_conns``, ``TConn``,
``method_queue``), so ``tests/test_frontend.py`` pins the behaviour against
the real gunicorn.

- **No thread waits for a client.** gthread hands a new connection to a
  request thread, which waits up to 5 s for a first byte (its
  ``DEFAULT_WORKER_DATA_TIMEOUT``, after which the connection goes back to
  the poller) and, once any byte came, blocks in ``recv`` without limit: a
  few idle or half-sent connections hold every thread. Here
  (:meth:`~PersistenceWorker.accept`, :meth:`~PersistenceWorker.enqueue_req`)
  a connection waits in the main loop's poller, which reads what the client
  sends without blocking, until :class:`~persistence.http_connection.RequestFraming`
  finds a whole request (head and body); only then does a thread parse it,
  from memory. A connection that sends nothing more for
  ``service.request_timeout`` seconds is answered 408 and closed (silently
  if it sent nothing at all); a malformed chunked body is answered 400 at
  once. What waits in memory is bounded by ``threads`` times
  ``service.max_request_bytes``; past it, the connection that brings more is
  answered 503 with ``Retry-After``.
- **Only JSON.** gunicorn answers its own protocol errors (request line too
  long, too many or too large headers, a bad Content-Length, an unknown
  ``Expect``, ...) with an HTML page; :meth:`~PersistenceWorker.handle_error`
  answers them with the API's JSON envelope and never logs the client's bytes.
- **The connection state a response announces is true.**
  :meth:`~PersistenceWorker.load_wsgi` wraps the application: a response to
  a request whose body was not read to its end (a 413 before reading, a 404
  to a POST) says ``Connection: close`` and the connection closes, instead of
  announcing keep-alive and being dropped after gunicorn discards 64 KiB of
  the body. Errors while reading the body become the API's 400/408 answers
  (:class:`RequestBody`).
- **Shutdown.** SIGTERM, SIGINT and SIGQUIT all stop gracefully, and the
  first of them starts the service's final flush at once
  (:meth:`PersistenceService.begin_shutdown`), while the requests in flight
  finish. gunicorn closes the worker's heartbeat file before ``worker_exit``
  runs the last flush; the worker keeps beating through its own copy of the
  descriptor, so that the master (on SIGHUP or SIGTTOU) does not take the
  silence for a hung worker and kill it mid-flush.

- **HTTPS without a proxy, with the same protection.** With gunicorn's
  ``certfile`` (``service.tls_cert``), :meth:`~PersistenceWorker.accept`
  wraps each connection without a handshake and the main loop drives the
  handshake one non-blocking step at a time
  (:class:`~persistence.http_connection.TlsClientSocket`) before it reads the
  request ahead through TLS. A client that stalls in the handshake is closed
  after ``service.request_timeout`` like one that stalls in its request; one
  that sends plain HTTP is answered 400 in plain HTTP; a failed handshake is
  logged (its reason, never the client's bytes) and closed. HTTP/2 is not
  offered (ALPN says ``http/1.1``). The TLS context is built once per worker,
  with gunicorn's settings (``ssl_context`` hook, ``ciphers``, ``ca_certs``,
  ``cert_reqs``): renewed certificate files take effect with ``SIGHUP``.

The worker serves only the Flask application of :mod:`persistence`
(``wsgi:app``): it reads its settings from the application's service.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from gunicorn.http import errors as http_errors
from gunicorn.http import get_parser
from gunicorn.http.message import (
    DEFAULT_MAX_HEADERFIELD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    Request,
)
from gunicorn.sock import ssl_context
from gunicorn.workers.gthread import TConn, ThreadWorker

from persistence.errors import BadRequest, RequestTimeout, envelope
from persistence.http_connection import (
    ClientSocket,
    Handshake,
    RequestFraming,
    TlsClientSocket,
    Verdict,
)
from persistence.logs import new_request_id

if TYPE_CHECKING:
    from persistence.service import PersistenceService

# The most a non-blocking read of the main loop takes from one connection at a time.
READ_STEP = 256 * 1024

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class PersistenceWorker(ThreadWorker):
    """gunicorn's gthread worker with the changes listed in the module docstring.

    Threading contract: as gthread's. The main loop (accepting, polling,
    reading requests ahead, expiring connections) runs on the main thread
    only; :meth:`handle` and the application run on the request threads; a
    connection belongs to one of them at a time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The application's service (set when the application is loaded, in the worker).
        self.service: PersistenceService | None = None
        #: Set by gunicorn.conf.py's hooks: the master's control directory, and whether
        #: this worker started the service (and so must stop it).
        self.control_dir: Path | None = None
        self.service_started = False
        self._request_timeout = 5.0
        self._max_body = 0
        self._read_ahead_budget = 0
        self._head_limits = (MAX_REQUEST_LINE, MAX_HEADERS, DEFAULT_MAX_HEADERFIELD_SIZE)
        self._heartbeat_fd: int | None = None
        # The TLS context of every connection (None: plain HTTP), built after the fork.
        self._tls_context: ssl.SSLContext | None = None
        # The gunicorn request each request thread serves, for the WSGI wrapper.
        self._serving = threading.local()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        if cfg.is_ssl and "h2" in cfg.http_protocols:
            log.warning("HTTP/2 is not served by this worker: HTTPS clients get HTTP/1.1")

    # --- life cycle -------------------------------------------------------------------

    def init_process(self) -> None:
        # A descriptor of the heartbeat file of our own: gunicorn closes its one before
        # worker_exit, which runs the final flush (see _beat_until_exit).
        self._heartbeat_fd = os.dup(self.tmp.fileno())
        if self.cfg.is_ssl:
            self._tls_context = self._build_tls_context()
        super().init_process()

    def _build_tls_context(self) -> ssl.SSLContext:
        """gunicorn's server context (its settings and ``ssl_context`` hook), making
        :class:`TlsClientSocket` objects and offering HTTP/1.1 only."""
        context = ssl_context(self.cfg)
        context.sslsocket_class = TlsClientSocket
        context.set_alpn_protocols(["http/1.1"])
        return context

    def init_signals(self) -> None:
        super().init_signals()
        # gthread quits at once on SIGINT and SIGQUIT, raising SystemExit wherever the main
        # loop is, which loses the buffer or deadlocks. Stop gracefully on them, as on SIGTERM.
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self.handle_exit)
            signal.siginterrupt(sig, False)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.wsgi
        self.service = app.extensions["persistence"]
        settings = self.service.settings.service
        self._request_timeout = settings.request_timeout
        self._max_body = settings.max_request_bytes
        self._read_ahead_budget = self.cfg.threads * settings.max_request_bytes
        self._head_limits = _head_limits(self.cfg)
        self.wsgi = partial(self._serve, app)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Not in the signal handler: starting a thread there could deadlock.
        self.method_queue.defer(self._begin_shutdown)

    def _begin_shutdown(self) -> None:
        if self.service is not None:
            self.service.begin_shutdown()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._beat_until_exit()

    def _beat_until_exit(self) -> None:
        """Keep the heartbeat going until the process ends (through worker_exit)."""
        fd = self._heartbeat_fd
        if fd is None:
            return
        interval = max(0.1, min(1.0, self.timeout / 2))

        def beat() -> None:
            while True:
                now = time.monotonic()  # the clock gunicorn's own heartbeat uses
                try:
                    os.utime(fd, (now, now))
                except OSError:
                    return
                time.sleep(interval)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    # --- reading requests on the main loop ----------------------------------------------

    def accept(self, listener: Any) -> None:
        try:
            accepted, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        try:
            if self._tls_context is not None:
                sock: ClientSocket = TlsClientSocket.wrap(
                    self._tls_context,
                    accepted,
                    self._request_timeout,
                    self.cfg.suppress_ragged_eofs,
                )
            else:
                sock = ClientSocket.adopt(accepted, self._request_timeout)
        except OSError:  # the client is gone already
            accepted.close()
            return
        self.nr_conns += 1
        self._wait_for_request(TConn(self.cfg, sock, address, listener.getsockname()))

    def enqueue_req(self, conn: TConn) -> None:
        """Give ``conn`` to a request thread once a whole request has arrived on it."""
        sock: ClientSocket = conn.sock
        in_handshake = isinstance(sock, TlsClientSocket) and not sock.handshake_done
        if in_handshake and not self._advance_handshake(conn, sock):
            return
        if conn.parser is not None:
            # Bytes of the next request that gunicorn's parser read ahead (pipelining).
            sock.unread(conn.parser.unreader.take_buffered())
        framing = sock.framing or self._new_framing()
        sock.framing = framing
        connected = sock.receive_available(READ_STEP)
        verdict = framing.check(sock.read_ahead)
        if verdict is Verdict.READY:
            sock.framing = None
            if conn.parser is None and isinstance(sock, TlsClientSocket):
                # gthread would wrap the socket for TLS once more on the request thread;
                # the parser's presence tells it the connection is set up.
                conn.parser = get_parser(self.cfg, sock, conn.client)
            super().enqueue_req(conn)
        elif verdict is Verdict.BAD_CHUNKING:
            self._refuse(conn, HTTPStatus.BAD_REQUEST, CHUNKED_BODY_DETAIL, "malformed chunking")
        elif not connected:
            self._close(conn)
        elif self._read_ahead_bytes() + len(sock.read_ahead) > self._read_ahead_budget:
            self._refuse(
                conn,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "The service is receiving too many large requests at once. Retry later.",
                f"read-ahead memory full ({self._read_ahead_budget} bytes)",
                retry_after=1,
            )
        else:
            if framing.continue_expected:
                framing.continue_expected = False
                _send_now(sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            self._wait_for_request(conn)

    def _advance_handshake(self, conn: TConn, sock: TlsClientSocket) -> bool:
        """Take the TLS handshake of ``conn`` one step on; True once it is done (else the
        connection waits in the poller again, or is closed)."""
        try:
            step = sock.advance_handshake()
        except ssl.SSLError as exc:
            self.log.info("TLS handshake with %s failed: %s", _peer(conn), exc.reason or exc)
            self._close(conn)
            return False
        except OSError as exc:
            self.log.debug("TLS handshake with %s broke off: %s", _peer(conn), exc)
            self._close(conn)
            return False
        if step is Handshake.DONE:
            return True
        if step is Handshake.NOT_TLS:
            self.log.warning(
                "refused a request from %s: plain HTTP on the HTTPS port; answered 400",
                _peer(conn),
            )
            sock.send_unencrypted(_response(HTTPStatus.BAD_REQUEST, PLAIN_HTTP_DETAIL))
            self._close(conn)
        elif step is Handshake.CLOSED:
            self._close(conn)
        else:
            writing = step is Handshake.WANT_WRITE
            self._wait_for_request(conn, selectors.EVENT_WRITE if writing else selectors.EVENT_READ)
        return False

    def finish_request(self, conn: TConn, fs: Future[Any]) -> None:
        keep_alive = not fs.cancelled() and fs.exception() is None and fs.result() is True
        if keep_alive and conn.sock.holds_unseen_bytes():
            # The next request (pipelined) is already read, by the parser or the TLS layer:
            # the poller would not see it.
            self.enqueue_req(conn)
            return
        super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        now = time.monotonic()
        for conn in self.pending_conns:  # ordered by deadline
            if conn.timeout > now:
                break
            if conn.sock.read_ahead:
                self.log.info(
                    "closed the connection of %s: its request did not arrive in full "
                    "within %s s (service.request_timeout)",
                    _peer(conn),
                    self._request_timeout,
                )
                _answer_now(conn.sock, HTTPStatus.REQUEST_TIMEOUT, self._timeout_detail())
        super().murder_pending()

    def _wait_for_request(self, conn: TConn, events: int = selectors.EVENT_READ) -> None:
        """Park ``conn`` in the poller until it sends more (gthread's deferred connections),
        or, in a TLS handshake, until it can take what the handshake sends."""
        conn.sock.setblocking(False)
        # Appended in time order with the same delay: pending_conns stays ordered by deadline.
        conn.timeout = time.monotonic() + self._request_timeout
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, events, partial(self.on_pending_socket_readable, conn))

    def _new_framing(self) -> RequestFraming:
        line, fields, field_size = self._head_limits
        max_head = line + 2 + fields * (field_size + 2) + 2
        return RequestFraming(max_head=max_head, max_body=self._max_body)

    def _read_ahead_bytes(self) -> int:
        """Bytes held by the connections waiting in the poller."""
        return sum(len(conn.sock.read_ahead) for conn in self.pending_conns)

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def _refuse(
        self, conn: TConn, status: int, detail: str, reason: str, retry_after: int | None = None
    ) -> None:
        """Answer a request the main loop will not hand over, and close its connection."""
        self.log.warning("refused a request from %s: %s; answered %d", _peer(conn), reason, status)
        _answer_now(conn.sock, status, detail, retry_after)
        self._close(conn)

    def _timeout_detail(self) -> str:
        return (
            f"The request did not arrive in full within {self._request_timeout:g} s "
            "(service.request_timeout)."
        )

    # --- serving, on the request threads --------------------------------------------------

    def handle_request(self, req: Request, conn: TConn) -> bool:
        self._serving.request = req
        try:
            return super().handle_request(req, conn)
        finally:
            self._serving.request = None

    def _serve(
        self, app: WsgiApp, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        """Run the application with a :class:`RequestBody`; close if the body was left unread."""
        body = RequestBody(environ, self._timeout_detail())
        environ["wsgi.input"] = body
        request: Request | None = getattr(self._serving, "request", None)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not body.complete and request is not None:
                # The rest of the body is still on the connection: it cannot carry another
                # request, so the response says so (gunicorn then closes it).
                request.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer a request gunicorn could not parse (or serve) with the JSON envelope."""
        status, detail = self._describe_error(exc)
        peer = addr[0] if isinstance(addr, tuple) and addr else "unix socket"
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            self.log.exception("error handling a request from %s", peer)
        else:
            # The exception's text may quote the client's bytes (headers, body): not logged.
            self.log.warning(
                "invalid request from %s: %s; answered %d", peer, type(exc).__name__, status
            )
        _answer_now(client, status, detail)

    def _describe_error(self, exc: BaseException) -> tuple[int, str]:
        line, fields, field_size = self._head_limits
        if isinstance(exc, (http_errors.InvalidResponseHeader, http_errors.ConfigurationProblem)):
            return 500, "Internal server error; the service log has the details."
        if isinstance(exc, http_errors.LimitRequestLine):
            return 414, f"The request line is longer than {line} bytes."
        if isinstance(exc, http_errors.LimitRequestHeaders):
            return 431, (
                f"The request headers are too large: at most {fields} headers "
                f"of at most {field_size} bytes each."
            )
        if isinstance(exc, http_errors.ExpectationFailed):
            return 417, "The only expectation served is 'Expect: 100-continue'."
        if isinstance(exc, http_errors.UnsupportedTransferCoding):
            return 501, "The only transfer coding served is 'chunked'."
        if isinstance(exc, http_errors.ForbiddenProxyRequest):
            return 403, "Requests from this address are not allowed."
        if isinstance(exc, ssl.SSLError):
            return 400, "The TLS connection could not be set up."
        if isinstance(
            exc,
            (
                http_errors.InvalidChunkSize,
                http_errors.ChunkMissingTerminator,
                http_errors.InvalidChunkExtension,
            ),
        ):
            return 400, CHUNKED_BODY_DETAIL
        if isinstance(
            exc,
            (
                http_errors.InvalidHeader,
                http_errors.InvalidHeaderName,
                http_errors.ObsoleteFolding,
                http_errors.InvalidSchemeHeaders,
            ),
        ):
            return 400, (
                "A request header is malformed, or repeated where only one is allowed "
                "(such as Content-Length)."
            )
        if isinstance(exc, http_errors.ParseException):
            return 400, "The request is not valid HTTP/1.1 (request line: METHOD /path HTTP/1.1)."
        return 500, "Internal server error; the service log has the details."


CHUNKED_BODY_DETAIL = "The request body is not valid chunked transfer coding."
PLAIN_HTTP_DETAIL = "This port speaks HTTPS: send the request over TLS (https://)."


class RequestBody:
    """``wsgi.input`` that knows whether the application read the body to its end.

    gunicorn's body reader raises its own exceptions when the body is
    malformed or stops arriving; the Flask app would answer them 500 and log
    them with the bytes they quote. Here they become the API's errors: 400
    (malformed chunked coding, or the client closed the connection) and 408
    (no part of the body for ``service.request_timeout`` seconds).

    Threading contract: used by the one request thread that serves the request.
    """

    def __init__(self, environ: dict[str, Any], timeout_detail: str) -> None:
        self._stream = environ["wsgi.input"]
        self._timeout_detail = timeout_detail
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        length = environ.get("CONTENT_LENGTH") or "0"
        self._left = None if chunked else int(length)
        #: The application has read the whole body (true at once when there is none).
        self.complete = self._left == 0

    def read(self, size: int | None = -1) -> bytes:
        data = self._call(self._stream.read, size)
        # gunicorn's reader returns less than asked only at the end of the body.
        self._account(data, at_end=size is None or size < 0 or len(data) < size)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = self._call(self._stream.readline, size)
        self._account(data, at_end=not data)
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def _account(self, data: bytes, at_end: bool) -> None:
        if self._left is not None:
            self._left -= len(data)
            self.complete = self._left <= 0
        elif at_end:
            self.complete = True

    def _call(self, read: Callable[[Any], bytes], size: int | None) -> bytes:
        try:
            return read(size)
        except TimeoutError:
            raise RequestTimeout(self._timeout_detail) from None
        except http_errors.ParseException:
            raise BadRequest(CHUNKED_BODY_DETAIL) from None
        except OSError:  # gunicorn's NoMoreData, a reset connection
            raise BadRequest(
                "The request body ended before its end: the client closed the connection."
            ) from None


def _head_limits(cfg: Any) -> tuple[int, int, int]:
    """The request line, header count and header size limits gunicorn's parser applies.

    Its settings use 0 (or less) for "the parser's own maximum", which is what
    the framing must wait for at most.
    """
    line = cfg.limit_request_line
    fields = cfg.limit_request_fields
    field_size = cfg.limit_request_field_size
    return (
        line if 0 < line < MAX_REQUEST_LINE else MAX_REQUEST_LINE,
        fields if 0 < fields <= MAX_HEADERS else MAX_HEADERS,
        field_size if field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE,
    )


def _peer(conn: TConn) -> str:
    client = conn.client
    return client[0] if isinstance(client, tuple) and client else "unix socket"


def _answer_now(sock: Any, status: int, detail: str, retry_after: int | None = None) -> None:
    """Write a whole JSON error response and announce the close that follows."""
    _send_now(sock, _response(status, detail, retry_after))


def _response(status: int, detail: str, retry_after: int | None = None) -> bytes:
    """A whole JSON error response that announces the close that follows.

    No request reached the application: the answer gets a request id of its own.
    """
    extra = {"retry_after": retry_after} if retry_after else {}
    request_id = new_request_id()
    body = orjson.dumps(envelope(detail, **extra, request_id=request_id))
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Request-ID: {request_id}",
    ]
    if retry_after:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _send_now(sock: Any, data: bytes) -> None:
    """Best effort, without blocking: a client that does not read loses the answer."""
    try:
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            sock.sendall(data)
        finally:
            sock.settimeout(timeout)
    except OSError:
        pass
