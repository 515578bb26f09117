"""Bearer-token auth (``service.auth_tokens``): who gets in, what a refusal says, what is logged.

The token check alone; the API on the Flask test client; and the service
under gunicorn (two workers) with MariaDB.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from persistence import auth
from persistence.auth import BearerTokens, Verdict
from persistence.config import ConfigError, load_settings
from tests.conftest import Database, make_settings
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server, wait_for

OLD = "old-token-9f86d081884c7d65"
NEW = "new-token-2c26b46b68ffc68f"
PROTECTED = [
    ("POST", f"{API}/sessions/batch"),
    ("POST", f"{API}/tasks/batch"),
    ("POST", f"{API}/flush"),
    ("GET", f"{API}/stats"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/path"),
    ("POST", "/health"),
]


# --- the check -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "verdict"),
    [
        (None, Verdict.MISSING),
        ("", Verdict.MISSING),
        ("Bearer", Verdict.MISSING),
        ("Bearer   ", Verdict.MISSING),
        (f"Basic {OLD}", Verdict.MISSING),
        (f"Bearer {OLD}", Verdict.ALLOWED),
        (f"bearer {NEW}", Verdict.ALLOWED),
        (f"BEARER  {NEW} ", Verdict.ALLOWED),
        (f"Bearer {OLD}x", Verdict.INVALID),
        (f"Bearer {OLD[:-1]}", Verdict.INVALID),
        ("Bearer é", Verdict.INVALID),
    ],
)
def test_the_verdict_on_a_header(header: str | None, verdict: Verdict) -> None:
    assert BearerTokens([OLD, NEW]).check(header) is verdict


def test_no_token_configured_allows_everything() -> None:
    tokens = BearerTokens([])
    assert not tokens.required
    assert tokens.check(None) is Verdict.ALLOWED


def test_every_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tokens = BearerTokens(["a", "bb", "ccc"])
    for header in ("Bearer a", "Bearer ccc", "Bearer wrong-and-much-longer"):
        calls.clear()
        tokens.check(header)
        # Three comparisons of fixed-size digests: neither the match nor the length shows.
        assert calls == [64, 64, 64]


# --- configuration -------------------------------------------------------------------------


def test_tokens_come_comma_separated_from_the_environment(tmp_path: Path) -> None:
    empty = tmp_path / "c.yaml"
    empty.write_text("{}\n")
    settings = load_settings(path=empty, environ={"SERVICE_AUTH_TOKENS": f" {OLD}, {NEW} ,"})
    assert settings.service.auth_tokens == (OLD, NEW)


@pytest.mark.parametrize("bad", ["two words", 'quote"d', "tab\there", "ünicode"])
def test_a_token_no_header_can_carry_is_a_config_error_that_does_not_echo_it(
    tmp_path: Path, bad: str
) -> None:
    empty = tmp_path / "c.yaml"
    empty.write_text("{}\n")
    secret = f"{OLD},{bad}"
    with pytest.raises(ConfigError) as caught:
        load_settings(path=empty, environ={"SERVICE_AUTH_TOKENS": secret})
    message = str(caught.value)
    assert message == (
        "service.auth_tokens = <secret> (from SERVICE_AUTH_TOKENS): token 2 of 2 is not a "
        "bearer token: allowed are letters, digits and -._~+/ with = at the end only"
    )
    assert OLD not in message
    assert "\n" not in message


# --- the API -------------------------------------------------------------------------------


@pytest.fixture
def locked(app_factory: Callable[..., Flask]) -> Flask:
    return app_factory(
        service={"auth_tokens": [OLD, NEW]},
        buffer={"flush_interval": 3600, "max_buffer_size": 100_000, "hard_limit": 200_000},
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_load_balancer_probes_need_no_token(locked: Flask) -> None:
    client = locked.test_client()
    for method in ("GET", "HEAD"):
        assert client.open("/", method=method).status_code == 200
        assert client.open("/health", method=method).status_code == 200


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_other_request_without_a_token_gets_401(
    locked: Flask, method: str, path: str
) -> None:
    client = locked.test_client()
    answer = client.open(path, method=method, json={"tasks": []})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="persistence"'
    assert answer.content_type == "application/json"
    assert answer.json["detail"] == (
        "This endpoint needs a bearer token: send 'Authorization: Bearer <token>'."
    )
    assert answer.json["request_id"] == answer.headers["X-Request-ID"]


def test_a_wrong_token_gets_401_invalid_token(locked: Flask) -> None:
    answer = locked.test_client().get(f"{API}/stats", headers=bearer("guess"))
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="persistence", error="invalid_token"'
    assert answer.json["detail"] == "The bearer token is not valid."
    assert "guess" not in answer.get_data(as_text=True)


def test_either_token_lets_batches_in_while_a_token_is_rotated(locked: Flask, db: Database) -> None:
    client = locked.test_client()
    sid = new_session_id()
    with_old = client.post(
        f"{API}/sessions/batch", json={"sessions": [session(session_id=sid)]}, headers=bearer(OLD)
    )
    with_new = client.post(f"{API}/tasks/batch", json={"tasks": [task(sid)]}, headers=bearer(NEW))
    assert (with_old.status_code, with_new.status_code) == (200, 200)
    assert client.post(f"{API}/flush", headers=bearer(NEW)).status_code == 200
    assert db.count("translation_tasks") == 1


def test_refusals_are_counted_as_unauthorized_with_no_records(locked: Flask) -> None:
    client = locked.test_client()
    client.post(f"{API}/tasks/batch", json={"tasks": [task(new_session_id())] * 3})
    client.get(f"{API}/stats", headers=bearer("nope"))
    refused = client.get(f"{API}/stats", headers=bearer(OLD)).json["refused"]
    assert refused["unauthorized"] == {"batches": 2, "records": 0}
    assert refused["malformed"] == {"batches": 0, "records": 0}


def test_without_tokens_the_api_is_open(client: FlaskClient) -> None:
    assert client.get(f"{API}/stats").status_code == 200
    assert client.get(f"{API}/stats").json["refused"]["unauthorized"]["batches"] == 0


# --- logs ----------------------------------------------------------------------------------


def captured(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture
def persistence_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("persistence").addHandler(caplog.handler)
    yield caplog
    logging.getLogger("persistence").removeHandler(caplog.handler)


def test_start_warns_when_the_api_is_open_and_says_when_it_is_not(
    tmp_path: Path, persistence_log: pytest.LogCaptureFixture
) -> None:
    from persistence import create_app

    for tokens, expected in (
        ((), "the API is open: service.auth_tokens is empty"),
        ((OLD, NEW), "bearer-token auth on: 2 token(s) accepted"),
    ):
        persistence_log.clear()
        app = create_app(make_settings(tmp_path, service={"auth_tokens": list(tokens)}))
        service = app.extensions["persistence"]
        service.start()
        service.stop()
        records = [r for r in persistence_log.records if r.name == "persistence.auth"]
        assert [expected in r.getMessage() for r in records] == [True]
        assert records[0].levelno == (logging.WARNING if not tokens else logging.INFO)
        assert OLD not in captured(persistence_log)


# --- under gunicorn ------------------------------------------------------------------------


def post(server: Server, path: str, body: Any, token: str | None) -> requests.Response:
    headers = bearer(token) if token else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=5)


@pytest.mark.mysql
@pytest.mark.e2e
def test_two_workers_enforce_the_tokens_and_never_log_them(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(
        **mysql_env, SERVICE_WORKERS="2", SERVICE_AUTH_TOKENS=f"{OLD},{NEW}", LOG_LEVEL="DEBUG"
    )
    stats_url = server.url + f"{API}/stats"
    assert wait_for(
        lambda: (
            requests.get(stats_url, headers=bearer(OLD), timeout=5).json()["workers"]["count"] == 2
        )
    )
    sid = new_session_id()
    sessions = {"sessions": [session(session_id=sid)]}
    refused = [
        post(server, f"{API}/sessions/batch", sessions, None),
        post(server, f"{API}/tasks/batch", {"tasks": [task(sid)]}, None),
        post(server, f"{API}/tasks/batch", {"tasks": [task(sid)]}, "wrong"),
    ]
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert post(server, f"{API}/sessions/batch", sessions, NEW).status_code == 200
    for _ in range(4):  # several connections: both workers answer
        answer = post(server, f"{API}/tasks/batch", {"tasks": [task(sid)]}, OLD)
        assert answer.status_code == 200
    assert post(server, f"{API}/flush", None, NEW).status_code == 200
    assert mysql_db.count("translation_tasks") == 4
    assert server.get("/health").status_code == 200

    stats = requests.get(stats_url, headers=bearer(OLD), timeout=5).json()
    assert stats["workers"]["count"] == 2
    assert stats["refused"]["unauthorized"]["batches"] == 3
    output = server.output()
    assert output.count("bearer-token auth on: 2 token(s) accepted") == 2
    assert "the API is open" not in output
    assert OLD not in output
    assert NEW not in output
    assert "wrong" not in output


@pytest.mark.e2e
def test_an_open_service_warns_at_start(start_server: Callable[..., Server]) -> None:
    server = start_server()
    assert server.get(f"{API}/stats").status_code == 200
    assert "the API is open: service.auth_tokens is empty" in server.output()
