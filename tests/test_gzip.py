"""Compressed request bodies: gzip and deflate (zlib and raw), the inflated-size limit, 415.

The codec itself (persistence/contentcoding.py) without a server; the API on
the Flask test client (SQLite and MariaDB); and a gzip bomb sent to the
service under gunicorn with MariaDB, which must answer 413 at once.
"""

from __future__ import annotations

import gzip
import json
import resource
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from persistence.contentcoding import STEP, coding_of, inflate
from persistence.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server

SESSIONS_URL = f"{API}/sessions/batch"
TASKS_URL = f"{API}/tasks/batch"


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def bomb(inflated_bytes: int) -> bytes:
    """A gzip body of zeros: about a thousandth of what it inflates to."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(inflated_bytes // len(zeros))]
    return b"".join(parts) + compressor.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # RFC 1950, as the HTTP specification says
    "deflate-raw": raw_deflate,  # what some clients send as "deflate"
}


# --- the codec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "coding"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("GZip", "gzip"),
        ("x-gzip", "gzip"),
        ("deflate", "deflate"),
        ("identity, gzip", "gzip"),
        (" deflate ,identity", "deflate"),
    ],
)
def test_the_codings_read(header: str | None, coding: str | None) -> None:
    assert coding_of(header) == coding


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, gzip", "gzip, deflate", "*"])
def test_other_codings_and_stacked_codings_are_refused(header: str) -> None:
    with pytest.raises(UnsupportedMediaType, match="gzip, deflate or identity"):
        coding_of(header)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_coding_inflates_to_the_body_sent(name: str) -> None:
    body = json.dumps({"tasks": [task(new_session_id()) for _ in range(50)]}).encode()
    coding = "deflate" if name.startswith("deflate") else "gzip"
    assert inflate(ENCODERS[name](body), coding, len(body)) == body


def test_several_gzip_members_are_read_one_after_the_other() -> None:
    assert inflate(gzip.compress(b'{"a": ') + gzip.compress(b"1}"), "gzip", 100) == b'{"a": 1}'


def test_a_body_inflating_to_exactly_the_limit_passes_and_one_byte_more_does_not() -> None:
    body = b"x" * (3 * STEP + 17)
    assert inflate(gzip.compress(body), "gzip", len(body)) == body
    with pytest.raises(PayloadTooLarge, match=f"more than the limit of {len(body) - 1} bytes"):
        inflate(gzip.compress(body), "gzip", len(body) - 1)


def test_a_bomb_is_refused_without_inflating_past_the_limit() -> None:
    limit = 2 * 1024 * 1024
    sent = bomb(256 * 1024 * 1024)  # 256 MiB of zeros in about 256 KB
    assert len(sent) < limit
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PayloadTooLarge):
        inflate(sent, "gzip", limit)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # far below the 256 MiB it would inflate to


@pytest.mark.parametrize(
    ("body", "coding", "words"),
    [
        (b"not compressed at all", "gzip", "not valid gzip data"),
        (gzip.compress(b'{"tasks": []}')[:-9], "gzip", "cut short"),
        (b"", "gzip", "cut short"),
        (zlib.compress(b'{"tasks": []}')[:-3], "deflate", "cut short"),
        (zlib.compress(b"{}") + b"junk", "deflate", "bytes after the end"),
        (gzip.compress(b"{}") + b"junk", "gzip", "not valid gzip data"),
        (bytes([0x78, 0x9C, 0xFF, 0xFF, 0xFF]), "deflate", "not valid deflate data"),
    ],
)
def test_a_corrupt_stream_is_a_bad_request(body: bytes, coding: str, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        inflate(body, coding, 1024 * 1024)


# --- the API -------------------------------------------------------------------------------


def post_encoded(client: FlaskClient, url: str, body: Any, name: str, **headers: str) -> Any:
    data = json.dumps(body).encode()
    header = "deflate" if name.startswith("deflate") else name
    return client.post(
        url,
        data=ENCODERS[name](data),
        headers={"Content-Type": "application/json", "Content-Encoding": header, **headers},
    )


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_compressed_batches_land_in_the_database(
    client: FlaskClient, db: Database, name: str
) -> None:
    sid = new_session_id()
    tasks = [task(sid) for _ in range(3)]
    assert (
        post_encoded(client, SESSIONS_URL, {"sessions": [session(session_id=sid)]}, name).json[
            "count"
        ]
        == 1
    )
    answer = post_encoded(client, TASKS_URL, {"tasks": tasks}, name)
    assert answer.status_code == 200, answer.json
    assert answer.json["count"] == 3
    assert client.post(f"{API}/flush").status_code == 200
    assert db.count("translation_sessions") == 1
    assert db.count("translation_tasks") == 3


def test_an_inflated_body_over_the_limit_is_413_and_counted(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(service={"max_request_bytes": 64 * 1024})
    client = app.test_client()
    body = {"tasks": [task(new_session_id(), source_text="x" * 60_000) for _ in range(2)]}
    sent = gzip.compress(json.dumps(body).encode())
    assert len(sent) < 64 * 1024  # small as sent, too large as meant
    answer = client.post(
        TASKS_URL,
        data=sent,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert answer.status_code == 413
    assert "inflates to more than the limit of 65536 bytes" in answer.json["detail"]
    assert client.get(f"{API}/stats").json["refused"]["too_large"]["batches"] == 1
    assert db.count("translation_tasks") == 0


def test_a_corrupt_body_is_400_and_an_unknown_coding_415_both_counted(
    client: FlaskClient,
) -> None:
    corrupt = client.post(
        TASKS_URL,
        data=b"\x1f\x8b not really gzip",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert corrupt.status_code == 400
    assert corrupt.json["detail"] == (
        "The request body is not valid gzip data (Content-Encoding: gzip)."
    )
    brotli = client.post(
        TASKS_URL,
        data=b"\x0b\x02\x80{}\x03",
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    )
    assert brotli.status_code == 415
    assert brotli.json["detail"] == (
        "Content-Encoding must be gzip, deflate or identity (one coding), not 'br'."
    )
    refused = client.get(f"{API}/stats").json["refused"]
    assert refused["malformed"]["batches"] == 1
    assert refused["unsupported_media_type"]["batches"] == 1


def test_identity_is_the_body_as_sent(client: FlaskClient) -> None:
    answer = client.post(
        TASKS_URL,
        data=json.dumps({"tasks": [task(new_session_id())]}),
        headers={"Content-Type": "application/json", "Content-Encoding": "identity"},
    )
    assert answer.status_code == 200
    assert answer.json["count"] == 1


def test_compressed_invalid_records_are_422_with_their_errors(client: FlaskClient) -> None:
    answer = post_encoded(client, TASKS_URL, {"tasks": [{"task_id": "t"}]}, "gzip")
    assert answer.status_code == 422
    assert answer.json["errors"][0]["task_id"] == "t"


# --- under gunicorn with MariaDB -----------------------------------------------------------


@pytest.mark.mysql
@pytest.mark.e2e
def test_the_service_refuses_a_gzip_bomb_at_once_and_takes_the_next_batch(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(**mysql_env, SERVICE_MAX_REQUEST_BYTES=str(2 * 1024 * 1024))
    sent = bomb(256 * 1024 * 1024)
    answer = requests.post(
        server.url + TASKS_URL,
        data=sent,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert answer.status_code == 413
    assert "inflates to more than the limit of 2097152 bytes" in answer.json()["detail"]

    sid = new_session_id()
    batch = gzip.compress(json.dumps({"sessions": [session(session_id=sid)]}).encode())
    landed = requests.post(
        server.url + SESSIONS_URL,
        data=batch,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert landed.status_code == 200
    assert server.post(f"{API}/flush").status_code == 200
    assert mysql_db.query("SELECT session_id FROM translation_sessions") == [(sid,)]
