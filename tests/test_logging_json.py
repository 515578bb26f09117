"""``logging.format: json``, and the request id: in ``X-Request-ID``, in error bodies, in logs.

The formatters alone; the API on the Flask test client; and the service
under gunicorn, whose own error and access logs follow the same format.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from persistence.config import ConfigError, LoggingSettings, load_settings
from persistence.logs import REQUEST_ID, JsonFormatter, TextFormatter, configure_logging
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server

TEXT_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING \[\d+\] persistence\.test: hello 7"
ISO_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def record(message: str = "hello %d", *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    entry = logging.LogRecord(
        "persistence.test", logging.WARNING, __file__, 1, message, args or (7,), exc_info
    )
    entry.request_id = REQUEST_ID.get()
    return entry


# --- the formatters ------------------------------------------------------------------------


def test_json_lines_hold_the_fields() -> None:
    entry = json.loads(JsonFormatter().format(record()))
    assert set(entry) == {"time", "level", "logger", "pid", "message", "request_id"}
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "persistence.test"
    assert entry["message"] == "hello 7"
    assert entry["request_id"] is None
    assert entry["pid"] == os.getpid()
    assert re.fullmatch(ISO_UTC, entry["time"])


def test_json_lines_carry_the_request_id_and_the_exception_on_one_line() -> None:
    reset = REQUEST_ID.set("req-42")
    try:
        line = JsonFormatter().format(record("failed %d", exc=True))
    finally:
        REQUEST_ID.reset(reset)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["request_id"] == "req-42"
    assert entry["exception"].startswith("Traceback")
    assert "ValueError: boom" in entry["exception"]


def test_text_lines_keep_their_format_and_end_with_the_request_id() -> None:
    assert re.fullmatch(TEXT_LINE, TextFormatter().format(record()))
    reset = REQUEST_ID.set("req-42")
    try:
        line = TextFormatter().format(record())
    finally:
        REQUEST_ID.reset(reset)
    assert re.fullmatch(TEXT_LINE + " request_id=req-42", line)


@pytest.mark.parametrize(("raw", "value"), [("json", "json"), ("JSON", "json"), ("text", "text")])
def test_log_format_is_text_or_json(tmp_path: Path, raw: str, value: str) -> None:
    empty = tmp_path / "c.yaml"
    empty.write_text("{}\n")
    assert load_settings(path=empty, environ={"LOG_FORMAT": raw}).logging.format == value


def test_a_format_string_is_now_a_config_error(tmp_path: Path) -> None:
    empty = tmp_path / "c.yaml"
    empty.write_text("{}\n")
    with pytest.raises(ConfigError, match="must be one of text, json"):
        load_settings(path=empty, environ={"LOG_FORMAT": "%(message)s"})


# --- the API -------------------------------------------------------------------------------


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    """The service's log as JSON lines in a file of this test (configured after the app)."""
    path = tmp_path / "service.log"
    yield path
    configure_logging(LoggingSettings(file=""))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_sane_client_id_is_kept_and_echoed(client: FlaskClient) -> None:
    sent = "client-7f3a:retry/2"
    answer = client.get("/", headers={"X-Request-ID": sent})
    assert answer.headers["X-Request-ID"] == sent


@pytest.mark.parametrize(
    "sent", ["", "has space", "x" * 129, "tab\there", "naïve", "quote\x7f", None]
)
def test_a_missing_or_odd_client_id_is_replaced_by_a_new_one(
    client: FlaskClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = client.get("/health", headers=headers).headers["X-Request-ID"]
    second = client.get("/health", headers=headers).headers["X-Request-ID"]
    assert first != sent
    assert first != second
    assert len(first) == 32
    assert int(first, 16) >= 0


def test_a_client_id_of_128_characters_is_kept(client: FlaskClient) -> None:
    sent = "r" * 128
    assert client.get("/", headers={"X-Request-ID": sent}).headers["X-Request-ID"] == sent


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", f"{API}/tasks/batch", {"tasks": [{"task_id": "t"}]}, 422),
        ("POST", f"{API}/tasks/batch", {"nothing": 1}, 400),
        ("GET", "/nowhere", None, 404),
        ("GET", f"{API}/flush", None, 405),
    ],
)
def test_error_bodies_carry_the_request_id(
    client: FlaskClient, method: str, path: str, body: Any, status: int
) -> None:
    answer = client.open(path, method=method, json=body, headers={"X-Request-ID": "abc-1"})
    assert answer.status_code == status
    assert answer.headers["X-Request-ID"] == "abc-1"
    assert answer.json["request_id"] == "abc-1"


