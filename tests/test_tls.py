"""TLS to MySQL/MariaDB, against a MariaDB server of the test run's own that requires it.

The server (tests/tls_mariadb.py) runs with ``require_secure_transport=ON`` and
a certificate for 127.0.0.1 and localhost signed by a CA made for the run
(tests/certs.py). The tests prove: verified TLS works and says so; a
certificate that does not verify fails with a clear error needing an
operator, whether or not the host name is checked (and never falls back to
plain text); a wrong host name fails only when it is checked; a client
certificate is sent when asked; and ``/health`` reports what the connection
really negotiated, also when no CA is given.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
from flask import Flask

from persistence import create_app
from persistence.store import OperatorError, TransientError
from persistence.store.tls import TlsSetupError, needs_operator
from tests.certs import CertSet, make_test_certs
from tests.conftest import IN_CI, MysqlServer, make_settings
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, Server
from tests.tls_mariadb import TlsMariadb, find_programs, start_tls_mariadb

APP_USER = "pst_app"
X509_USER = "pst_x509"
# What the service needs (docs/DEPLOYMENT.md, "Database account"), with create_tables on.
APP_GRANTS = "SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, REFERENCES"


@dataclass(frozen=True)
class TlsDatabase:
    """The TLS server, a database on it, and the passwords of its two accounts."""

    server: TlsMariadb
    name: str
    app_password: str
    x509_password: str

    @property
    def certs(self) -> CertSet:
        return self.server.certs

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` run in the database as root, over the server's socket."""
        conn = self.server.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"USE `{self.name}`")
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {table}")[0][0])


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_test_certs(tmp_path_factory.mktemp("tls-certs"))


