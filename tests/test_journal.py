"""The journal: frames, group commit, rotation, failing closed, adoption, and recovery."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask

from persistence.buffer import Buffer
from persistence.durable import DurableBuffer
from persistence.journal import (
    BATCH,
    RECOVERY_PAUSE,
    RESTORE,
    Journal,
    JournalError,
    JournalUnavailable,
    RecoveryReport,
    encode_frame,
    read_segment,
)
from persistence.records import TASKS
from persistence.service import PersistenceService
from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.faults import FaultyFiles


def stamped(records: list[dict], start: int = 1) -> list[dict]:
    return [{**r, "ingest_seq": start + n} for n, r in enumerate(records)]


def frames_of(records: list[dict]) -> bytes:
    return encode_frame(BATCH, TASKS, [orjson.dumps(r) for r in records])


def segments(journal_dir: Path) -> list[Path]:
    return sorted(journal_dir.glob("w-*/seg-*.log"))


def test_frames_round_trip(tmp_path: Path) -> None:
    sid = new_session_id()
    records = stamped([task(sid), task(sid, source_text="😀 «x»")])
    path = tmp_path / "seg.log"
    path.write_bytes(
        frames_of(records[:1]) + encode_frame(RESTORE, TASKS, [orjson.dumps(records[1])])
    )
    report = RecoveryReport()
    entries = list(read_segment(path, report))
    assert [(e.frame_type, e.records) for e in entries] == [
        (BATCH, records[:1]),
        (RESTORE, records[1:]),
    ]
    assert (report.frames, report.records, report.torn, report.corrupt) == (2, 2, 0, 0)


def test_a_torn_last_frame_is_skipped_and_counted(tmp_path: Path) -> None:
    sid = new_session_id()
    first, second = stamped([task(sid)]), stamped([task(sid)], start=5)
    path = tmp_path / "seg.log"
    path.write_bytes(frames_of(first) + frames_of(second)[:-7])
    report = RecoveryReport()
    assert [e.records for e in read_segment(path, report)] == [first]
    assert (report.torn, report.corrupt) == (1, 0)


def test_a_corrupt_frame_is_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    sid = new_session_id()
    frames = [frames_of(stamped([task(sid)], start=n)) for n in range(3)]
    damaged = bytearray(frames[1])
    damaged[-3] ^= 0xFF
    path = tmp_path / "seg.log"
    path.write_bytes(frames[0] + bytes(damaged) + frames[2])
    report = RecoveryReport()
    entries = list(read_segment(path, report))
    assert [e.records[0]["ingest_seq"] for e in entries] == [0, 2]
    assert (report.frames, report.torn, report.corrupt) == (2, 0, 1)


def test_a_damaged_length_stops_reading_that_segment(tmp_path: Path) -> None:
    sid = new_session_id()
    good = frames_of(stamped([task(sid)]))
    path = tmp_path / "seg.log"
    path.write_bytes(good + b"\xff\xff\xff\xff\x00\x00\x00\x00" + good)
    report = RecoveryReport()
    assert len(list(read_segment(path, report))) == 1
    assert report.corrupt == 1


def test_one_fsync_serves_every_frame_written_before_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    sid = new_session_id()
    tickets = [journal.append(frames_of(stamped([task(sid)], start=n))) for n in range(5)]
    journal.sync(tickets[0])
    assert journal.fsyncs == 1
    journal.sync(tickets[-1])  # already on disk: no second fsync
    assert journal.fsyncs == 1
    for ticket in tickets:
        journal.release(ticket)
    journal.close()


def test_concurrent_appends_are_all_durable_and_readable(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    sid = new_session_id()

    def writer(n: int) -> None:
        for i in range(50):
            ticket = journal.append(frames_of(stamped([task(sid)], start=n * 1000 + i)))
            journal.sync(ticket)
            journal.release(ticket)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= journal.fsyncs <= 400
    journal.close()
    report = RecoveryReport()
    stamps = {
        e.records[0]["ingest_seq"] for s in segments(tmp_path) for e in read_segment(s, report)
    }
    assert len(stamps) == 400


def test_rotation_and_checkpoint_drop_only_the_closed_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    sid = new_session_id()
    journal.append_durably(frames_of(stamped([task(sid)])))
    closed = journal.rotate()
    journal.append_durably(frames_of(stamped([task(sid)], start=9)))
    journal.checkpoint(closed)
    left = segments(tmp_path)
    assert len(left) == 1
    assert [e.records[0]["ingest_seq"] for e in read_segment(left[0], RecoveryReport())] == [9]
    journal.close()


def test_rotation_waits_until_the_writers_of_the_closed_segment_are_done(tmp_path: Path) -> None:
    """A batch journaled in the old segment but not yet in the buffer must be in the buffer
    before the flush drains it, or a checkpoint would delete its only durable copy."""
    journal = Journal(tmp_path)
    journal.open()
    ticket = journal.append(frames_of(stamped([task(new_session_id())])))
    journal.sync(ticket)
    rotated = threading.Event()
    thread = threading.Thread(target=lambda: (journal.rotate(), rotated.set()))
    thread.start()
    assert not rotated.wait(0.3)
    journal.append_durably(frames_of(stamped([task(new_session_id())], start=5)))  # not blocked
    journal.release(ticket)
    assert rotated.wait(5)
    thread.join()
    journal.close()


def all_records(journal_dir: Path) -> list[str]:
    report = RecoveryReport()
    return [
        r["task_id"]
        for s in segments(journal_dir)
        for e in read_segment(s, report)
        for r in e.records
    ]


def test_a_failed_fsync_refuses_the_batch_and_leaves_no_trace(tmp_path: Path) -> None:
    files = FaultyFiles()
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    durable.open_journal(tmp_path, files)
    sid = new_session_id()
    durable.add(TASKS, [task(sid, task_id="kept")])
    files.arm("fsync")
    with pytest.raises(JournalError):
        durable.add(TASKS, [task(sid, task_id="refused")])
    # Nothing of the refused batch is in memory, and nothing will come back from disk.
    assert list(durable.buffer.drain().of(TASKS)) == ["kept"]
    assert all_records(tmp_path) == ["kept"]
    durable.add(TASKS, [task(sid, task_id="after")])  # recovered: batches are taken again
    assert sorted(all_records(tmp_path)) == ["after", "kept"]
    assert durable.journal is not None
    assert durable.journal.failures == 1
    durable.close()


def test_a_torn_write_is_cut_off_and_the_next_frames_stay_readable(tmp_path: Path) -> None:
    files = FaultyFiles()
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    durable.open_journal(tmp_path, files)
    sid = new_session_id()
    durable.add(TASKS, [task(sid, task_id="one")])
    files.arm("short_write")
    with pytest.raises(JournalError):
        durable.add(TASKS, [task(sid, task_id="torn")])
    durable.add(TASKS, [task(sid, task_id="two")])
    report = RecoveryReport()
    ids = [
        r["task_id"] for s in segments(tmp_path) for e in read_segment(s, report) for r in e.records
    ]
    assert sorted(ids) == ["one", "two"]
    assert (report.torn, report.corrupt) == (0, 0)
    durable.close()


def test_a_journal_that_cannot_reopen_refuses_batches_and_writes_nowhere_else(
    tmp_path: Path,
) -> None:
    files = FaultyFiles()
    journal = Journal(tmp_path / "journal", files)
    journal.open()
    sid = new_session_id()
    files.arm("write")
    files.arm("open")  # the new segment cannot be opened either (EMFILE, ENOSPC ...)
    with pytest.raises(JournalError):
        journal.append(frames_of(stamped([task(sid)])))
    # A file opened now may reuse any descriptor number the journal closed.
    bystander = tmp_path / "bystander.txt"
    with bystander.open("wb") as out:
        with pytest.raises(JournalUnavailable):
            journal.append(frames_of(stamped([task(sid)], start=3)))
        out.flush()
    assert bystander.read_bytes() == b""
    assert not journal.healthy
    time.sleep(RECOVERY_PAUSE + 0.1)
    journal.append_durably(frames_of(stamped([task(sid)], start=7)))  # reopened
    assert journal.healthy
    journal.close()


def test_a_write_error_is_answered_503_and_counted(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(start=False, buffer={"durability": "journal", "flush_interval": 3600})
    service = app.extensions["persistence"]
    files = FaultyFiles()
    service.durable.open_journal(service.settings.buffer.journal_dir, files)
    client = app.test_client()
    sid = new_session_id()
    files.arm("fsync")
    answer = client.post("/api/v1/persistence/tasks/batch", json={"tasks": [task(sid)]})
    assert answer.status_code == 503
    assert "Retry-After" in answer.headers
    assert "nothing of it was kept" in answer.get_json()["detail"]
    assert service.buffer.counts()["tasks"] == 0
    assert service.stats()["refused"]["journal_error"] == {"batches": 1, "records": 1}
    service.durable.close()


def test_rotation_does_not_stall_intake(tmp_path: Path) -> None:
    files = FaultyFiles()
    durable = DurableBuffer(Buffer(1000, 1 << 30))
    durable.open_journal(tmp_path, files)
    sid = new_session_id()
    files.pause_dir_fsync = threading.Event()  # the new segment's directory fsync hangs
    drained = threading.Thread(target=durable.drain)
    drained.start()
    added = threading.Thread(target=durable.add, args=(TASKS, [task(sid)]))
    added.start()
    added.join(5)
    assert not added.is_alive(), "a batch waited for the flush's rotation"
    files.pause_dir_fsync.set()
    drained.join(5)
    durable.close()


def test_a_directory_being_built_is_never_taken_for_a_dead_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process looking for dead journals while this one starts must not lock it."""
    real_open = os.open
    other = Journal(tmp_path)
    other.open()
    adopted: list[Path] = []

    def open_and_look(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if str(path).endswith("lock") and flags & os.O_CREAT:
            adopted.extend(a.path for a, _ in other.adopt())  # in the worst moment
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_and_look)
    starting = Journal(tmp_path)
    starting.open()  # must not fail: nobody could lock its directory first
    monkeypatch.undo()
    assert adopted == []
    assert [a.path for a, _ in other.adopt()] == []  # both owners alive
    starting.close()
    other.close()