def test_an_unexpected_error_carries_the_request_id_in_body_and_log(
    app: Flask, json_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging(LoggingSettings(file=str(json_log), format="json"))
    service = app.extensions["persistence"]

    def broken() -> dict[str, Any]:
        raise RuntimeError("a fault of the service")

    monkeypatch.setattr(service, "stats", broken)
    answer = app.test_client().get(f"{API}/stats", headers={"X-Request-ID": "boom-1"})
    assert answer.status_code == 500
    assert answer.json == {
        "detail": "Internal server error; the service log has the details.",
        "request_id": "boom-1",
    }
    [entry] = [e for e in lines(json_log) if e["logger"] == "persistence.errors"]
    assert entry["request_id"] == "boom-1"
    assert entry["level"] == "ERROR"
    assert "RuntimeError: a fault of the service" in entry["exception"]


def test_log_lines_of_a_request_carry_its_id_and_others_none(
    client: FlaskClient, json_log: Path
) -> None:
    configure_logging(LoggingSettings(file=str(json_log), format="json"))
    sid = new_session_id()
    client.post(f"{API}/sessions/batch", json={"sessions": [session(session_id=sid)]})
    client.post(f"{API}/tasks/batch", json={"tasks": [task(sid)]})
    answer = client.post(f"{API}/flush", headers={"X-Request-ID": "flush-9"})
    assert answer.status_code == 200
    logging.getLogger("persistence.test").info("outside any request")
    entries = lines(json_log)
    flush = [e for e in entries if e["message"].startswith("flush wrote 1 sessions, 1 tasks")]
    assert [e["request_id"] for e in flush] == ["flush-9"]
    outside = [e for e in entries if e["message"] == "outside any request"]
    assert [e["request_id"] for e in outside] == [None]
    assert REQUEST_ID.get() is None  # nothing leaks out of the request


# --- under gunicorn ------------------------------------------------------------------------


def json_lines(output: str) -> list[dict[str, Any]]:
    """The lines of the server's output that are JSON objects (all, in json mode)."""
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.mark.e2e
def test_under_gunicorn_every_line_is_json_and_the_access_log_has_the_request_id(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(LOG_FORMAT="json")
    answer = requests.post(
        server.url + f"{API}/flush", headers={"X-Request-ID": "e2e-flush-1"}, timeout=5
    )
    assert answer.status_code == 200
    refused = requests.post(server.url + f"{API}/tasks/batch", data=b"{", timeout=5)
    assert refused.status_code == 415
    request_id = refused.headers["X-Request-ID"]
    assert refused.json()["request_id"] == request_id
    assert server.stop() == 0

    output = server.output()
    entries = json_lines(output)
    assert len(entries) == len(output.splitlines())  # no line of another format
    assert {"time", "level", "logger", "pid", "message", "request_id"} <= set(entries[0])
    loggers = {e["logger"] for e in entries}
    assert {"gunicorn.error", "gunicorn.access", "persistence.runtime"} <= loggers
    access = [e for e in entries if e["logger"] == "gunicorn.access"]
    flush = next(e for e in access if e["http"]["path"] == f"{API}/flush")
    assert flush["request_id"] == "e2e-flush-1"
    assert flush["http"]["method"] == "POST"
    assert flush["http"]["status"] == 200
    assert flush["message"].endswith(" e2e-flush-1")
    batch = next(e for e in access if e["http"]["path"] == f"{API}/tasks/batch")
    assert (batch["request_id"], batch["http"]["status"]) == (request_id, 415)


@pytest.mark.e2e
def test_under_gunicorn_the_text_access_log_ends_with_the_request_id(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    requests.get(server.url + "/", headers={"X-Request-ID": "text-77"}, timeout=5)
    assert server.stop() == 0
    [line] = [line for line in server.output().splitlines() if '"GET / HTTP/1.1"' in line]
    assert line.endswith(" text-77")


@pytest.mark.e2e
def test_answers_of_the_http_worker_itself_carry_a_request_id_too(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/persistence/tasks/batch HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    [header] = [line for line in head.split(b"\r\n") if line.startswith(b"X-Request-ID: ")]
    request_id = header.split(b": ", 1)[1].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert json.loads(body) == {
        "detail": "The request body is not valid chunked transfer coding.",
        "request_id": request_id,
    }