@pytest.fixture(scope="session")
def tls_mariadb(tls_certs: CertSet) -> Iterator[TlsMariadb]:
    """A MariaDB server requiring TLS, for the whole run; skipped (failed under CI=true)
    where MariaDB's server programs are not installed."""
    programs = find_programs()
    if isinstance(programs, str):
        if IN_CI:
            pytest.fail(f"CI=true but {programs}")
        pytest.skip(programs)
    server = start_tls_mariadb(tls_certs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_database(tls_mariadb: TlsMariadb) -> TlsDatabase:
    """A database on the TLS server, an account with the documented grants, and one that
    must log in with a client certificate (``REQUIRE X509``)."""
    database = TlsDatabase(
        tls_mariadb, f"pstls_{secrets.token_hex(4)}", secrets.token_hex(12), secrets.token_hex(12)
    )
    tls_mariadb.execute(
        f"CREATE DATABASE `{database.name}` CHARACTER SET utf8mb4",
        f"CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{database.app_password}'",
        f"GRANT {APP_GRANTS} ON `{database.name}`.* TO '{APP_USER}'@'%'",
        f"CREATE USER '{X509_USER}'@'%' IDENTIFIED BY '{database.x509_password}' REQUIRE X509",
        f"GRANT {APP_GRANTS} ON `{database.name}`.* TO '{X509_USER}'@'%'",
    )
    return database


def database_settings(db: TlsDatabase, **tls: Any) -> dict[str, Any]:
    return {
        "driver": "mysql",
        "host": "127.0.0.1",
        "port": db.server.port,
        "user": APP_USER,
        "password": db.app_password,
        "database": db.name,
        **tls,
    }


@pytest.fixture
def tls_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Apps whose database is given; their services are stopped at the end if started."""
    started: list[Any] = []

    def build(database: dict[str, Any], start: bool = False) -> Flask:
        # A generous probe bound: a TLS handshake on a busy 2-core machine may take a while.
        settings = make_settings(tmp_path, database=database, health={"probe_timeout": 6})
        app = create_app(settings)
        if start:
            service = app.extensions["persistence"]
            service.start()
            started.append(service)
        return app

    yield build
    for service in started:
        service.stop()


def health(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/health")
    return response.status_code, response.get_json()


def assert_verification_failure(status: int, report: dict[str, Any], reason: str) -> None:
    """/health is 503 and names a certificate that failed verification; no TLS was set up."""
    assert status == 503, report
    assert report["database"] == "unhealthy"
    error = report["database_error"]
    assert "CERTIFICATE_VERIFY_FAILED" in error, error
    assert reason in error, error
    assert report["tls"]["enabled"] is None  # no connection, so no TLS to report


# --- verified TLS, under gunicorn ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.mysql
def test_verified_tls_lands_a_batch_and_health_says_so(
    start_server: Callable[..., Server], tls_database: TlsDatabase, tmp_path: Path
) -> None:
    db = tls_database
    password_file = tmp_path / "db-password"
    password_file.write_text(db.app_password + "\n", encoding="utf-8")
    server = start_server(
        DB_DRIVER="mysql",
        DB_HOST="127.0.0.1",
        DB_PORT=str(db.server.port),
        DB_USER=APP_USER,
        DB_PASSWORD_FILE=str(password_file),
        DB_DATABASE=db.name,
        DB_SSL_CA=str(db.certs.ca.cert),
        BUFFER_FLUSH_INTERVAL="3600",
        HEALTH_PROBE_TIMEOUT="4",  # room for TLS handshakes on a busy machine
    )
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    assert server.post(f"{API}/tasks/batch", {"tasks": [task(sid) for _ in range(20)]}).ok
    flushed = server.post(f"{API}/flush").json()
    assert (flushed["sessions_written"], flushed["tasks_written"]) == (1, 20)
    assert db.count("translation_tasks") == 20

    response = server.get("/health")
    assert response.status_code == 200, response.text
    tls = response.json()["tls"]
    assert tls["required"] is tls["enabled"] is tls["verified"] is tls["identity"] is True
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"]

    output = server.output()
    ca = db.certs.ca.cert
    assert f"TLS required, server certificate must verify against {ca} and name the" in output
    assert f"database connection: TLS {tls['version']} {tls['cipher']}, " in output
    assert "certificate and host name verified" in output
    # The password came from its file; it is in no log line and no answer.
    assert db.app_password not in output
    assert db.app_password not in server.get(f"{API}/stats").text


# --- a certificate that does not verify ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.mysql
def test_a_wrong_ca_fails_clearly_even_with_the_host_name_check_off(
    start_server: Callable[..., Server], tls_database: TlsDatabase
) -> None:
    # PyMySQL's own ssl_verify_identity=False would stop verifying the chain as well and
    # connect; the service keeps verifying it.
    db = tls_database
    server = start_server(
        DB_DRIVER="mysql",
        DB_HOST="127.0.0.1",
        DB_PORT=str(db.server.port),
        DB_USER=APP_USER,
        DB_PASSWORD=db.app_password,
        DB_DATABASE=db.name,
        DB_SSL_CA=str(db.certs.other_ca.cert),
        DB_SSL_VERIFY_IDENTITY="false",
    )
    response = server.get("/health")
    assert_verification_failure(
        response.status_code, response.json(), "self-signed certificate in certificate chain"
    )
    output = server.output()
    assert "host name NOT checked" in output  # the start-up line says what was asked
    assert (
        "could not prepare the tables at start (OperationalError: (2003, \"Can't connect to "
        "MySQL server on '127.0.0.1' ([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: self-signed certificate in certificate chain"
    ) in output
    # A batch is still taken (buffered); the flush that cannot write says why, needing an
    # operator rather than a quick retry.
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    refused = server.post(f"{API}/flush")
    assert refused.status_code == 503
    assert "certificate verify failed" in refused.json()["detail"]
    stats = server.get(f"{API}/stats").json()["flush_info"]
    assert stats["last_error_category"] == "needs_operator"
    assert "certificate verify failed" in stats["needs_operator"]


@pytest.mark.mysql
def test_a_wrong_ca_fails_with_the_host_name_check_on(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase
) -> None:
    app = tls_app(database_settings(tls_database, ssl_ca=str(tls_database.certs.other_ca.cert)))
    assert_verification_failure(*health(app), "self-signed certificate in certificate chain")


@pytest.mark.mysql
def test_without_tls_on_the_server_a_required_tls_is_refused_not_skipped(
    tls_app: Callable[..., Flask],
    mysql_server: MysqlServer,
    mysql_database: str,
    tls_certs: CertSet,
) -> None:
    # The shared test server speaks no TLS: the service refuses to talk to it in plain text.
    conn = mysql_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            offers_tls = bool(cur.fetchone()[1])
    finally:
        conn.close()
    if offers_tls:
        pytest.skip("the shared test server offers TLS; this test needs one without")
    database = {
        "driver": "mysql",
        "host": mysql_server.host,
        "port": mysql_server.port,
        "user": mysql_server.user,
        "password": mysql_server.password,
        "database": mysql_database,
        "ssl_ca": str(tls_certs.ca.cert),
    }
    status, report = health(tls_app(database))
    assert status == 503
    assert report["database_error"] == (
        'OperationalError: (2026, "SSL is required but the server doesn\'t support it")'
    )
    # Without a CA the same server is used in plain text, and /health says so.
    del database["ssl_ca"]
    status, report = health(tls_app(database))
    assert status == 200, report
    assert report["tls"] == {
        "required": False,
        "enabled": False,
        "verified": False,
        "identity": False,
        "version": None,
        "cipher": None,
    }


# --- the host name ---------------------------------------------------------------------------


@pytest.mark.mysql
def test_a_wrong_host_name_fails_when_checked_and_works_when_not(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase
) -> None:
    db = tls_database
    ca = str(db.certs.ca.cert)
    with db.server.presenting(db.certs.wrong_host):  # a certificate for db.example.invalid
        checked = tls_app(database_settings(db, ssl_ca=ca))
        assert_verification_failure(*health(checked), "IP address mismatch")

        unchecked = tls_app(database_settings(db, ssl_ca=ca, ssl_verify_identity=False))
        status, report = health(unchecked)
        assert status == 200, report
        tls = report["tls"]
        assert (tls["enabled"], tls["verified"], tls["identity"]) == (True, True, False)
        client = unchecked.test_client()
        sid = new_session_id()
        sessions = {"sessions": [session(session_id=sid)]}
        assert client.post(f"{API}/sessions/batch", json=sessions).status_code == 200
        assert client.post(f"{API}/flush").get_json()["sessions_written"] == 1


# --- a client certificate --------------------------------------------------------------------


@pytest.mark.mysql
def test_an_account_that_requires_a_client_certificate_gets_one(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase
) -> None:
    db = tls_database
    account = {"user": X509_USER, "password": db.x509_password}
    ca = str(db.certs.ca.cert)
    without = tls_app({**database_settings(db, ssl_ca=ca), **account})
    status, report = health(without)
    assert status == 503
    assert "(1045, \"Access denied for user 'pst_x509'" in report["database_error"]

    with_cert = tls_app(
        {
            **database_settings(
                db, ssl_ca=ca, ssl_cert=str(db.certs.client.cert), ssl_key=str(db.certs.client.key)
            ),
            **account,
        }
    )
    status, report = health(with_cert)
    assert status == 200, report
    assert report["tls"]["verified"] is True
    client = with_cert.test_client()
    sid = new_session_id()
    body = {"tasks": [task(sid) for _ in range(3)]}
    sessions = {"sessions": [session(session_id=sid)]}
    assert client.post(f"{API}/sessions/batch", json=sessions).status_code == 200
    assert client.post(f"{API}/tasks/batch", json=body).status_code == 200
    assert client.post(f"{API}/flush").get_json()["tasks_written"] == 3


# --- no CA: whatever the server offers, told truthfully --------------------------------------


@pytest.mark.mysql
def test_without_a_ca_health_tells_the_truth_about_unverified_tls(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase
) -> None:
    app = tls_app(database_settings(tls_database))
    status, report = health(app)
    assert status == 200, report
    tls = report["tls"]
    assert (tls["required"], tls["enabled"], tls["verified"], tls["identity"]) == (
        False,
        True,
        False,
        False,
    )
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"]


# --- the least privilege --------------------------------------------------------------------


@pytest.mark.mysql
def test_init_db_over_tls_then_an_account_that_may_only_write(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase
) -> None:
    db = tls_database
    ca = str(db.certs.ca.cert)
    # init-db, over verified TLS too, with the account of the documented grants.
    result = tls_app(database_settings(db, ssl_ca=ca)).test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert f"Tables ready in mysql {APP_USER}@127.0.0.1:{db.server.port}/{db.name}, " in (
        result.output
    )
    # Then the service runs with SELECT, INSERT and UPDATE only (docs/DEPLOYMENT.md).
    password = secrets.token_hex(12)
    db.server.execute(
        f"CREATE USER IF NOT EXISTS 'pst_writer'@'%' IDENTIFIED BY '{password}'",
        f"GRANT SELECT, INSERT, UPDATE ON `{db.name}`.* TO 'pst_writer'@'%'",
    )
    writer = database_settings(db, ssl_ca=ca, user="pst_writer", password=password)
    app = tls_app({**writer, "create_tables": False})
    client = app.test_client()
    sid = new_session_id()
    sessions = {"sessions": [session(session_id=sid)]}
    assert client.post(f"{API}/sessions/batch", json=sessions).status_code == 200
    orphan = task(new_session_id())  # its session never comes: a dead letter at the end
    tasks = {"tasks": [task(sid), task(sid), orphan]}
    assert client.post(f"{API}/tasks/batch", json=tasks).status_code == 200
    assert client.post(f"{API}/flush").get_json()["tasks_written"] == 2
    result = app.extensions["persistence"].flusher.flush_once(final=True)
    assert result.dead_lettered == 1
    letters = db.query("SELECT record_key FROM persistence_dead_letters")
    assert (orphan["task_id"],) in letters


# --- what needs an operator ------------------------------------------------------------------


@pytest.mark.mysql
def test_tls_files_that_became_unusable_need_an_operator(
    tls_app: Callable[..., Flask], tls_database: TlsDatabase, tmp_path: Path
) -> None:
    ca = tmp_path / "ca-copy.pem"
    shutil.copyfile(tls_database.certs.ca.cert, ca)
    app = tls_app(database_settings(tls_database, ssl_ca=str(ca)))
    assert health(app)[0] == 200
    os.remove(ca)  # e.g. a secret volume remounted without it
    store = app.extensions["persistence"].store
    with pytest.raises(
        OperatorError, match=r"the TLS files of database\.ssl_ca, ssl_cert, ssl_key"
    ):
        store.probe(5)


def _connect_error(cause: BaseException, code: int = 2003) -> pymysql.OperationalError:
    """A connect error as PyMySQL raises it: the OSError attached as original_exception."""
    error = pymysql.OperationalError(code, f"Can't connect to MySQL server on 'db' ({cause})")
    error.original_exception = cause  # type: ignore[attr-defined]
    return error


def test_which_connection_errors_are_tls_failures_that_need_an_operator() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert needs_operator(_connect_error(verify))
    assert needs_operator(_connect_error(ssl.SSLError(1, "no shared cipher")))
    assert needs_operator(TlsSetupError("the CA file is gone"))
    # A handshake cut short, or the network: not TLS problems.
    assert not needs_operator(_connect_error(ssl.SSLEOFError(8, "EOF in violation")))
    assert not needs_operator(_connect_error(ConnectionRefusedError(111, "refused")))
    # A TLS error later in the connection's life is a lost connection, not a setup failure.
    assert not needs_operator(_connect_error(ssl.SSLError(1, "bad record mac"), code=2013))
    assert not needs_operator(pymysql.OperationalError(2003, "Can't connect"))


def test_the_store_classifies_tls_failures_as_needing_an_operator(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database={"driver": "mysql"})
    dialect = create_app(settings).extensions["persistence"].store.dialect
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert dialect.classify(_connect_error(verify)) is OperatorError
    required = pymysql.OperationalError(2026, "SSL is required but the server doesn't support it")
    assert dialect.classify(required) is OperatorError
    eof = ssl.SSLEOFError(8, "EOF in violation")
    assert issubclass(dialect.classify(_connect_error(eof)), TransientError)