def test_only_journals_of_stopped_processes_are_adopted(tmp_path: Path) -> None:
    sid = new_session_id()
    dead = Journal(tmp_path)
    dead.open()
    dead.append_durably(frames_of(stamped([task(sid, task_id="from-dead")])))
    dead.close()  # releases its lock, like a process that died
    alive = Journal(tmp_path)
    alive.open()
    alive.append_durably(frames_of(stamped([task(sid, task_id="from-alive")])))

    newcomer = DurableBuffer(Buffer(1000, 1 << 30))
    newcomer.open_journal(tmp_path)
    assert list(newcomer.buffer.drain().of(TASKS)) == ["from-dead"]
    assert not dead.owner_dir.exists()
    assert alive.owner_dir.exists()
    alive.close()
    newcomer.close()


def test_a_journal_left_behind_later_is_adopted_by_a_running_process(tmp_path: Path) -> None:
    running = DurableBuffer(Buffer(1000, 1 << 30))
    running.open_journal(tmp_path)
    sid = new_session_id()
    late = Journal(tmp_path)  # a worker that starts after, then dies
    late.open()
    late.append_durably(frames_of(stamped([task(sid, task_id="orphan")], start=10**15)))
    late.close()
    report = running.adopt_orphans()
    assert (report.directories, report.records) == (1, 1)
    assert list(running.buffer.drain().of(TASKS)) == ["orphan"]
    assert running.clock.stamps(1)[0] > 10**15  # never below a stamp it has seen
    # Journaled here before the orphan's directory went: a crash now still keeps it.
    assert "orphan" in all_records(tmp_path)
    assert not late.owner_dir.exists()
    running.close()


