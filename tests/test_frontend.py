"""The HTTP front end under gunicorn: stalled and hostile clients, JSON-only answers, stops.

Black-box tests against the real service (persistence.http_worker under
gunicorn, real MariaDB), with raw sockets where a well-behaved HTTP client
could not send the request; and unit tests of the request framing the worker
relies on.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from persistence.config import ConfigError
from persistence.http_connection import ClientSocket, RequestFraming, Verdict
from tests.conftest import Database, MysqlServer, make_settings
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server, wait_for

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
    host, port = server.url.removeprefix("http://").split(":")
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


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """The server closed the connection (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request_bytes(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def tasks_body(count: int, sid: str | None = None) -> tuple[bytes, list[str]]:
    records = [task(sid or new_session_id()) for _ in range(count)]
    return json.dumps({"tasks": records}).encode(), [r["task_id"] for r in records]


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


@pytest.mark.e2e
@pytest.mark.mysql
def test_a_hundred_stalled_clients_do_not_keep_others_out(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(SERVICE_REQUEST_TIMEOUT="2", **mysql_env)
    partial_body = request_bytes(
        "POST", TASKS, b'{"tasks": [', Content_Type="application/json", Content_Length="1000"
    )
    stalled: dict[str, list[socket.socket]] = {"idle": [], "half head": [], "half body": []}
    for n in range(100):
        kind = list(stalled)[n % 3]
        sock = connect(server)
        if kind == "half head":
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nAccept: appl")
        elif kind == "half body":
            sock.sendall(partial_body)
        stalled[kind].append(sock)

    for _ in range(5):
        started = time.monotonic()
        response = requests.get(f"{server.url}/health", timeout=10)
        assert response.status_code == 200
        assert time.monotonic() - started < 1.0  # the product's promise for /health
    sid = new_session_id()
    assert server.post(SESSIONS, {"sessions": [session(session_id=sid)]}).ok
    body, ids = tasks_body(50, sid)
    response = requests.post(
        f"{server.url}{TASKS}", data=body, headers={"Content-Type": "application/json"}, timeout=2
    )
    assert response.status_code == 200, response.text
    assert server.post(f"{API}/flush").json()["tasks_written"] == 50
    assert landed_tasks(mysql_db) == set(ids)

    # Within a few seconds, each half-sent request is answered 408 and closed; an idle
    # connection is closed without a word.
    for sock in stalled["half head"] + stalled["half body"]:
        sock.settimeout(10)
        response = read_response(sock)
        assert response.status == 408
        assert response.headers["content-type"] == "application/json"
        assert response.headers["connection"] == "close"
        assert closed_by_server(sock)
    for sock in stalled["idle"]:
        assert closed_by_server(sock, timeout=10)
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
        assert sock.pending == b"GET / HTTP/1.1\r\n"
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
