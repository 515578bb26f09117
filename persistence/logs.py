"""Console and rotating-file logging of the service, configured once per process.

Log lines carry ids, counts and timings only: records' texts are never logged.

Several gunicorn workers write the same log file. Each has its own handler,
so rotation is coordinated through the file system (:class:`SharedRotatingFileHandler`):
one process at a time writes or rotates, under an exclusive ``flock`` on
``<file>.lock``, and a process whose open file was rotated away by another
reopens the file at the path before it writes.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from persistence.config import LoggingSettings

# Marks the handlers this module installed, so configuring again replaces them.
_OWNED = "_persistence_handler"


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log file that several processes write and rotate together.

    Each record is written under an exclusive ``flock`` on ``<file>.lock``, held
    by one process at a time. Under it the handler first reopens the file at
    the path if it no longer is the file it holds (another process renamed it
    to ``.1``, or an operator removed it), then rotates if this record would
    pass ``maxBytes`` (the size is that of the file, whoever wrote it), then
    writes. Within one process, logging's handler lock serialises the threads.

    The lock file is opened per process (again after a fork): a ``flock``
    taken through a descriptor shared across a fork would not exclude the
    other process.
    """

    def __init__(self, filename: str | os.PathLike[str], max_bytes: int, backup_count: int) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self._lock_path = self.baseFilename + ".lock"
        self._lock_fd: int | None = None
        self._lock_pid = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fd = self._lock_file()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            self.handleError(record)
            return
        try:
            self._reopen_if_rotated()
            super().emit(record)  # rotates first when this record would pass max_bytes
        except OSError:
            self.handleError(record)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        # The handler's own lock: no thread of this process is inside emit() meanwhile.
        with self.lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            super().close()

    def _lock_file(self) -> int:
        if self._lock_fd is None or self._lock_pid != os.getpid():
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._lock_pid = os.getpid()
        return self._lock_fd

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return  # opened by the write that follows
        try:
            at_path = os.stat(self.baseFilename)
        except FileNotFoundError:
            at_path = None
        held = os.fstat(self.stream.fileno())
        if at_path is None or (at_path.st_dev, at_path.st_ino) != (held.st_dev, held.st_ino):
            self.stream.close()
            self.stream = self._open()


def configure_logging(settings: LoggingSettings) -> None:
    """Send the ``persistence`` and ``apscheduler`` loggers to stderr and the log file.

    An empty ``logging.file`` logs to stderr only.
    """
    formatter = logging.Formatter(settings.format)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        path = Path(settings.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(SharedRotatingFileHandler(path, settings.max_bytes, settings.backup_count))
    for name in ("persistence", "apscheduler"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _OWNED, False)]:
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            setattr(handler, _OWNED, True)
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(settings.level)
        logger.propagate = False
    # APScheduler logs every job run at INFO; only its warnings matter to operators.
    level = max(logging.WARNING, logging.getLevelName(settings.level))
    logging.getLogger("apscheduler").setLevel(level)
