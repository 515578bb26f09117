"""Console and rotating-file logging of the service, configured once per process.

Log lines carry ids, counts and timings only: records' texts are never logged.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from persistence.config import LoggingSettings

# Marks the handlers this module installed, so configuring again replaces them.
_OWNED = "_persistence_handler"


def configure_logging(settings: LoggingSettings) -> None:
    """Send the ``persistence`` and ``apscheduler`` loggers to stderr and the log file."""
    formatter = logging.Formatter(settings.format)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.file:
        path = Path(settings.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                path,
                maxBytes=settings.max_bytes,
                backupCount=settings.backup_count,
                encoding="utf-8",
            )
        )
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
