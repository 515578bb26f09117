"""The HTTP front end under gunicorn: stalled and hostile clients, JSON-only answers, stops,
HTTPS on the listener.

Black-box tests against the real service (persistence.http_worker under
gunicorn, real MariaDB), with raw sockets where a well-behaved HTTP client
could not send the request, and certificates made with openssl for HTTPS;
and unit tests of the request framing and the client sockets the worker
relies on.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from persistence.config import ConfigError
from persistence.http_connection import (
    ClientSocket,
    Handshake,
    RequestFraming,
    TlsClientSocket,
    Verdict,
)
from tests.certs import CertSet, KeyPair, make_self_signed, make_test_certs
from tests.conftest import Database, MysqlServer, make_settings
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import (
    API,
    Server,
    free_port,
    gunicorn_command,
    service_env,
    wait_for,
    wait_until_answering,
)

TASKS = f"{API}/tasks/batch"
SESSIONS = f"{API}/sessions/batch"


# --- raw HTTP ------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(server: Server) -> socket.socket:
    """A TCP connection to the server (over which nothing is sent yet, not even TLS)."""
    host, port = server.url.split("://", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket) -> RawResponse:
    """One response with a Content-Length body (all the service sends), interim 1xx skipped."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a response: {buffer!r}")
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200:
            break
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return RawResponse(status, headers, buffer[:length])


def exchange(server: Server, data: bytes) -> RawResponse:
    with closing(connect(server)) as sock:
        sock.sendall(data)
        return read_response(sock)


