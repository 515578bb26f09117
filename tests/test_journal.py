"""The journal: frames, group commit, torn and corrupt tails, adoption, and recovery."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from flask import Flask

from persistence.buffer import Buffer
from persistence.journal import BATCH, RESTORE, Journal, RecoveryReport, encode_frame, read_segment
from persistence.records import TASKS
from persistence.service import PersistenceService
from tests.conftest import Database
from tests.factories import new_session_id, session, task


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
    sequences = [journal.write(frames_of(stamped([task(sid)], start=n))) for n in range(5)]
    journal.sync(sequences[0])
    assert journal.fsyncs == 1
    journal.sync(sequences[-1])  # already on disk: no second fsync
    assert journal.fsyncs == 1
    journal.close()


def test_concurrent_appends_are_all_durable_and_readable(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    sid = new_session_id()
    lock = threading.Lock()  # stands for the buffer's lock, which orders the writes

    def writer(n: int) -> None:
        for i in range(50):
            with lock:
                sequence = journal.write(frames_of(stamped([task(sid)], start=n * 1000 + i)))
            journal.sync(sequence)

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


def test_rotation_and_checkpoint_drop_only_older_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    sid = new_session_id()
    journal.write(frames_of(stamped([task(sid)])))
    closed = journal.rotate()
    journal.write(frames_of(stamped([task(sid)], start=9)))
    journal.checkpoint(closed)
    left = segments(tmp_path)
    assert len(left) == 1
    assert [e.records[0]["ingest_seq"] for e in read_segment(left[0], RecoveryReport())] == [9]
    journal.close()


def test_only_journals_of_stopped_processes_are_adopted(tmp_path: Path) -> None:
    sid = new_session_id()
    dead = Journal(tmp_path)
    dead.open()
    dead.write(frames_of(stamped([task(sid, task_id="from-dead")])))
    dead.close()  # releases its lock, like a process that died
    alive = Journal(tmp_path)
    alive.open()
    alive.write(frames_of(stamped([task(sid, task_id="from-alive")])))

    newcomer = Journal(tmp_path)
    newcomer.open()
    report = RecoveryReport()
    keys = [r["task_id"] for e in newcomer.recover(report) for r in e.records]
    assert keys == ["from-dead"]
    newcomer.forget_adopted(report)
    assert not dead.owner_dir.exists()
    assert alive.owner_dir.exists()
    alive.close()
    newcomer.close()


def test_a_buffer_rebuilt_from_its_journal_equals_the_original(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    buffer = Buffer(10_000, 1 << 30, journal)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="a", status="pending"), task(sid, task_id="b")])
    drained = buffer.drain()
    buffer.add(TASKS, [task(sid, task_id="a", status="completed")])
    buffer.restore(TASKS, drained.of(TASKS))  # older "a" put back after the newer one
    buffer.finish(drained)
    expected = buffer.drain().of(TASKS)
    journal.close()

    report = RecoveryReport()
    rebuilt = Buffer(10_000, 1 << 30)
    for segment in segments(tmp_path):
        for entry in read_segment(segment, report):
            rebuilt.replay(entry)
    assert rebuilt.drain().of(TASKS) == expected
    assert expected["a"]["status"] == "completed"


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
    service.scheduler.shutdown(wait=False)
    service.buffer.journal.close()
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
    assert owners == {restarted.buffer.journal.owner_dir}
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
