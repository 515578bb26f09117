"""Console and rotating-file logging of the service, configured once per process.

Log lines carry ids, counts and timings only: records' texts are never logged.

``logging.format`` chooses the line format: ``text`` (``<time> <LEVEL>
[<pid>] <logger>: <message>``, and `` request_id=<id>`` at the end of a line
logged while serving a request) or ``json`` (one object per line, see
:class:`JsonFormatter`). The id of the request being served is a context
variable (:data:`REQUEST_ID`) that the HTTP layer sets for each request;
every handler of this module adds it to the records it writes.

Several gunicorn workers write the same log file. Each has its own handler,
so rotation is coordinated through the file system (:class:`SharedRotatingFileHandler`):
one process at a time writes or rotates, under an exclusive ``flock`` on
``<file>.lock``, and a process whose open file was rotated away by another
reopens the file at the path before it writes.
"""

from __future__ import annotations

import contextvars
import fcntl
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from gunicorn import glogging

from persistence.config import LoggingSettings

# Marks the handlers this module installed, so configuring again replaces them.
_OWNED = "_persistence_handler"

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

#: The id of the request the current thread serves (None outside a request).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "persistence_request_id", default=None
)


def new_request_id() -> str:
    """A fresh request id: 32 random hexadecimal digits (what ``uuid4().hex`` gives less
    its version digits, in a fifth of the time)."""
    return os.urandom(16).hex()


class RequestIdFilter(logging.Filter):
    """Stamps each record with ``request_id``: the id of the request being served, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """Today's line format; a line logged while serving a request ends in ``request_id=<id>``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO-8601 UTC, milliseconds), ``level``,
    ``logger``, ``pid``, ``message``, ``request_id`` (null outside a request), and
    ``exception`` (the traceback, when the record carries one)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        millis = int((record.created - seconds) * 1000)
        entry = {
            "time": f"{stamp}.{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        http = getattr(record, "http", None)
        if http is not None:
            entry["http"] = http
        # default=str: a message argument orjson cannot encode must not lose the line.
        return orjson.dumps(entry, default=str).decode()


class JsonGunicornLogger(glogging.Logger):
    """gunicorn's error and access logs as JSON lines, for ``logging.format: json``.

    gunicorn.conf.py selects it as ``logger_class``. The lines have the
    fields of :class:`JsonFormatter`; an access line's ``message`` is the
    line ``access_log_format`` makes, and it adds ``request_id`` (from the
    response's ``X-Request-ID``) and ``http``: ``method``, ``path``,
    ``status``, ``bytes``, ``duration_ms``, ``remote``.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        status = str(atoms["s"])
        extra = {
            "request_id": atoms.get("{x-request-id}o"),
            "http": {
                "method": atoms["m"],
                "path": atoms["U"],
                "status": int(status) if status.isdigit() else status,
                "bytes": atoms["B"],
                "duration_ms": round(atoms["D"] / 1000, 3),
                "remote": atoms["h"],
            },
        }
        try:
            self.access_log.info(
                self.cfg.access_log_format, self.atoms_wrapper_class(atoms), extra=extra
            )
        except Exception:  # noqa: BLE001 - as in gunicorn's own: a log line never fails a request
            self.exception("writing the access log failed")


def formatter_for(settings: LoggingSettings) -> logging.Formatter:
    """The formatter ``logging.format`` names."""
    return JsonFormatter() if settings.format == "json" else TextFormatter()


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
    formatter = formatter_for(settings)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        path = Path(settings.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(SharedRotatingFileHandler(path, settings.max_bytes, settings.backup_count))
    for handler in handlers:
        setattr(handler, _OWNED, True)
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
    for name in ("persistence", "apscheduler"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, _OWNED, False)]:
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(settings.level)
        logger.propagate = False
    # APScheduler logs every job run at INFO; only its warnings matter to operators.
    level = max(logging.WARNING, logging.getLevelName(settings.level))
    logging.getLogger("apscheduler").setLevel(level)
