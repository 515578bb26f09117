"""The write-ahead journal of ``buffer.durability: journal``.

Every accepted batch is appended to the journal and fsynced before it enters
the buffer and before the 200 goes out; concurrent requests share one fsync
(group commit). Records leave the journal when a flush has resolved them:
the flush rotates the journal to a new segment when it drains the buffer,
and once every drained record is written, dead-lettered, or journaled again
in a newer segment (tasks still waiting for their session), the segments up
to the rotation are deleted (a checkpoint).

Layout: ``<journal_dir>/<owner>/seg-<n>.log`` where ``<owner>`` is one
process (``w-<pid>-<random>``), holding an exclusive ``flock`` on
``<owner>/lock`` for its lifetime. The directory is built under a temporary
name and renamed into place only once its lock is held, so a directory named
``w-*`` whose lock can be taken belongs to a process that died: any live
process adopts it (replays it, journals what it holds again, deletes it) at
start and periodically afterwards.

Frame: ``<u32 length><u32 crc32>`` then ``length`` bytes of payload:
one byte of frame type (``B``: a batch accepted; ``R``: records journaled
again by a flush or an adoption), one byte of record type (``s``/``t``), then
the records as a JSON array. Replay merges every frame by the records'
arrival stamps (``ingest_seq``), so the order of frames never decides which
update of a row wins. Reading stops at a torn frame (the end of a segment cut
by a crash) and skips a frame whose checksum or content is wrong; both are
counted, and recovery never refuses to start.

Failing closed: after a write or fsync error, no frame that was not
confirmed durable can be trusted (after a failed fsync the kernel may have
dropped the pages and a later fsync may report success: "fsyncgate"). The
journal then answers :class:`JournalError` to the writers whose frames were
not yet durable, truncates the segment back to its last durable byte, and
continues in a new segment file. Until that has worked, every append is
refused with :class:`JournalUnavailable` (the API answers 503). A descriptor
is owned by its :class:`_Segment` and closed only when no writer uses it, so
nothing is ever written into a descriptor the journal does not own.

Threading contract: every method may be called from any thread. Appends
are serialised by ``_lock`` (a short ``write``); :meth:`sync` runs one
``fsync`` at a time per segment for every writer waiting on it, without the
lock. A writer holds its segment (a :class:`Ticket`) from :meth:`append` to
:meth:`release`, i.e. until its records are in the buffer; :meth:`rotate`
waits for the writers of older segments, so that a drain that follows it
takes every record those segments hold. No method is called with the
buffer's lock held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import struct
import threading
import time
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
# After a failed recovery, appends are refused without trying again for this long (s).
RECOVERY_PAUSE = 1.0
# A half-built owner directory older than this belongs to a process that died building it.
STALE_BUILD_SECONDS = 60.0
OWNER_PREFIX = "w-"
BUILD_PREFIX = ".build-"


class JournalError(Exception):
    """A journal write, fsync or file operation failed; ``cause`` is the OSError."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class JournalUnavailable(JournalError):
    """The journal failed and has not recovered yet: it takes no frame for now."""


class FileSystem:
    """The file operations the journal uses; tests replace them to inject faults."""

    write = staticmethod(os.write)
    fsync = staticmethod(os.fsync)
    ftruncate = staticmethod(os.ftruncate)
    close = staticmethod(os.close)

    @staticmethod
    def open_segment(path: Path) -> int:
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o600)

    @staticmethod
    def fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Entry:
    """One frame read back: its type (BATCH or RESTORE), record type and records."""

    frame_type: int
    kind: RecordType
    records: list[Record]


@dataclass
class RecoveryReport:
    """What adopting journals of stopped processes found, for the log and /stats."""

    directories: int = 0
    frames: int = 0
    records: int = 0
    torn: int = 0
    corrupt: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "directories": self.directories,
            "frames": self.frames,
            "records": self.records,
            "torn_frames": self.torn,
            "corrupt_frames": self.corrupt,
        }

    def add(self, other: RecoveryReport) -> None:
        self.directories += other.directories
        self.frames += other.frames
        self.records += other.records
        self.torn += other.torn
        self.corrupt += other.corrupt


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


