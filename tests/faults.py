"""Fault injection for the store and the journal: real components that fail when told to.

The store's one gate to the driver is ``Store._run``; the journal's is its
:class:`~persistence.journal.FileSystem`. Both doubles run the real operation
unless a rule or an armed fault says otherwise, so everything else stays real.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persistence.journal import FileSystem
from persistence.store import Store, StoreError

Predicate = Callable[[str, tuple[Any, ...]], bool]


class FaultyStore(Store):
    """A real store; matching driver calls fail before (or after) they run.

    ``fail_when(predicate, error, times=None, after=False)``: the next ``times``
    calls (every call when None) for which ``predicate(name, args)`` holds raise
    ``error`` (a StoreError as is, any other exception as the store would
    translate it). With ``after``, the call runs first: the database did the
    work, but the caller hears that it failed.

    Thread-safe like the store it stands for (a flush writes from several
    threads): matching a call to a rule and counting it down happen under one
    lock, so a rule for ``times`` calls fails exactly that many, whichever
    threads make them; the calls themselves run outside it.
    """

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.rules: list[list[Any]] = []
        self._rules_lock = threading.Lock()

    def fail_when(
        self,
        predicate: Predicate,
        error: Exception,
        times: int | None = None,
        after: bool = False,
    ) -> None:
        with self._rules_lock:
            self.rules.append([predicate, error, times, after])

    def clear(self) -> None:
        with self._rules_lock:
            self.rules.clear()

    def _run(self, func: Any, *args: Any) -> Any:
        name = getattr(func, "__name__", "")
        with self._rules_lock:
            rule = next((r for r in self.rules if r[0](name, args)), None)
            if rule is not None and rule[2] is not None:
                rule[2] -= 1
                if rule[2] <= 0:
                    self.rules.remove(rule)
        if rule is not None:
            if rule[3]:
                super()._run(func, *args)
            error = rule[1]
            raise error if isinstance(error, StoreError) else self._translate(error)
        return super()._run(func, *args)


def writes_to(table: str, key: str | None = None) -> Predicate:
    """Matches an ``executemany`` into ``table`` (holding ``key`` in its first column)."""

    def match(name: str, args: tuple[Any, ...]) -> bool:
        # DBUtils wraps the cursor's methods, so a call is known by its arguments.
        if len(args) != 2 or not isinstance(args[0], str) or f"INTO {table} " not in args[0]:
            return False
        return key is None or any(row[0] == key for row in args[1])

    return match


def statement_matches(text: str) -> Predicate:
    """Matches any statement whose SQL contains ``text``."""
    return lambda name, args: bool(args) and isinstance(args[0], str) and text in args[0]


def commits() -> Predicate:
    return lambda name, args: not args and name == "commit"


class FaultyFiles(FileSystem):
    """The journal's file operations; ``arm(op)`` makes the next ``op`` fail once.

    Operations: write, short_write (half the frame reaches the file, then
    ENOSPC), fsync, open, fsync_dir. ``pause_dir_fsync``, when set to an Event,
    makes directory fsyncs wait for it.
    """

    def __init__(self) -> None:
        self.armed: dict[str, OSError] = {}
        self.calls: Counter[str] = Counter()
        self.pause_dir_fsync: threading.Event | None = None

    def arm(self, operation: str, code: int = errno.EIO) -> None:
        self.armed[operation] = OSError(code, os.strerror(code))

    def _check(self, operation: str) -> None:
        self.calls[operation] += 1
        error = self.armed.pop(operation, None)
        if error is not None:
            raise error

    def write(self, fd: int, data: bytes) -> int:  # type: ignore[override]
        self._check("write")
        if self.armed.pop("short_write", None) is not None:
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:  # type: ignore[override]
        self._check("fsync")
        os.fsync(fd)

    def open_segment(self, path: Path) -> int:  # type: ignore[override]
        self._check("open")
        return FileSystem.open_segment(path)

    def fsync_dir(self, path: Path) -> None:  # type: ignore[override]
        if self.pause_dir_fsync is not None:
            assert self.pause_dir_fsync.wait(10)
        self._check("fsync_dir")
        FileSystem.fsync_dir(path)
