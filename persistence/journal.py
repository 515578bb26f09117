"""The write-ahead journal of ``buffer.durability: journal``.

Every accepted batch is appended to the journal and fsynced before the 200
goes out; concurrent requests share one fsync (group commit). Records leave
the journal when a flush has written them: the flush rotates the journal
to a new segment when it drains the buffer, writes records that go back to
the buffer (failed or waiting) into the new segment, and then deletes the
old segments (a checkpoint).

Layout: ``<journal_dir>/<owner>/seg-<n>.log`` where ``<owner>`` is one
process (``w-<pid>-<random>``), holding an exclusive ``flock`` on
``<owner>/lock`` for its lifetime. A directory whose lock can be taken
belongs to a process that died: the next process to start adopts it
(replays it, writes what it holds into its own journal, deletes it).

Frame: ``<u32 length><u32 crc32>`` then ``length`` bytes of payload:
one byte of frame type (``B``: a batch accepted; ``R``: records put back by a
flush, or a snapshot at start), one byte of record type (``s``/``t``), then
the records as a JSON array. Replay merges every frame by the records'
arrival stamps (``ingest_seq``), so the order of frames never decides which
update of a row wins; the type only says where a frame came from.
Reading stops at a torn frame (the end of a segment cut by a crash) and
skips a frame whose checksum or content is wrong; both are counted, and
recovery never refuses to start.

Threading contract: :meth:`Journal.write` and :meth:`Journal.rotate` are
called with the buffer's lock held, which orders frames exactly like the
buffer's changes. :meth:`Journal.sync` is called without it, by any thread;
one caller at a time runs ``fsync`` for everyone waiting (``_cond``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from persistence.records import RECORD_TYPES, Record, RecordType

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
BATCH = ord("B")
RESTORE = ord("R")
_KIND_CODES = {kind.name: kind.name[0].encode() for kind in RECORD_TYPES}
_KINDS_BY_CODE = {kind.name[0].encode()[0]: kind for kind in RECORD_TYPES}
# A frame longer than this is taken as a corrupt length field.
MAX_FRAME = 1 << 30


@dataclass(frozen=True)
class Entry:
    """One frame read back: its type (BATCH or RESTORE), record type and records."""

    frame_type: int
    kind: RecordType
    records: list[Record]


@dataclass
class RecoveryReport:
    """What recovery found, for the log and /stats."""

    directories: int = 0
    frames: int = 0
    records: int = 0
    torn: int = 0
    corrupt: int = 0
    adopted: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "directories": self.directories,
            "frames": self.frames,
            "records": self.records,
            "torn_frames": self.torn,
            "corrupt_frames": self.corrupt,
        }


def encode_frame(frame_type: int, kind: RecordType, encoded: list[bytes]) -> bytes:
    """A frame holding records already encoded as JSON objects."""
    payload = b"".join(
        (bytes((frame_type,)), _KIND_CODES[kind.name], b"[", b",".join(encoded), b"]")
    )
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> Entry:
    frame_type, code = payload[0], payload[1]
    if frame_type not in (BATCH, RESTORE) or code not in _KINDS_BY_CODE:
        raise ValueError("unknown frame type")
    kind = _KINDS_BY_CODE[code]
    records = orjson.loads(payload[2:])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("frame does not hold a list of records")
    if any(set(record) != set(kind.columns) for record in records):
        raise ValueError("record columns do not match")
    return Entry(frame_type, kind, records)


def read_segment(path: Path, report: RecoveryReport) -> Iterator[Entry]:
    """The good frames of one segment file, counting torn and corrupt ones in ``report``."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            report.torn += 1
            return
        length, checksum = HEADER.unpack_from(data, offset)
        start, end = offset + HEADER.size, offset + HEADER.size + length
        if length > MAX_FRAME or length < 2:
            report.corrupt += 1  # the length itself is damaged: nothing after it can be found
            return
        if end > len(data):
            report.torn += 1
            return
        payload = data[start:end]
        offset = end
        if zlib.crc32(payload) != checksum:
            report.corrupt += 1
            continue
        try:
            entry = _decode(payload)
        except (ValueError, orjson.JSONDecodeError):
            report.corrupt += 1
            continue
        report.frames += 1
        report.records += len(entry.records)
        yield entry


class Journal:
    """One process's journal; see the module docstring for the contract."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)
        self.owner_dir = self.root / f"w-{os.getpid()}-{secrets.token_hex(3)}"
        self._lock_fd = -1
        self._fd = -1
        self._segment = 0
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._cond = threading.Condition()
        self._adopted_locks: list[int] = []
        self.fsyncs = 0

    def open(self) -> None:
        """Create and lock this process's directory and open its first segment."""
        self.owner_dir.mkdir(parents=True, exist_ok=False)
        self._lock_fd = os.open(self.owner_dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._open_segment(1)

    def recover(self, report: RecoveryReport) -> Iterator[Entry]:
        """Frames of every directory whose owner died, oldest segment first.

        Each adopted directory stays locked by this process until
        :meth:`forget_adopted` deletes it, so no other process replays it too.
        """
        for directory in sorted(self.root.glob("w-*")):
            if directory == self.owner_dir or not directory.is_dir():
                continue
            lock_fd = _try_lock(directory / "lock")
            if lock_fd is None:
                continue  # its owner is alive
            report.directories += 1
            report.adopted.append(directory)
            self._adopted_locks.append(lock_fd)
            for segment in sorted(directory.glob("seg-*.log")):
                yield from read_segment(segment, report)

    def forget_adopted(self, report: RecoveryReport) -> None:
        """Delete adopted directories, once their records are safe in this journal."""
        for directory in report.adopted:
            shutil.rmtree(directory, ignore_errors=True)
        for fd in self._adopted_locks:
            os.close(fd)
        self._adopted_locks.clear()
        _fsync_dir(self.root)

    def write(self, frame: bytes) -> int:
        """Append one encoded frame (buffer lock held); returns its sequence number."""
        try:
            _write_all(self._fd, frame)
        except OSError:
            # A partial frame may be on disk: continue in a fresh segment, so that the
            # frames written after it can still be read.
            self._open_segment(self._segment + 1)
            raise
        self._written += 1
        return self._written

    def sync(self, sequence: int) -> None:
        """Return once frame ``sequence`` is on disk; one fsync serves every waiter."""
        with self._cond:
            while self._synced < sequence:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target, fd = self._written, self._fd
                self._cond.release()
                try:
                    os.fsync(fd)
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self.fsyncs += 1
                self._synced = max(self._synced, target)

    def sync_all(self) -> None:
        """Return once every frame written so far is on disk."""
        self.sync(self._written)

    def rotate(self) -> int:
        """Start a new segment (buffer lock held); return the number of the one closed."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            os.fsync(self._fd)
            self._synced = self._written
            closed = self._segment
            self._open_segment(closed + 1)
        return closed

    def checkpoint(self, upto: int) -> None:
        """Make every frame written so far durable, then delete segments up to ``upto``."""
        self.sync_all()
        for segment in self.owner_dir.glob("seg-*.log"):
            if int(segment.stem.split("-")[1]) <= upto:
                segment.unlink()
        _fsync_dir(self.owner_dir)

    def close(self) -> None:
        """Make everything durable and release the directory (its segments stay on disk)."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        path = self.owner_dir / f"seg-{number:08d}.log"
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._segment = number
        _fsync_dir(self.owner_dir)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