class _Segment:
    """One open segment file: its descriptor, what was written and what is durable.

    Guarded by the journal's lock. ``users`` counts tickets not yet released;
    the descriptor is closed once the segment is retired and unused.
    """

    def __init__(self, number: int, fd: int) -> None:
        self.number = number
        self.fd = fd
        self.size = 0  # bytes written
        self.written = 0  # frames written
        self.synced = 0  # frames known durable
        self.synced_size = 0  # bytes known durable
        self.syncing = False
        self.failed = False
        self.retired = False
        self.users = 0


@dataclass(frozen=True)
class Ticket:
    """A frame appended by :meth:`Journal.append`; hold it until :meth:`Journal.release`."""

    segment: _Segment
    sequence: int


@dataclass
class _Adoption:
    """An adopted directory, locked by this process until :meth:`Journal.forget`."""

    path: Path
    lock_fd: int
    report: RecoveryReport = field(default_factory=RecoveryReport)


class Journal:
    """One process's journal; see the module docstring for the contract."""

    def __init__(self, directory: str | os.PathLike[str], files: FileSystem | None = None) -> None:
        self.root = Path(directory)
        self.owner_dir = self.root / f"{OWNER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.files = files or FileSystem()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._lock_fd = -1
        self._current: _Segment | None = None
        self._retired: list[_Segment] = []
        self._next_number = 1
        self._on_disk: set[int] = set()  # numbers of this journal's segment files
        self._failed = False
        self._retry_at = 0.0
        # Seconds between attempts to recover from a failure.
        self.recovery_pause = RECOVERY_PAUSE
        self.fsyncs = 0
        self.failures = 0

    # --- life cycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Build this process's directory, lock it, publish it, open its first segment."""
        self.root.mkdir(parents=True, exist_ok=True)
        building = self.root / f"{BUILD_PREFIX}{self.owner_dir.name}"
        building.mkdir(mode=0o700)
        lock_fd = os.open(building / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Renamed only once locked: no other process can take a published directory
            # for the journal of a dead one.
            building.rename(self.owner_dir)
            self.files.fsync_dir(self.root)
        except OSError:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        with self._lock:
            self._current = self._new_segment()

    def close(self) -> None:
        """Make everything durable and release the directory (its segments stay on disk)."""
        with self._cond:
            while any(s.syncing for s in self._open_segments()):
                self._cond.wait()
            for segment in self._open_segments():
                if segment.fd >= 0:
                    with contextlib.suppress(OSError):
                        self.files.fsync(segment.fd)
                    self._close_fd(segment)
            self._current = None
            self._retired.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def healthy(self) -> bool:
        """False from a write or fsync failure until the journal has recovered from it."""
        with self._lock:
            return not self._failed

    # --- writing --------------------------------------------------------------------------

    def append(self, frame: bytes) -> Ticket:
        """Write one frame; the ticket must be synced and released by the caller.

        Raises :class:`JournalUnavailable` while the journal has not recovered from a
        failure, :class:`JournalError` if this write fails.
        """
        with self._lock:
            segment = self._writable_segment()
            try:
                _write_all(self.files, segment.fd, frame)
            except OSError as exc:
                self._fail(segment, exc)
                raise JournalError(f"journal write failed: {_reason(exc)}", exc) from exc
            segment.size += len(frame)
            segment.written += 1
            segment.users += 1
            return Ticket(segment, segment.written)

    def sync(self, ticket: Ticket) -> None:
        """Return once the ticket's frame is on disk; one fsync serves every waiter.

        Raises :class:`JournalError` when the frame can no longer become durable.
        """
        segment = ticket.segment
        with self._cond:
            while segment.synced < ticket.sequence:
                if segment.failed:
                    raise JournalError("the journal failed before this batch was on disk")
                if segment.syncing:
                    self._cond.wait()
                    continue
                segment.syncing = True
                target, size = segment.written, segment.size
                self._cond.release()
                try:
                    self.files.fsync(segment.fd)
                except OSError as exc:
                    self._cond.acquire()
                    segment.syncing = False
                    self._fail(segment, exc)
                    self._cond.notify_all()
                    raise JournalError(f"journal fsync failed: {_reason(exc)}", exc) from exc
                self._cond.acquire()
                segment.syncing = False
                self.fsyncs += 1
                if not segment.failed:
                    segment.synced, segment.synced_size = target, size
                self._cond.notify_all()

    def release(self, ticket: Ticket) -> None:
        """The ticket's records are in the buffer (or refused): its segment may close."""
        with self._cond:
            segment = ticket.segment
            segment.users -= 1
            if segment.retired and segment.users == 0:
                self._close_fd(segment)
                self._retired.remove(segment)
            self._cond.notify_all()

    def append_durably(self, frame: bytes) -> None:
        """Write one frame and wait until it is on disk (flusher and adoption use)."""
        ticket = self.append(frame)
        try:
            self.sync(ticket)
        finally:
            self.release(ticket)

    # --- flush cycle ----------------------------------------------------------------------

    def rotate(self) -> frozenset[int]:
        """Start a new segment; return the numbers of every segment closed before it.

        The new file is created (and its directory entry made durable) without the
        lock, so appends go on meanwhile. Returns once every writer of the closed
        segments has released its ticket: the buffer then holds every record those
        segments contain, and :meth:`checkpoint` may delete them once it is written.
        """
        with self._lock:
            self._writable_segment()
            number = self._next_number
            self._next_number += 1
        try:
            fresh = self._create_segment(number)
        except OSError as exc:
            raise JournalError(f"journal rotation failed: {_reason(exc)}", exc) from exc
        with self._cond:
            segment = self._current
            if segment is None:
                self._discard(fresh)
                raise JournalUnavailable("the journal is closed")
            self._retire(segment)
            self._current = fresh
            closed = frozenset(self._on_disk)
            self._on_disk.add(fresh.number)
            while self._retired:
                self._cond.wait()
            return closed

    def checkpoint(self, closed: frozenset[int]) -> None:
        """Delete segments that :meth:`rotate` closed (their records are written)."""
        for number in sorted(closed):
            with contextlib.suppress(FileNotFoundError):
                self._path(number).unlink()
            with self._lock:
                self._on_disk.discard(number)
        try:
            self.files.fsync_dir(self.owner_dir)
        except OSError as exc:
            raise JournalError(f"journal checkpoint failed: {_reason(exc)}", exc) from exc

    # --- adopting the journals of stopped processes ---------------------------------------

    def adopt(self) -> Iterator[tuple[_Adoption, list[Entry]]]:
        """Each journal directory whose owner died, locked, with the frames it holds.

        The directory stays locked by this process, so no other process adopts it
        too, until :meth:`forget` deletes it (once its records are safe here).
        """
        self._remove_stale_builds()
        for directory in sorted(self.root.glob(f"{OWNER_PREFIX}*")):
            if directory == self.owner_dir or not directory.is_dir():
                continue
            lock_fd = _try_lock(directory / "lock")
            if lock_fd is None:
                continue  # its owner is alive (or it is being deleted)
            adoption = _Adoption(directory, lock_fd)
            adoption.report.directories = 1
            segments = sorted(directory.glob("seg-*.log"), key=_segment_number)
            entries = [e for s in segments for e in read_segment(s, adoption.report)]
            yield adoption, entries

    def forget(self, adoption: _Adoption) -> None:
        """Delete an adopted directory, once its records are journaled here."""
        shutil.rmtree(adoption.path, ignore_errors=True)
        os.close(adoption.lock_fd)
        with contextlib.suppress(OSError):
            self.files.fsync_dir(self.root)

    # --- internals (lock held) ------------------------------------------------------------

    def _open_segments(self) -> list[_Segment]:
        return [s for s in (self._current, *self._retired) if s is not None]

    def _writable_segment(self) -> _Segment:
        if self._failed and not self._recover():
            raise JournalUnavailable(
                "the journal failed and has not recovered yet; nothing is accepted until it has"
            )
        if self._current is None:
            raise JournalUnavailable("the journal is closed")
        return self._current

    def _new_segment(self) -> _Segment:
        """Create the next segment (lock held: start and recovery only)."""
        number = self._next_number
        self._next_number += 1
        segment = self._create_segment(number)
        self._on_disk.add(number)
        return segment

    def _path(self, number: int) -> Path:
        return self.owner_dir / f"seg-{number:08d}.log"

    def _create_segment(self, number: int) -> _Segment:
        path = self._path(number)
        fd = self.files.open_segment(path)
        try:
            self.files.fsync_dir(self.owner_dir)
        except OSError:
            self.files.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return _Segment(number, fd)

    def _discard(self, segment: _Segment) -> None:
        self._close_fd(segment)
        with contextlib.suppress(OSError):
            self._path(segment.number).unlink()
        self._on_disk.discard(segment.number)

    def _retire(self, segment: _Segment) -> None:
        segment.retired = True
        if segment.users == 0:
            self._close_fd(segment)
        else:
            self._retired.append(segment)

    def _close_fd(self, segment: _Segment) -> None:
        fd, segment.fd = segment.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                self.files.close(fd)

    def _fail(self, segment: _Segment, exc: OSError) -> None:
        """Stop trusting ``segment`` past its last durable byte, and try to recover."""
        if not segment.failed:
            segment.failed = True
            self.failures += 1
            log.error(
                "journal segment %d failed (%s); batches are refused until it recovers",
                segment.number,
                _reason(exc),
            )
        if segment is self._current:
            self._failed = True
            self._retry_at = 0.0
            self._recover()
        else:
            # A retired segment: frames past its durable bytes were refused, so they
            # must not come back in a replay either.
            with contextlib.suppress(OSError):
                self._truncate(segment)

    def _recover(self) -> bool:
        """Cut the failed segment back to its durable bytes and continue in a new one."""
        if time.monotonic() < self._retry_at:
            return False
        while self._current is not None and self._current.syncing:
            self._cond.wait()
        if not self._failed:
            return True  # another thread recovered meanwhile
        segment = self._current
        assert segment is not None
        try:
            self._truncate(segment)
            fresh = self._new_segment()
        except OSError as exc:
            self._retry_at = time.monotonic() + self.recovery_pause
            log.error(
                "journal recovery failed (%s); trying again in %g s",
                _reason(exc),
                self.recovery_pause,
            )
            return False
        self._retire(segment)
        self._current = fresh
        self._failed = False
        log.warning("journal recovered: continuing in segment %d", fresh.number)
        return True

    def _truncate(self, segment: _Segment) -> None:
        # Also when nothing counted was written: a failed write may have left part of a frame.
        if segment.fd >= 0:
            self.files.ftruncate(segment.fd, segment.synced_size)
            self.files.fsync(segment.fd)
        segment.size = segment.synced_size

    def _remove_stale_builds(self) -> None:
        now = time.time()
        for directory in self.root.glob(f"{BUILD_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - directory.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(directory)


def _write_all(files: FileSystem, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = files.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _try_lock(path: Path) -> int | None:
    """An exclusive lock on an existing lock file, or None (held elsewhere, or gone)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not path.exists():  # deleted by the process that adopted it before us
        os.close(fd)
        return None
    return fd


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
