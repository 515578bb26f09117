"""At start, make sure the service can write where its settings say it writes.

The SQLite file (``database.sqlite_path``, with the files SQLite keeps next
to it) and the journal (``buffer.journal_dir``) need a directory this
process can create files in. In a container that directory is usually a
volume or a bind mount, and a host directory owned by root is not writable
by the image's user: SQLite would say only "unable to open database file",
at every flush, while the service answered 503. Checked at start instead,
the failure is one log line naming the directory, its owner, the uid the
service runs as and the fix, and the worker exits with gunicorn's "worker
failed to boot" status, which stops gunicorn.

Threading contract: :func:`require_writable` runs once per worker, in
``WorkerRuntime.start``, before any thread of the service is started.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from pathlib import Path

from persistence.config import Settings

log = logging.getLogger(__name__)

# gunicorn's WORKER_BOOT_ERROR: on this exit status of a worker the master stops
# instead of starting the worker again and again.
BOOT_FAILURE_STATUS = 3


class DataDirectoryError(Exception):
    """A directory the service writes to is not writable; the message is one line."""


def data_directories(settings: Settings) -> list[tuple[str, Path]]:
    """The (setting, directory) pairs the service creates files in with these settings."""
    directories = []
    if settings.database.driver == "sqlite":
        sqlite_file = Path(settings.database.sqlite_path).expanduser()
        directories.append(("database.sqlite_path", sqlite_file.parent))
    if settings.buffer.durability == "journal":
        directories.append(("buffer.journal_dir", Path(settings.buffer.journal_dir)))
    return directories


def check_writable(setting: str, directory: Path) -> None:
    """Raise :class:`DataDirectoryError` unless files can be created in ``directory``.

    A directory that does not exist yet is created by the service later; then
    its nearest existing parent must be writable. The test creates and removes
    a file, so that ownership, permissions, ACLs, security modules and
    read-only mounts all count.
    """
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
    except OSError as exc:
        raise DataDirectoryError(_explain(setting, existing, exc)) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_sqlite_file(path: Path) -> None:
    """Raise :class:`DataDirectoryError` if the SQLite file exists but cannot be written."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataDirectoryError(_explain("database.sqlite_path", path, exc)) from None
    os.close(fd)


def require_writable(settings: Settings) -> None:
    """Log one line and exit with :data:`BOOT_FAILURE_STATUS` if a data directory is not
    writable by this process; return quietly otherwise."""
    try:
        for setting, directory in data_directories(settings):
            check_writable(setting, directory)
        if settings.database.driver == "sqlite":
            check_sqlite_file(Path(settings.database.sqlite_path).expanduser())
    except DataDirectoryError as exc:
        log.critical("%s", exc)
        raise SystemExit(BOOT_FAILURE_STATUS) from None


def _explain(setting: str, path: Path, exc: OSError) -> str:
    """One line: what cannot be written, whose it is, who we are, and what to do."""
    if exc.errno == errno.EROFS:
        return (
            f"cannot write to {path} ({setting}): read-only file system; mount a writable "
            f"volume there (e.g. docker run -v persistence-data:{path})"
        )
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return f"cannot write to {path} ({setting}): {exc.strerror}"
    uid, gid = os.geteuid(), os.getegid()
    try:
        info = os.stat(path)
    except OSError:
        owner = "an owner this process cannot see"
        fix_owner = ""
    else:
        mode = stat.S_IMODE(info.st_mode)
        owner = f"uid {info.st_uid}, gid {info.st_gid}, mode {mode:o}"
        fix_owner = (
            f", or run the service as its owner (docker run --user {info.st_uid}:{info.st_gid})"
        )
    return (
        f"cannot write to {path} ({setting}): it belongs to {owner}, and the service runs "
        f"as uid {uid}; give it to that user (chown -R {uid}:{gid} on the host directory "
        f"of a bind mount){fix_owner}"
    )
