"""A MariaDB server of the test run's own that accepts TLS connections only.

``mariadb-install-db`` creates a data directory in a temporary directory;
``mariadbd`` serves it on a free port of 127.0.0.1 with
``require_secure_transport=ON`` and the test CA's server certificate. Its
root account logs in, without a password, through the server's Unix socket
only (a socket connection counts as secure); the tests make their TCP
accounts themselves. :meth:`TlsMariadb.stop` ends the server by its PID.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql

from tests.certs import CertSet, KeyPair
from tests.gunicorn_server import free_port

# pymysql.connect itself, whatever a test's fixtures patch.
_CONNECT = pymysql.connect
STARTUP_TIMEOUT = 60.0


def find_programs() -> tuple[str, str] | str:
    """Paths of mariadb-install-db and mariadbd, or why they cannot be found."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    install = shutil.which("mariadb-install-db", path=search)
    server = shutil.which("mariadbd", path=search)
    if install is None or server is None:
        return (
            "mariadb-install-db and mariadbd are not installed (Debian: apt-get install "
            "mariadb-server); the TLS tests start a MariaDB server of their own"
        )
    return install, server


@dataclass
class TlsMariadb:
    """A running server: TCP on 127.0.0.1:``port`` (TLS only), root on ``socket``."""

    directory: Path
    port: int
    socket: Path
    process: subprocess.Popen[bytes]
    certs: CertSet
    log: Path

    def admin(self) -> pymysql.connections.Connection:
        """A root connection over the Unix socket (autocommit)."""
        return _CONNECT(
            unix_socket=str(self.socket), user="root", autocommit=True, connect_timeout=5
        )

    def execute(self, *statements: str) -> None:
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    @contextlib.contextmanager
    def presenting(self, pair: KeyPair) -> Iterator[None]:
        """Serve ``pair`` as the server certificate inside the block (``FLUSH SSL``)."""
        served = self.directory / "served"
        shutil.copyfile(pair.cert, served / "cert.pem")
        shutil.copyfile(pair.key, served / "key.pem")
        self.execute("FLUSH SSL")
        try:
            yield
        finally:
            shutil.copyfile(self.certs.server.cert, served / "cert.pem")
            shutil.copyfile(self.certs.server.key, served / "key.pem")
            self.execute("FLUSH SSL")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_tls_mariadb(certs: CertSet) -> TlsMariadb:
    """Install a data directory and start ``mariadbd`` on it; raise if it does not answer."""
    programs = find_programs()
    assert not isinstance(programs, str), programs
    install, server = programs
    # Not under pytest's private temporary directory: the server may run as the mysql
    # user, which must reach its files.
    directory = Path(tempfile.mkdtemp(prefix="pstest-mariadb-"))
    directory.chmod(0o755)
    served = directory / "served"
    served.mkdir()
    shutil.copyfile(certs.ca.cert, served / "ca.pem")
    shutil.copyfile(certs.server.cert, served / "cert.pem")
    shutil.copyfile(certs.server.key, served / "key.pem")
    datadir = directory / "data"
    datadir.mkdir()
    run = directory / "run"  # the socket and the PID file
    run.mkdir()
    user_args: list[str] = []
    if os.geteuid() == 0:
        # As root, mariadbd refuses to run (and should not): it runs as mysql.
        mysql = pwd.getpwnam("mysql")
        for path in (served, *served.iterdir(), datadir, run):
            os.chown(path, mysql.pw_uid, mysql.pw_gid)
        user_args = ["--user=mysql"]
    log = directory / "mariadbd.log"
    subprocess.run(
        [
            install,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            *user_args,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    socket_path = run / "mysqld.sock"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                server,
                "--no-defaults",
                f"--datadir={datadir}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--socket={socket_path}",
                f"--pid-file={run / 'mysqld.pid'}",
                *user_args,
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--skip-name-resolve",
                "--require-secure-transport=ON",
                f"--ssl-ca={served / 'ca.pem'}",
                f"--ssl-cert={served / 'cert.pem'}",
                f"--ssl-key={served / 'key.pem'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    instance = TlsMariadb(directory, port, socket_path, process, certs, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    # Waiting for the log line rather than trying to connect: PyMySQL leaks the socket of
    # a Unix-socket connection that fails.
    while "ready for connections" not in instance.output():
        if process.poll() is not None or time.monotonic() > deadline:
            output = instance.output()
            instance.stop()
            raise AssertionError(f"mariadbd did not start in {STARTUP_TIMEOUT} s:\n{output}")
        time.sleep(0.1)
    return instance
