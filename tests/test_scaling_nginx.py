"""Two instances behind nginx, configured by the shipped deploy/nginx.conf with test ports.

nginx (nginx-light) runs in the foreground from a temporary directory and is stopped
by its process id. Without nginx the tests skip with the reason; under ``CI=true``
they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from persistence_client import SyncPersistenceClient

from tests.conftest import IN_CI, Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, REPO, Server, free_port, wait_for

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

SAMPLE = REPO / "deploy" / "nginx.conf"
FLEET = REPO / "deploy" / "fleet.sh"
QUICK = {"BUFFER_FLUSH_INTERVAL": "0.5", "SERVICE_GRACEFUL_TIMEOUT": "20"}


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    directory: Path

    def error_log(self) -> str:
        return (self.directory / "error.log").read_text(encoding="utf-8", errors="replace")


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        reason = "nginx is not installed (apt-get install nginx-light)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return found


def site_config(first: int, second: int, listen: int) -> str:
    """The shipped sample with the test's ports in place of 8001 and 80, and its commented
    line for a second instance in use, on the test's port."""
    text = SAMPLE.read_text(encoding="utf-8")
    for old, new in (
        ("server 127.0.0.1:8001 ", f"server 127.0.0.1:{first} "),
        ("# server 127.0.0.1:8002 ", f"server 127.0.0.1:{second} "),
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
    ):
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r} once"
        text = text.replace(old, new)
    return text


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int, int], Nginx]]:
    """Start nginx in front of two instances (their ports); stopped by its pid at the end."""
    binary = nginx_binary()
    started: list[Nginx] = []

    def start(first: int, second: int) -> Nginx:
        directory = tmp_path / "nginx"
        directory.mkdir()
        port = free_port()
        (directory / "persistence.conf").write_text(site_config(first, second, port))
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(
            f"    {name}_temp_path {directory}/{name};\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (directory / "nginx.conf").write_text(
            f"daemon off;\n{user}worker_processes 1;\npid {directory}/nginx.pid;\n"
            f"error_log {directory}/error.log notice;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {directory}/access.log;\n{temp_paths}"
            f"    include {directory}/persistence.conf;\n}}\n"
        )
        process = subprocess.Popen(
            [
                binary,
                "-p",
                str(directory),
                "-c",
                str(directory / "nginx.conf"),
                "-e",
                str(directory / "error.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proxy = Nginx(process, f"http://127.0.0.1:{port}", directory)
        started.append(proxy)

        def answers() -> bool:
            assert process.poll() is None, proxy.error_log()
            try:
                requests.get(proxy.url + "/", timeout=2)
            except requests.ConnectionError:
                return False
            return True

        assert wait_for(answers, timeout=10), proxy.error_log()
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                proxy.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.process.kill()
                proxy.process.wait()


def received(server: Server) -> int:
    return server.get(f"{API}/stats").json()["performance"]["tasks_received"]


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def fleet(operation: str, *servers: Server) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        [str(FLEET), operation, *(s.url for s in servers)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_nginx_routes_a_session_to_one_instance_and_holds_batches_in_memory(
    start_server: Callable[..., Server],
    mysql_env: dict[str, str],
    nginx: Callable[[int, int], Nginx],
) -> None:
    first = start_server(**mysql_env, **QUICK, SERVICE_INSTANCE_ID="first")
    second = start_server(**mysql_env, **QUICK, SERVICE_INSTANCE_ID="second")
    proxy = nginx(port_of(first), port_of(second))
    instances = (first, second)

    for _ in range(6):
        sid = new_session_id()
        before = [received(s) for s in instances]
        for _ in range(3):
            body = {"tasks": [task(sid) for _ in range(10)]}
            response = requests.post(
                f"{proxy.url}{API}/tasks/batch",
                json=body,
                headers={"X-Session-ID": sid},
                timeout=5,
            )
            assert response.status_code == 200
        gained = sorted(received(s) - b for s, b in zip(instances, before, strict=True))
        assert gained == [0, 30], "the batches of one session went to both instances"

    # Requests without a session spread over the instances.
    before = [received(s) for s in instances]
    for _ in range(20):
        body = {"tasks": [task(new_session_id())]}
        assert requests.post(f"{proxy.url}{API}/tasks/batch", json=body, timeout=5).ok
    assert all(received(s) > b for s, b in zip(instances, before, strict=True))

    # A batch of about 1 MB is held in memory, not spooled to a temporary file.
    sid = new_session_id()
    big = {"tasks": [task(sid, source_text="x" * 1000) for _ in range(1000)]}
    response = requests.post(f"{proxy.url}{API}/tasks/batch", json=big, timeout=10)
    assert response.status_code == 200
    assert "buffered to a temporary file" not in proxy.error_log()

    # The fleet script asks each instance itself.
    status, answers = fleet("flush", first, second)
    assert status == 0
    assert [a["answer"]["instance_id"] for a in answers] == ["first", "second"]
    assert all(a["answer"]["status"] == "flushed" for a in answers)
    second.stop()
    status, answers = fleet("health", first, second)
    assert status == 1
    assert answers[0]["http_status"] == 200
    assert (answers[1]["http_status"], answers[1]["answer"]) == (0, None)


def test_a_rolling_restart_of_one_instance_under_load_loses_nothing(
    start_server: Callable[..., Server],
    mysql_env: dict[str, str],
    mysql_db: Database,
    nginx: Callable[[int, int], Nginx],
) -> None:
    first = start_server(**mysql_env, **QUICK, SERVICE_INSTANCE_ID="first")
    second = start_server(**mysql_env, **QUICK, SERVICE_INSTANCE_ID="second")
    proxy = nginx(port_of(first), port_of(second))
    client = SyncPersistenceClient(base_url=proxy.url, batch_size=50, linger=0.05, timeout=5)
    sids = [new_session_id() for _ in range(8)]
    task_ids: list[str] = []
    stop = threading.Event()

    def load() -> None:
        for sid in sids:
            client.persist_session(session(session_id=sid))
        n = 0
        while not stop.is_set():
            sid = sids[n % len(sids)]
            tasks = [task(sid, task_id=f"{sid[:8]}-{n}-{i}") for i in range(10)]
            assert client.persist_tasks(tasks)
            task_ids.extend(t["task_id"] for t in tasks)
            n += 1
            time.sleep(0.02)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert wait_for(lambda: received(first) > 200 and received(second) > 200, timeout=30)
        assert first.stop() == 0  # SIGTERM: the instance writes its buffer, then exits
        assert "shutdown flush wrote" in first.output()
        restarted = start_server(
            port=port_of(first), **mysql_env, **QUICK, SERVICE_INSTANCE_ID="first"
        )
        assert wait_for(lambda: received(restarted) > 100, timeout=30), (
            "nginx sent nothing to the restarted instance"
        )
    finally:
        stop.set()
        loader.join(30)
        client.close(timeout=30)
    stats = client.stats
    assert (stats.given_up, stats.refused, stats.pending) == (0, 0, 0)
    assert stats.sent == stats.submitted == len(sids) + len(task_ids)
    # nginx sent every request that failed on the stopping instance to the other one:
    # the client never saw a failure.
    assert (stats.retries, stats.failures_by_cause) == (0, {})
    for server in (restarted, second):
        assert server.post(f"{API}/flush").status_code == 200
    stored = {row[0] for row in mysql_db.query("SELECT task_id FROM translation_tasks")}
    missing = set(task_ids) - stored
    assert not missing, f"{len(missing)} acknowledged tasks are not in the database"
    assert mysql_db.count("translation_sessions") == len(sids)
