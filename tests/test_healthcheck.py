"""``python -m persistence.healthcheck``: the container's HEALTHCHECK.

Run as the engine runs it, in a process of its own, against a small HTTP
server that answers as told, and against the service under gunicorn.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persistence.config import ServiceSettings
from persistence.healthcheck import health_url
from tests.certs import make_ca, make_leaf, make_self_signed
from tests.gunicorn_server import REPO, free_port, gunicorn_command, service_env, wait_for

# --- a server that answers as told ---------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    """Answers every GET with ``status`` and ``body``, or never, once ``stall`` is set."""

    daemon_threads = True

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"status": "healthy", "database": "healthy"}
        self.paths: list[str] = []
        self.stall = threading.Event()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.server.stall.is_set():
            self.server.release.wait(30)
            return
        body = self.server.body
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def run_check(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The check in a process of its own, with only ``env`` (no settings of this test run)."""
    return subprocess.run(
        [sys.executable, "-m", "persistence.healthcheck", *args],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The check's single line of output; nothing on stderr, no traceback."""
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


def config_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(f"service:\n  host: 0.0.0.0\n  port: {port}\n", encoding="utf-8")
    return path


# --- against the answering server ----------------------------------------------------------


def test_probes_the_port_of_the_config_file(server: _Server, tmp_path: Path) -> None:
    port = server.server_address[1]
    result = run_check(tmp_path, PERSISTENCE_CONFIG=str(config_file(tmp_path, port)))
    assert result.returncode == 0
    assert one_line(result) == (
        f"healthy: http://127.0.0.1:{port}/health answered 200 (database healthy)"
    )
    assert server.paths == ["/health"]


def test_environment_wins_over_the_config_file_as_for_the_service(
    server: _Server, tmp_path: Path
) -> None:
    config = config_file(tmp_path, free_port())
    port = str(server.server_address[1])
    result = run_check(tmp_path, PERSISTENCE_CONFIG=str(config), SERVICE_PORT=port)
    assert result.returncode == 0, result.stdout
    assert server.paths == ["/health"]


def test_config_yaml_of_the_working_directory_is_read(server: _Server, tmp_path: Path) -> None:
    # The image runs the check in /app, next to its config.yaml, as the service.
    (tmp_path / "config.yaml").write_text(f"service:\n  port: {server.server_address[1]}\n")
    assert run_check(tmp_path).returncode == 0
    assert server.paths == ["/health"]


def test_503_is_one_line_with_the_database_error(server: _Server, tmp_path: Path) -> None:
    server.status = 503
    server.body = {
        "status": "unhealthy",
        "database": "unhealthy",
        "database_error": 'OperationalError: (2003, "Can\'t connect to MySQL server")',
        "problems": ["dead_letter_write_failed"],
    }
    port = server.server_address[1]
    result = run_check(tmp_path, SERVICE_PORT=str(port))
    assert result.returncode == 1
    assert one_line(result) == (
        f"unhealthy: http://127.0.0.1:{port}/health answered 503 (database unhealthy; "
        'OperationalError: (2003, "Can\'t connect to MySQL server"); '
        "problems: dead_letter_write_failed)"
    )


def test_an_answer_that_is_not_json_still_gives_its_status(server: _Server, tmp_path: Path) -> None:
    server.status = 502
    server.body = b"<html>Bad Gateway</html>"
    port = server.server_address[1]
    result = run_check(tmp_path, SERVICE_PORT=str(port))
    assert result.returncode == 1
    assert one_line(result) == f"unhealthy: http://127.0.0.1:{port}/health answered 502"


def test_a_long_error_is_cut_to_one_short_line(server: _Server, tmp_path: Path) -> None:
    server.status = 503
    server.body = {"database": "unhealthy", "database_error": "x\n" * 5000}
    result = run_check(tmp_path, SERVICE_PORT=str(server.server_address[1]))
    assert result.returncode == 1
    line = one_line(result)
    assert len(line) <= 400
    assert line.endswith("...")


def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    result = run_check(tmp_path, SERVICE_PORT=str(port))
    assert result.returncode == 1
    assert one_line(result).startswith(f"unreachable: http://127.0.0.1:{port}/health: ")


def test_a_server_that_never_answers_fails_within_the_timeout(
    server: _Server, tmp_path: Path
) -> None:
    server.stall.set()
    port = server.server_address[1]
    result = run_check(tmp_path, "--timeout", "0.5", SERVICE_PORT=str(port))
    assert result.returncode == 1
    assert one_line(result) == (
        f"unhealthy: http://127.0.0.1:{port}/health: no answer within 0.5 s"
    )


def test_a_proxy_in_the_environment_is_not_used(server: _Server, tmp_path: Path) -> None:
    # A proxy that does not exist: the probe of the loopback address must not try it.
    dead = f"http://127.0.0.1:{free_port()}"
    port = str(server.server_address[1])
    result = run_check(tmp_path, SERVICE_PORT=port, http_proxy=dead, HTTP_PROXY=dead)
    assert result.returncode == 0, result.stdout
    assert server.paths == ["/health"]


def test_a_bad_setting_is_one_line(tmp_path: Path) -> None:
    result = run_check(tmp_path, SERVICE_PORT="eighty")
    assert result.returncode == 1
    assert one_line(result) == (
        "config error: service.port = 'eighty' (from SERVICE_PORT): must be an integer"
    )


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8001/health"),
        ("::", "http://[::1]:8001/health"),
        ("127.0.0.1", "http://127.0.0.1:8001/health"),
        ("10.1.2.3", "http://10.1.2.3:8001/health"),
        ("fd00::5", "http://[fd00::5]:8001/health"),
        ("persistence.internal", "http://persistence.internal:8001/health"),
    ],
)
def test_health_url_probes_where_the_service_binds(host: str, url: str) -> None:
    assert health_url(ServiceSettings(host=host, port=8001)) == url


