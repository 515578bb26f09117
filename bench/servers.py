"""Starting and stopping gunicorn instances, and reading their worker's CPU time and memory.

Every instance binds a free 127.0.0.1 port, runs in a scratch working
directory (no config.yaml there, so only defaults and the environment
apply), with ``PYTHONPATH`` set to the repository, the way the end-to-end
tests start the service. The service's settings come from the environment
(``DB_DRIVER=mysql``, ``BUFFER_FLUSH_INTERVAL`` ...), with ``LOG_FILE`` empty.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1/persistence"
TASKS_PATH = f"{API}/tasks/batch"
SESSIONS_PATH = f"{API}/sessions/batch"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """A gunicorn instance did not start or answered unexpectedly."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(**env: str) -> dict[str, str]:
    """The bench's environment without any service setting, plus ``env``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "SERVICE_", "BUFFER_", "LOG_", "PERSISTENCE_", "HEALTH_"))
    }
    base.update(PYTHONPATH=str(REPO), LOG_FILE="")
    base.update(env)
    return base


@dataclass
class Gunicorn:
    """One running gunicorn master with its single worker."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    host: str = "127.0.0.1"

    # -- HTTP -------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30
    ) -> tuple[int, Any]:
        """One request on a new connection; returns (status, decoded JSON or None)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = None if body is None else orjson.dumps(body)
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, payload, headers)
            response = conn.getresponse()
            data = response.read()
            try:
                decoded = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                decoded = None
            return response.status, decoded
        finally:
            conn.close()

    def post_ok(self, path: str, body: Any = None, timeout: float = 30) -> Any:
        status, data = self.request("POST", path, body, timeout)
        if status != 200:
            raise ServerError(f"{self.name}: POST {path} answered {status}: {data}")
        return data

    def stats(self) -> dict[str, Any]:
        status, data = self.request("GET", f"{API}/stats", timeout=10)
        if status != 200:
            raise ServerError(f"{self.name}: GET stats answered {status}: {data}")
        return data

    def flush(self, timeout: float = 600) -> dict[str, Any]:
        """POST /flush and wait for it (a large buffer takes a while)."""
        return self.post_ok(f"{API}/flush", timeout=timeout)

    # -- the worker process -----------------------------------------------------------------

    def worker_pid(self) -> int:
        """The pid of the worker (the master's child)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = _children(self.process.pid)
            if children:
                return children[0]
            time.sleep(0.05)
        raise ServerError(f"{self.name}: no worker process under master {self.process.pid}")

    def worker_cpu_seconds(self) -> float:
        """User + system CPU time the workers (all of them) have used so far."""
        self.worker_pid()  # waits for the first worker
        total = 0.0
        for pid in _children(self.process.pid):
            try:
                total += cpu_seconds(pid)
            except OSError:  # a worker that just exited
                continue
        return total

    def worker_rss_bytes(self) -> int:
        """The worker's resident set size (VmRSS of /proc/<pid>/status)."""
        return rss_bytes(self.worker_pid())

    # -- life cycle -------------------------------------------------------------------------

    def wait_ready(self, path: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited early:\n{self.tail()}")
            try:
                status, _ = self.request("GET", path, timeout=2)
                if status in (200, 503):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise ServerError(f"{self.name} did not answer in {timeout:g} s:\n{self.tail()}")

    def stop(self, fast: bool = False, timeout: float = 60) -> None:
        """SIGTERM (the service flushes what it holds) or, with ``fast``, SIGKILL.

        ``fast`` is for instances whose buffer is not worth writing (their database
        is dropped at the end of the run anyway).
        """
        if self.process.poll() is not None:
            return
        if fast:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        pass
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is fields[0]; utime and stime are fields 14 and 15
    # of the whole line, i.e. fields[11] and fields[12] here.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServerError(f"no VmRSS for pid {pid}")


class Servers:
    """Starts gunicorn instances in a scratch directory and stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Gunicorn] = []

    def _start(self, name: str, args: list[str], env: dict[str, str], ready: str) -> Gunicorn:
        port = free_port()
        log = self.workdir / f"{name}-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", *args],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Gunicorn(name, process, port, log)
        self.running.append(server)
        try:
            server.wait_ready(ready)
        except ServerError:
            server.stop(fast=True)
            raise
        return server

    def service(self, name: str, db_env: dict[str, str], **settings: str) -> Gunicorn:
        """The real service under the repository's gunicorn.conf.py (1 worker, gthread)."""
        env = clean_environment(DB_DRIVER="mysql", **db_env, **settings)
        args = ["-c", str(REPO / "gunicorn.conf.py"), "wsgi:app"]
        return self._start(name, args, env, "/health")

    def floor(
        self, name: str = "parse-only", threads: int = 8, access_log: bool = True
    ) -> Gunicorn:
        """The parse-only app with the service's gunicorn settings: 1 worker, gthread.

        gunicorn.conf.py writes an access log line per request to stdout; so does this
        instance unless ``access_log`` is false.
        """
        args = [
            "-w",
            "1",
            "-k",
            "gthread",
            "--threads",
            str(threads),
            "--error-logfile",
            "-",
            "--no-control-socket",
        ]
        if access_log:
            args += ["--access-logfile", "-"]
        return self._start(name, [*args, "bench.floor_app:app"], clean_environment(), "/health")

    def stop_all(self) -> None:
        for server in self.running:
            server.stop(fast=True)
        self.running.clear()