def test_a_buffer_rebuilt_from_its_journal_equals_the_original(tmp_path: Path) -> None:
    durable = DurableBuffer(Buffer(10_000, 1 << 30))
    durable.open_journal(tmp_path)
    sid = new_session_id()
    durable.add(TASKS, [task(sid, task_id="a", status="pending"), task(sid, task_id="b")])
    drained = durable.drain()
    durable.add(TASKS, [task(sid, task_id="a", status="completed")])
    durable.put_back(TASKS, drained.of(TASKS))  # older "a" put back after the newer one
    durable.finish(drained, resolved=True)
    expected = durable.buffer.drain().of(TASKS)
    durable.close()

    rebuilt = Buffer(10_000, 1 << 30)
    for segment in segments(tmp_path):
        for entry in read_segment(segment, RecoveryReport()):
            rebuilt.replay(entry.kind, entry.records)
    assert rebuilt.drain().of(TASKS) == expected
    assert expected["a"]["status"] == "completed"


def test_racing_updates_leave_memory_and_journal_equal(tmp_path: Path) -> None:
    durable = DurableBuffer(Buffer(100_000, 1 << 30))
    durable.open_journal(tmp_path)
    sid = new_session_id()

    def writer(n: int) -> None:
        for i in range(200):
            durable.add(TASKS, [task(sid, task_id=f"k{i % 3}", retry_count=n * 1000 + i)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    in_memory = durable.buffer.drain().of(TASKS)
    durable.close()
    rebuilt = Buffer(100_000, 1 << 30)
    for segment in segments(tmp_path):
        for entry in read_segment(segment, RecoveryReport()):
            rebuilt.replay(entry.kind, entry.records)
    assert rebuilt.drain().of(TASKS) == in_memory


@pytest.fixture
def journal_app(app_factory: Callable[..., Flask], tmp_path: Path) -> Callable[[], Flask]:
    def build() -> Flask:
        return app_factory(
            start=False,
            buffer={
                "durability": "journal",
                "flush_interval": 3600,
                "journal_dir": str(tmp_path / "journal"),
            },
        )

    return build


def crash(service: PersistenceService) -> None:
    """What kill -9 leaves: the journal's files, nothing flushed, locks released."""
    service.runtime._scheduler.shutdown(wait=False)
    service.durable.close()
    service.store.close()


def test_records_accepted_before_a_crash_are_written_after_restart(
    journal_app: Callable[[], Flask], db: Database, tmp_path: Path
) -> None:
    first = journal_app()
    service = first.extensions["persistence"]
    service.start()
    client = first.test_client()
    sid = new_session_id()
    client.post("/api/v1/persistence/sessions/batch", json={"sessions": [session(session_id=sid)]})
    tasks = [task(sid) for _ in range(50)]
    client.post("/api/v1/persistence/tasks/batch", json={"tasks": tasks})
    client.post(
        "/api/v1/persistence/tasks/batch", json={"tasks": [{**tasks[0], "status": "completed"}]}
    )
    crash(service)
    assert db.count("translation_tasks") == 0

    second = journal_app()
    restarted = second.extensions["persistence"]
    restarted.start()
    recovered = second.test_client().get("/api/v1/persistence/stats").get_json()["journal"]
    assert recovered["recovered"]["records"] == 52
    # Written by the flush that start() triggers, or at the latest by this one.
    assert second.test_client().post("/api/v1/persistence/flush").status_code == 200
    assert db.count("translation_tasks") == 50
    assert db.query(
        "SELECT status FROM translation_tasks WHERE task_id = ?", tasks[0]["task_id"]
    ) == [("completed",)]
    # The crashed process's journal was adopted and deleted.
    owners = {path.parent for path in segments(tmp_path / "journal")}
    assert owners == {restarted.durable.journal.owner_dir}
    restarted.stop()


def test_a_truncated_and_corrupted_journal_still_starts(
    journal_app: Callable[[], Flask], db: Database, tmp_path: Path
) -> None:
    first = journal_app()
    service = first.extensions["persistence"]
    service.start()
    client = first.test_client()
    sid = new_session_id()
    client.post("/api/v1/persistence/sessions/batch", json={"sessions": [session(session_id=sid)]})
    for _ in range(3):
        client.post(
            "/api/v1/persistence/tasks/batch", json={"tasks": [task(sid) for _ in range(10)]}
        )
    crash(service)
    [segment] = segments(tmp_path / "journal")
    data = bytearray(segment.read_bytes())
    frame = len(data) // 4  # somewhere inside the second frame
    data[frame] ^= 0xFF
    segment.write_bytes(bytes(data[:-20]))  # and the last frame torn

    second = journal_app()
    second.extensions["persistence"].start()
    recovered = second.test_client().get("/api/v1/persistence/stats").get_json()["journal"]
    assert recovered["recovered"]["torn_frames"] == 1
    assert recovered["recovered"]["corrupt_frames"] == 1
    second.test_client().post("/api/v1/persistence/flush")
    assert db.count("translation_tasks") == 10
    second.extensions["persistence"].stop()