def closed_by_server(sock: socket.socket, timeout: float = 5.0, skip_data: bool = False) -> bool:
    """The server closed the connection (EOF or reset) within ``timeout`` seconds; with
    ``skip_data``, after whatever it sent (the start of a TLS handshake)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if not data:
            return True
        if not skip_data:
            return False
    return False


def request_bytes(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def tasks_body(count: int, sid: str | None = None) -> tuple[bytes, list[str]]:
    records = [task(sid or new_session_id()) for _ in range(count)]
    return json.dumps({"tasks": records}).encode(), [r["task_id"] for r in records]


# --- HTTPS on the listener ------------------------------------------------------------------


@dataclass
class HttpsServer(Server):
    """The service with HTTPS on its listener; its HTTP requests verify the certificate
    against ``ca`` and send ``client_cert`` (certificate, key) when given."""

    ca: str = ""
    client_cert: tuple[str, str] | None = None

    def post(self, path: str, body: Any = None) -> requests.Response:
        return requests.post(
            self.url + path, json=body, timeout=5, verify=self.ca, cert=self.client_cert
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=5, verify=self.ca, cert=self.client_cert)

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return context

    def tls_wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """``sock`` after a whole TLS handshake with the server."""
        return self.tls_context().wrap_socket(sock, server_hostname="127.0.0.1")


def send_client_hello(sock: socket.socket, server: HttpsServer) -> None:
    """Send the first flight of a TLS handshake, and never the next one."""
    client = server.tls_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1"
    )
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    sock.sendall(outgoing.read())


@pytest.fixture(scope="module")
def listener_certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_test_certs(tmp_path_factory.mktemp("listener-certs"))


@pytest.fixture
def start_https_server(tmp_path: Path) -> Iterator[Callable[..., HttpsServer]]:
    """Start gunicorn with HTTPS on its listener (``pair``), wait until it answers."""
    servers: list[HttpsServer] = []

    def start(
        pair: KeyPair,
        ca: Path | None = None,
        client_cert: KeyPair | None = None,
        **env: str,
    ) -> HttpsServer:
        port = free_port()
        log = tmp_path / f"gunicorn-{port}.log"
        env = {"SERVICE_TLS_CERT": str(pair.cert), "SERVICE_TLS_KEY": str(pair.key), **env}
        with log.open("w") as out:
            process = subprocess.Popen(
                gunicorn_command("-b", f"127.0.0.1:{port}"),
                cwd=tmp_path,
                env=service_env(tmp_path, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        cert = (str(client_cert.cert), str(client_cert.key)) if client_cert else None
        # A self-signed certificate is its own CA.
        trusted = str(ca or pair.cert)
        server = HttpsServer(process, f"https://127.0.0.1:{port}", log, trusted, cert)
        servers.append(server)
        return wait_until_answering(server)

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


# --- A: shutdown ---------------------------------------------------------------------------


def buffer_tasks(server: Server, sid: str, batches: int, size: int = 1000) -> list[str]:
    ids: list[str] = []
    for _ in range(batches):
        records = [task(sid) for _ in range(size)]
        response = requests.post(f"{server.url}{TASKS}", json={"tasks": records}, timeout=30)
        assert response.status_code == 200, response.text
        ids += [r["task_id"] for r in records]
    return ids


def half_sent_request(server: Server) -> socket.socket:
    sock = connect(server)
    sock.sendall(b"POST /api/v1/persistence/tasks/batch HTTP/1.1\r\nHost: test\r\nContent-Ty")
    return sock


def landed_tasks(db: Database) -> set[str]:
    return {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}


@pytest.mark.e2e
@pytest.mark.mysql
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT], ids=["SIGTERM", "SIGQUIT"])
def test_a_stalled_client_at_a_stop_costs_no_record_and_no_time(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database, sig: int
) -> None:
    graceful_timeout = 30
    server = start_server(
        BUFFER_FLUSH_INTERVAL="3600",
        BUFFER_MAX_SIZE="100000",
        BUFFER_HARD_LIMIT="200000",
        SERVICE_GRACEFUL_TIMEOUT=str(graceful_timeout),
        SERVICE_REQUEST_TIMEOUT="2",
        **mysql_env,
    )
    sid = new_session_id()
    assert server.post(SESSIONS, {"sessions": [session(session_id=sid)]}).ok
    ids = buffer_tasks(server, sid, batches=10)
    assert mysql_db.count("translation_tasks") == 0  # all 10,000 still buffered
    with closing(half_sent_request(server)) as stalled:
        started = time.monotonic()
        assert server.stop(sig, timeout=graceful_timeout + 10) == 0
        took = time.monotonic() - started

        assert landed_tasks(mysql_db) == set(ids)
        assert mysql_db.count("translation_sessions") == 1
        output = server.output()
        # The flush begun at the signal wrote everything; the last one found nothing left.
        assert "flush wrote 1 sessions, 10000 tasks" in output
        assert "shutdown flush wrote 0 sessions and 0 tasks" in output
        assert "LOST" not in output
        assert "SIGKILL" not in output
        # The stalled client held the stop for service.request_timeout, not graceful_timeout.
        assert took < graceful_timeout / 2, output
        response = read_response(stalled)
        assert response.status == 408
        assert "service.request_timeout" in response.json()["detail"]


@contextmanager
def row_locked(server: MysqlServer, database: str, session_id: str) -> Iterator[None]:
    """Hold a lock on one session row: a flush that writes it waits until the block ends."""
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(
                "SELECT session_id FROM translation_sessions WHERE session_id = %s FOR UPDATE",
                (session_id,),
            )
            assert cur.fetchall()
        yield
    finally:
        conn.rollback()
        conn.close()


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
@pytest.mark.mysql
def test_sighup_does_not_kill_a_worker_whose_final_flush_outlasts_the_timeouts(
    start_server: Any,
    mysql_env: dict[str, str],
    mysql_db: Database,
    mysql_server: MysqlServer,
) -> None:
    # The master reaps an old worker after graceful_timeout (2 s), then kills it once its
    # heartbeat is older than --timeout (5 s). Its final flush here waits 10 s on a row lock.
    server = start_server(
        "--timeout",
        "5",
        BUFFER_FLUSH_INTERVAL="3600",
        BUFFER_MAX_SIZE="100000",
        BUFFER_HARD_LIMIT="200000",
        SERVICE_GRACEFUL_TIMEOUT="2",
        SERVICE_REQUEST_TIMEOUT="1",
        **mysql_env,
    )
    sid = new_session_id()
    assert server.post(SESSIONS, {"sessions": [session(session_id=sid)]}).ok
    assert server.post(f"{API}/flush").json()["sessions_written"] == 1
    assert server.post(SESSIONS, {"sessions": [session(session_id=sid, status="completed")]}).ok
    ids = buffer_tasks(server, sid, batches=2)
    old_worker = server.get(f"{API}/stats").json()["workers"]["pids"][0]

    with row_locked(mysql_server, mysql_env["DB_DATABASE"], sid):
        server.process.send_signal(signal.SIGHUP)
        time.sleep(10)
        assert is_running(old_worker), server.output()
    assert wait_for(lambda: not is_running(old_worker), timeout=20), server.output()

    assert landed_tasks(mysql_db) == set(ids)
    assert mysql_db.query("SELECT status FROM translation_sessions")[0][0] == "completed"
    output = server.output()
    assert "WORKER TIMEOUT" not in output
    assert "LOST" not in output
    assert server.get("/health").status_code == 200  # the new worker serves


# --- B: stalled clients ----------------------------------------------------------------------


# How a client stalls: over plain HTTP, before sending anything, in the middle of the head
# or of the body; over HTTPS also in the middle of its first TLS record, and after sending
# its ClientHello (the server has answered and waits for the client's next flight).
HTTP_STALLS = ("idle", "half head", "half body")
HTTPS_STALLS = ("idle", "half ClientHello", "mid handshake", "half head", "half body")


def stalled_client(server: Server, kind: str) -> socket.socket:
    partial_body = request_bytes(
        "POST", TASKS, b'{"tasks": [', Content_Type="application/json", Content_Length="1000"
    )
    sock = connect(server)
    if kind == "half ClientHello":
        # A handshake record that announces 512 bytes and brings 6 of them.
        sock.sendall(bytes.fromhex("16030102000100 01fc0303".replace(" ", "")))
    elif kind == "mid handshake":
        send_client_hello(sock, server)
    elif kind in ("half head", "half body"):
        if isinstance(server, HttpsServer):
            sock = server.tls_wrap(sock)
        if kind == "half head":
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nAccept: appl")
        else:
            sock.sendall(partial_body)
    return sock


@pytest.mark.e2e
@pytest.mark.mysql
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_hundred_stalled_clients_do_not_keep_others_out(
    start_server: Any,
    start_https_server: Callable[..., HttpsServer],
    listener_certs: CertSet,
    mysql_env: dict[str, str],
    mysql_db: Database,
    scheme: str,
) -> None:
    if scheme == "https":
        server: Server = start_https_server(
            listener_certs.server,
            ca=listener_certs.ca.cert,
            SERVICE_REQUEST_TIMEOUT="2",
            **mysql_env,
        )
        kinds = HTTPS_STALLS
    else:
        server = start_server(SERVICE_REQUEST_TIMEOUT="2", **mysql_env)
        kinds = HTTP_STALLS
    stalled: dict[str, list[socket.socket]] = {kind: [] for kind in kinds}
    for n in range(100):
        kind = kinds[n % len(kinds)]
        stalled[kind].append(stalled_client(server, kind))

    for _ in range(5):
        started = time.monotonic()
        response = server.get("/health")
        assert response.status_code == 200
        assert time.monotonic() - started < 1.0  # the product's promise for /health
    sid = new_session_id()
    assert server.post(SESSIONS, {"sessions": [session(session_id=sid)]}).ok
    records = [task(sid) for _ in range(50)]
    response = server.post(TASKS, {"tasks": records})
    assert response.status_code == 200, response.text
    assert server.post(f"{API}/flush").json()["tasks_written"] == 50
    assert landed_tasks(mysql_db) == {r["task_id"] for r in records}

    # Within a few seconds, each half-sent request is answered 408 and closed; a connection
    # that sent nothing, or stopped in its TLS handshake, is closed without a word.
    for sock in stalled["half head"] + stalled["half body"]:
        sock.settimeout(10)
        response = read_response(sock)
        assert response.status == 408
        assert response.headers["content-type"] == "application/json"
        assert response.headers["connection"] == "close"
        assert closed_by_server(sock)
    for kind in set(kinds) - {"half head", "half body"}:
        for sock in stalled[kind]:
            assert closed_by_server(sock, timeout=10, skip_data=True), kind
    for socks in stalled.values():
        for sock in socks:
            sock.close()
    assert "Traceback" not in server.output(), server.output()


@pytest.mark.e2e
def test_pipelined_and_trickled_requests_are_all_answered(start_server: Any) -> None:
    server = start_server()
    with closing(connect(server)) as sock:
        # Two whole requests and the start of a third in one packet, then the rest.
        sock.sendall(
            request_bytes("GET", "/health")
            + request_bytes("GET", "/")
            + request_bytes("GET", f"{API}/stats")[:20]
        )
        assert read_response(sock).json()["status"] == "healthy"
        assert read_response(sock).json()["service"] == "Persistence Service"
        time.sleep(0.3)
        sock.sendall(request_bytes("GET", f"{API}/stats")[20:])
        assert "buffer" in read_response(sock).json()
        # A body that arrives in pieces, the last one after a pause.
        body, _ = tasks_body(3)
        head = request_bytes(
            "POST", TASKS, Content_Type="application/json", Content_Length=str(len(body))
        )
        sock.sendall(head + body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        response = read_response(sock)
        assert (response.status, response.json()["count"]) == (200, 3)


@pytest.mark.e2e
def test_expect_100_continue_gets_continue_then_the_answer(start_server: Any) -> None:
    server = start_server()
    body, _ = tasks_body(2)
    with closing(connect(server)) as sock:
        sock.sendall(
            request_bytes(
                "POST",
                TASKS,
                Content_Type="application/json",
                Content_Length=str(len(body)),
                Expect="100-continue",
            )
        )
        assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        response = read_response(sock)
        assert (response.status, response.json()["count"]) == (200, 2)


# --- C: malformed chunked bodies -------------------------------------------------------------


@pytest.mark.e2e
def test_a_malformed_chunked_body_is_a_400_and_never_logged(start_server: Any) -> None:
    server = start_server()
    secret = "The dragon sleeps under the old mill"
    unframed = json.dumps({"tasks": [task(new_session_id(), source_text=secret)]}).encode()
    response = exchange(
        server,
        request_bytes(
            "POST", TASKS, unframed, Content_Type="application/json", Transfer_Encoding="chunked"
        ),
    )
    assert response.status == 400
    assert response.headers["content-type"] == "application/json"
    assert "chunked" in response.json()["detail"]
    assert response.headers["connection"] == "close"
    # A well-framed chunked body is accepted.
    body, _ = tasks_body(2)
    framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    response = exchange(
        server,
        request_bytes(
            "POST", TASKS, framed, Content_Type="application/json", Transfer_Encoding="chunked"
        ),
    )
    assert (response.status, response.json()["count"]) == (200, 2)
    output = server.output()
    assert "dragon" not in output
    assert "Traceback" not in output


# --- D: the connection state an answer announces --------------------------------------------


@pytest.mark.e2e
def test_a_refusal_with_its_body_unread_closes_and_says_so(start_server: Any) -> None:
    limit = 16 * 1024
    server = start_server(SERVICE_MAX_REQUEST_BYTES=str(limit))
    big, _ = tasks_body(1)
    big = big[:-2] + b" " * (100 * 1024) + big[-2:]  # 100 KiB of valid JSON
    with closing(connect(server)) as sock:
        sock.sendall(
            request_bytes(
                "POST", TASKS, big, Content_Type="application/json", Content_Length=str(len(big))
            )
        )
        response = read_response(sock)
        assert response.status == 413
        assert response.headers["connection"] == "close"
        assert closed_by_server(sock)
    # A pooled client's next request works.
    with requests.Session() as client:
        refused = client.post(
            f"{server.url}{TASKS}", data=big, headers={"Content-Type": "application/json"}
        )
        assert refused.status_code == 413
        assert client.get(f"{server.url}/health", timeout=5).status_code == 200
    # A 404 to a POST whose body nobody reads closes too; an answer that read its body keeps
    # the connection, and the next request on it is served.
    with closing(connect(server)) as sock:
        sock.sendall(request_bytes("POST", "/nowhere", b"x" * 100, Content_Length="100"))
        response = read_response(sock)
        assert (response.status, response.headers["connection"]) == (404, "close")
        assert closed_by_server(sock)
    small, _ = tasks_body(1)
    with closing(connect(server)) as sock:
        sock.sendall(
            request_bytes(
                "POST",
                TASKS,
                small,
                Content_Type="application/json",
                Content_Length=str(len(small)),
            )
        )
        response = read_response(sock)
        assert (response.status, response.headers["connection"]) == (200, "keep-alive")
        sock.sendall(request_bytes("GET", "/health"))
        assert read_response(sock).status == 200


# --- E: gunicorn's own errors in JSON ----------------------------------------------------------


PROTOCOL_ERRORS = {
    "URI over 4094 bytes": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    "header over 8190 bytes": (request_bytes("GET", "/health", X_Big="a" * 9000), 431),
    "over 100 headers": (
        b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
        431,
    ),
    "bad Content-Length": (request_bytes("POST", TASKS, Content_Length="ten"), 400),
    "doubled Content-Length": (
        b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    "Expect: 200-ok": (request_bytes("GET", "/health", Expect="200-ok"), 417),
    "garbage request line": (b"HELLO THERE\r\n\r\n", 400),
    "bare LF": (b"GET /health HTTP/1.1\nHost: t\n\n", 400),
    "unknown transfer coding": (
        request_bytes("POST", TASKS, Transfer_Encoding="br", Content_Type="application/json"),
        501,
    ),
}


@pytest.mark.e2e
def test_protocol_errors_answer_json_never_html(start_server: Any) -> None:
    server = start_server()
    for name, (data, status) in PROTOCOL_ERRORS.items():
        response = exchange(server, data)
        assert response.status == status, name
        assert response.headers["content-type"] == "application/json", name
        assert response.headers["connection"] == "close", name
        assert response.json()["detail"].endswith("."), name
    for path, status in (("/api//v1/persistence/stats", 404), ("//health", 200)):
        response = exchange(server, request_bytes("GET", path))
        assert (response.status, response.headers["content-type"]) == (status, "application/json")
        assert "location" not in response.headers
    assert "Traceback" not in server.output(), server.output()


# --- F: HTTPS on the listener ---------------------------------------------------------------


@pytest.mark.e2e
def test_https_with_a_self_signed_certificate_serves_and_refuses_plain_http_cleanly(
    start_https_server: Callable[..., HttpsServer], tmp_path: Path
) -> None:
    pair = make_self_signed(tmp_path, "listener", "IP:127.0.0.1,DNS:localhost")
    server = start_https_server(pair)
    with requests.Session() as client:  # one kept-alive connection for all of them
        # verify= on each call: a session's own is overridden by REQUESTS_CA_BUNDLE.
        health = client.get(f"{server.url}/health", timeout=5, verify=server.ca)
        assert health.json()["status"] == "healthy"
        body, _ = tasks_body(200)
        response = client.post(
            f"{server.url}{TASKS}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=5,
            verify=server.ca,
        )
        assert (response.status_code, response.json()["count"]) == (200, 200)
        root = client.get(f"{server.url}/", timeout=5, verify=server.ca)
        assert root.json()["service"] == "Persistence Service"
    # A client that does not trust the certificate refuses the server.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/health", timeout=5)
    # Plain HTTP to the HTTPS port: a plain-HTTP JSON answer saying so, then the close.
    plain = requests.get(server.url.replace("https://", "http://") + "/health", timeout=5)
    assert plain.status_code == 400
    assert plain.headers["content-type"] == "application/json"
    assert plain.json() == {
        "detail": "This port speaks HTTPS: send the request over TLS (https://).",
        "request_id": plain.headers["X-Request-ID"],
    }
    with closing(connect(server)) as sock:
        sock.sendall(request_bytes("GET", "/health"))
        assert read_response(sock).status == 400
        assert closed_by_server(sock)
    # Pipelined requests over TLS: the ones read ahead with the first are all answered.
    with closing(server.tls_wrap(connect(server))) as sock:
        sock.sendall(
            request_bytes("GET", "/health")
            + request_bytes("GET", "/")
            + request_bytes("GET", f"{API}/stats")
        )
        assert read_response(sock).json()["status"] == "healthy"
        assert read_response(sock).json()["service"] == "Persistence Service"
        assert "buffer" in read_response(sock).json()
    output = server.output()
    assert "Listening at: https://127.0.0.1:" in output
    assert "plain HTTP on the HTTPS port; answered 400" in output
    assert "Traceback" not in output


@pytest.mark.e2e
def test_https_can_require_client_certificates(
    start_https_server: Callable[..., HttpsServer], listener_certs: CertSet
) -> None:
    ca = listener_certs.ca.cert
    server = start_https_server(
        listener_certs.server,
        ca=ca,
        client_cert=listener_certs.client,
        SERVICE_TLS_CLIENT_CA=str(ca),
    )
    assert server.get("/health").status_code == 200  # with the client certificate
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=5, verify=str(ca))
    assert wait_for(lambda: "TLS handshake with 127.0.0.1 failed" in server.output(), 5)
    assert server.get("/health").status_code == 200  # the worker serves on


def test_a_tls_client_socket_drives_its_handshake_and_reads_what_tls_holds(
    listener_certs: CertSet,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(listener_certs.server.cert, listener_certs.server.key)
    context.sslsocket_class = TlsClientSocket
    ours, theirs = socket.socketpair()
    sock = TlsClientSocket.wrap(context, ours, read_timeout=0.5, suppress_ragged_eofs=True)
    payload = bytes(range(256)) * 60  # 15,360 bytes: one TLS record
    sent = threading.Event()

    def client() -> None:
        tls = ssl.create_default_context(cafile=str(listener_certs.ca.cert))
        with tls.wrap_socket(theirs, server_hostname="127.0.0.1") as conn:
            conn.sendall(payload)
            sent.set()
            conn.recv(1)  # until the server closes

    with closing(sock):
        assert sock.advance_handshake() is Handshake.WANT_READ  # nothing sent yet
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        step = Handshake.WANT_READ
        deadline = time.monotonic() + 10
        while step is not Handshake.DONE:
            assert time.monotonic() < deadline, "the handshake did not end"
            writing = [sock] if step is Handshake.WANT_WRITE else []
            select.select([sock], writing, [], 1)
            step = sock.advance_handshake()
        assert sent.wait(10)
        # One call takes the whole record, though asked for 100 bytes: what the TLS layer
        # decrypted beyond them would make no socket readable again.
        assert sock.receive_available(100)
        assert sock.read_ahead == payload
        assert sock.pending() == 0
        assert sock.holds_unseen_bytes()
        sock.setblocking(True)
        assert sock.recv(4) == payload[:4]
        assert len(sock.recv(len(payload))) == len(payload) - 4
        assert not sock.holds_unseen_bytes()
        with pytest.raises(TimeoutError):
            sock.recv(10)  # within read_timeout
    thread.join(10)


def test_a_tls_client_socket_tells_plain_http_and_a_silent_close_apart(
    listener_certs: CertSet,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(listener_certs.server.cert, listener_certs.server.key)
    context.sslsocket_class = TlsClientSocket
    for sent, expected in ((b"GET / HTTP/1.1\r\n", Handshake.NOT_TLS), (b"", Handshake.CLOSED)):
        ours, theirs = socket.socketpair()
        with closing(theirs):
            sock = TlsClientSocket.wrap(context, ours, read_timeout=0.5, suppress_ragged_eofs=True)
            with closing(sock):
                theirs.sendall(sent)
                theirs.shutdown(socket.SHUT_WR)
                assert sock.advance_handshake() is expected


# --- the framing the worker waits on ---------------------------------------------------------


def framing() -> RequestFraming:
    return RequestFraming(max_head=8192, max_body=1000)


def feed(data: bytes, step: int = 7) -> tuple[int, Verdict]:
    """Feed ``data`` in pieces: the length at which the framing stopped waiting, and why."""
    frame = framing()
    for end in range(step, len(data) + step, step):
        verdict = frame.check(data[: min(end, len(data))])
        if verdict is not Verdict.WAIT:
            return min(end, len(data)), verdict
    return len(data), Verdict.WAIT


def test_framing_waits_for_the_whole_head_and_body() -> None:
    body = b'{"tasks": []}'
    request = request_bytes("POST", TASKS, body, Content_Length=str(len(body)))
    assert feed(request, step=1) == (len(request), Verdict.READY)
    no_body = request_bytes("GET", "/health")
    assert feed(no_body, step=1) == (len(no_body), Verdict.READY)
    chunked = request_bytes("POST", TASKS, Transfer_Encoding="chunked")
    chunked += b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert feed(chunked, step=1) == (len(chunked), Verdict.READY)
    no_trailers = request_bytes("POST", TASKS, Transfer_Encoding="gzip, chunked")
    no_trailers += b"2\r\nhi\r\n0\r\n\r\n"
    assert feed(no_trailers, step=3) == (len(no_trailers), Verdict.READY)
    # What follows a request (the next one, pipelined) does not matter.
    assert framing().check(request_bytes("GET", "/") + b"GET /hea") is Verdict.READY


@pytest.mark.parametrize(
    "data",
    [
        request_bytes("POST", TASKS, Content_Length="5000"),  # over max_body: 413 at once
        request_bytes("POST", TASKS, Content_Length="1", Transfer_Encoding="chunked"),
        request_bytes("POST", TASKS, Content_Length="x"),
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        request_bytes("POST", TASKS, Transfer_Encoding="gzip"),
        request_bytes("GET", "/", Expect="200-ok"),
        b"GET / HTTP/1.1\nHost: t\n",  # bare LF
        b"GET /" + b"a" * 9000,  # a head longer than max_head
        request_bytes("POST", TASKS, Transfer_Encoding="chunked") + b"3e9\r\n" + b"x" * 1001,
    ],
    ids=[
        "too large",
        "length and chunked",
        "bad length",
        "two lengths",
        "unknown coding",
        "unknown expectation",
        "bare LF",
        "head too long",
        "chunked too large",
    ],
)
def test_framing_hands_over_at_once_what_its_reader_refuses(data: bytes) -> None:
    assert framing().check(data) is Verdict.READY


@pytest.mark.parametrize(
    "body",
    [b'{"tasks": [', b"2\r\nhiXX", b"-1\r\n", b"\r\n", b"1" * 9000],
    ids=["unframed", "bad chunk end", "bad size", "empty size", "size line too long"],
)
def test_framing_tells_a_malformed_chunked_body_at_once(body: bytes) -> None:
    data = request_bytes("POST", TASKS, Transfer_Encoding="chunked") + body
    assert framing().check(data) is Verdict.BAD_CHUNKING


def test_framing_notes_an_expected_100_continue_until_the_body_is_there() -> None:
    head = request_bytes("POST", TASKS, Content_Length="4", Expect="100-continue")
    frame = framing()
    assert frame.check(head) is Verdict.WAIT
    assert frame.continue_expected
    assert frame.check(head + b"abcd") is Verdict.READY
    assert not frame.continue_expected
    old_client = head.replace(b"HTTP/1.1", b"HTTP/1.0")
    frame = framing()
    assert frame.check(old_client) is Verdict.WAIT
    assert not frame.continue_expected  # RFC 9110: ignored from an HTTP/1.0 client


def test_a_client_socket_serves_what_was_read_ahead_before_the_socket() -> None:
    ours, theirs = socket.socketpair()
    with closing(ClientSocket.adopt(ours, read_timeout=0.2)) as sock, closing(theirs):
        assert sock.receive_available(1024)  # nothing yet, still connected
        theirs.sendall(b"GET / HTTP/1.1\r\n")
        assert sock.receive_available(1024)
        assert sock.read_ahead == b"GET / HTTP/1.1\r\n"
        sock.setblocking(True)  # what gunicorn asks for: blocking, but within read_timeout
        assert sock.gettimeout() == 0.2
        assert sock.recv(4) == b"GET "
        sock.unread(b"HEAD")
        assert sock.recv(100) == b"HEAD/ HTTP/1.1\r\n"
        with pytest.raises(TimeoutError):
            sock.recv(100)  # nothing read ahead, nothing arriving
        theirs.sendall(b"Host: t\r\n")
        assert sock.recv(100) == b"Host: t\r\n"
        theirs.close()
        assert not sock.receive_available(1024)  # the peer is gone


def test_graceful_timeout_must_leave_room_after_the_request_timeout(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"service\.graceful_timeout = 5: must be greater"):
        make_settings(tmp_path, service={"graceful_timeout": 5, "request_timeout": 5})
    settings = make_settings(tmp_path, service={"graceful_timeout": 6, "request_timeout": 5})
    assert settings.service.request_timeout == 5.0
