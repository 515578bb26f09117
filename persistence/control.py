"""The control channel between the worker processes of one gunicorn master.

Each worker keeps its own buffer. So that ``POST /flush``, ``/stats`` and
``/health`` describe the whole service, every worker listens on a Unix
socket ``<directory>/worker-<pid>.sock`` and answers one request per
connection: a JSON line ``{"op": "<name>"}`` in, a JSON line out. The worker
that receives an HTTP request asks its peers in parallel and combines their
answers with its own.

The directory belongs to one gunicorn master: the master creates it with
:func:`create_control_directory` (a fresh name, mode 0700) and hands its path
to the workers, which refuse to use it unless :func:`check_private_directory`
finds it is still a directory of their own user that nobody else can enter;
whoever can create a socket in it can answer for a worker.

Threading contract: the server runs one accepting thread and one short-lived
thread per connection; ``handler`` is called from those threads and must
be thread-safe (the service's methods are). :func:`ask_peers` may be called
from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

Handler = Callable[[str], dict[str, Any]]
MAX_MESSAGE = 1 << 20
DIRECTORY_PREFIX = "persistence-service-"
# The longest path of a Unix socket (sun_path, less its final NUL) on Linux.
MAX_SOCKET_PATH = 107


class ControlDirectoryError(RuntimeError):
    """The control directory is missing, or others than this user could enter it."""


def create_control_directory(uid: int | None = None, gid: int | None = None) -> Path:
    """Create a new private directory for the control sockets, in the temporary directory.

    ``mkdtemp`` picks a name nobody can have created first and makes it 0700.
    ``uid``/``gid``: the user and group the workers run as when it is not this
    process's (gunicorn's ``user``/``group`` settings); the directory is given to them.
    """
    path = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
    if len(os.fsencode(path / "worker-4194304.sock")) > MAX_SOCKET_PATH:
        path.rmdir()
        raise ControlDirectoryError(
            f"control directory {path}: too long a path for Unix sockets "
            f"({MAX_SOCKET_PATH} bytes); set TMPDIR to a shorter directory"
        )
    if uid is not None and gid is not None and (uid, gid) != (os.geteuid(), os.getegid()):
        os.chown(path, uid, gid)
    return path


def check_private_directory(path: Path) -> None:
    """Raise :class:`ControlDirectoryError` unless ``path`` is private to this user.

    Private: a real directory (not a symbolic link), owned by this process's
    effective user, with no permission at all for group and others.
    """
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ControlDirectoryError(f"control directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to this process (uid {os.geteuid()})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):o}: group and others may use it"
    else:
        return
    raise ControlDirectoryError(f"control directory {path} {problem}; refusing to use it")


class ControlServer:
    """This worker's end of the control channel."""

    def __init__(self, directory: Path, handler: Handler) -> None:
        self.directory = directory
        self.path = directory / f"worker-{os.getpid()}.sock"
        self._handler = handler
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Listen on this worker's socket; :class:`ControlDirectoryError` if the directory
        is not private to this user (see :func:`check_private_directory`)."""
        check_private_directory(self.directory)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._serve, name="control-accept", daemon=True).start()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def peers(self) -> list[Path]:
        """The sockets of the other workers."""
        return sorted(p for p in self.directory.glob("worker-*.sock") if p != self.path)

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = orjson.loads(_read_line(conn))
                reply = self._handler(str(request["op"]))
            except Exception as exc:
                log.exception("control request failed")
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(orjson.dumps(reply, default=str) + b"\n")


def ask(path: Path, op: str, timeout: float) -> dict[str, Any]:
    """Send ``op`` to the worker listening at ``path``; its answer, or ``{"error": ...}``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(orjson.dumps({"op": op}) + b"\n")
            return orjson.loads(_read_line(sock))
    except (ConnectionRefusedError, FileNotFoundError):
        # The worker died without removing its socket: forget it.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return {"error": "gone"}
    except (OSError, ValueError) as exc:
        return {"error": f"no answer from {path.name} ({exc or type(exc).__name__})"}


def ask_peers(server: ControlServer | None, op: str, timeout: float) -> list[dict[str, Any]]:
    """Ask every other worker in parallel; answers of workers that are gone are dropped."""
    peers = server.peers() if server is not None else []
    if not peers:
        return []
    with ThreadPoolExecutor(max_workers=len(peers)) as pool:
        answers = list(pool.map(lambda p: ask(p, op, timeout), peers))
    return [answer for answer in answers if answer.get("error") != "gone"]


def _read_line(sock: socket.socket) -> bytes:
    chunks = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or size > MAX_MESSAGE:
            break
    return b"".join(chunks)
