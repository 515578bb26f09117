"""Starting the service under gunicorn for end-to-end tests, and talking HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1/persistence"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def post(self, path: str, body: Any = None) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=5)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def gunicorn_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(REPO / "gunicorn.conf.py"),
        *args,
        "wsgi:app",
    ]


def service_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "SERVICE_", "BUFFER_", "LOG_", "PERSISTENCE_"))
    }
    base.update(PYTHONPATH=str(REPO), LOG_FILE="", DB_SQLITE_PATH=str(tmp_path / "service.db"))
    base.update(env)
    return base


def wait_until_answering(server: Any, timeout: float = 30.0) -> Any:
    """Return ``server`` once its /health answers (200 or 503); fail if gunicorn exits
    first or stays silent. ``server`` has ``process``, ``get`` and ``output``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited early:\n{server.output()}")
        try:
            if server.get("/health").status_code in (200, 503):
                return server
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer in {timeout:g} s:\n{server.output()}")


def wait_for(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