# --- against the service under gunicorn ----------------------------------------------------


@pytest.fixture
def service_from_config(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """gunicorn bound by the service's settings alone: a config file names host and port."""
    port = free_port()
    config = config_file(tmp_path, port)
    log = tmp_path / "gunicorn.log"
    env = service_env(
        tmp_path,
        PERSISTENCE_CONFIG=str(config),
        # A database that refuses connections at once: /health answers 503.
        DB_DRIVER="mysql",
        DB_HOST="127.0.0.1",
        DB_PORT=str(free_port()),
        HEALTH_CHECK_INTERVAL="0.5",
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            gunicorn_command(),
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        yield config, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_gunicorn_with_an_unreachable_database_is_unhealthy_in_one_line(
    service_from_config: tuple[Path, int], tmp_path: Path
) -> None:
    config, port = service_from_config
    results: list[subprocess.CompletedProcess[str]] = []

    def answered() -> bool:
        results.append(run_check(tmp_path, "--timeout", "2", PERSISTENCE_CONFIG=str(config)))
        return "answered" in results[-1].stdout

    assert wait_for(answered, timeout=30), results[-1].stdout
    result = results[-1]
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"unhealthy: http://127.0.0.1:{port}/health answered 503 (")
    assert "database unhealthy" in line
    assert "Connection refused" in line or "Can't connect" in line


def test_gunicorn_on_sqlite_is_healthy(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path, SERVICE_HOST="127.0.0.1", SERVICE_PORT=str(port))
    process = subprocess.Popen(
        gunicorn_command(),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        results: list[subprocess.CompletedProcess[str]] = []

        def healthy() -> bool:
            results.append(run_check(tmp_path, SERVICE_HOST="127.0.0.1", SERVICE_PORT=str(port)))
            return results[-1].returncode == 0

        assert wait_for(healthy, timeout=30), results[-1].stdout
        assert one_line(results[-1]).startswith(f"healthy: http://127.0.0.1:{port}/health")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)


def test_gunicorn_serving_https_is_probed_over_https(tmp_path: Path) -> None:
    """A certificate signed by some CA, for a name that is not the loopback address: the
    probe trusts exactly that certificate, wherever it reaches it."""
    ca = make_ca(tmp_path, "probe-ca")
    leaf = make_leaf(tmp_path, "probe-leaf", ca, alt_names="DNS:persistence.example")
    port = free_port()
    tls = {
        "SERVICE_HOST": "127.0.0.1",
        "SERVICE_PORT": str(port),
        "SERVICE_TLS_CERT": str(leaf.cert),
        "SERVICE_TLS_KEY": str(leaf.key),
    }
    process = subprocess.Popen(
        gunicorn_command(),
        cwd=tmp_path,
        env=service_env(tmp_path, **tls),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        results: list[subprocess.CompletedProcess[str]] = []

        def healthy() -> bool:
            results.append(run_check(tmp_path, **tls))
            return results[-1].returncode == 0

        assert wait_for(healthy, timeout=30), results[-1].stdout
        assert one_line(results[-1]).startswith(f"healthy: https://127.0.0.1:{port}/health")
        other = make_self_signed(tmp_path, "impostor", "IP:127.0.0.1")
        impostor = {"SERVICE_TLS_CERT": str(other.cert), "SERVICE_TLS_KEY": str(other.key)}
        refused = run_check(tmp_path, **{**tls, **impostor})
        assert refused.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in one_line(refused)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
