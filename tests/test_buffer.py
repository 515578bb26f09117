"""The buffer in memory mode (stamps, coalescing, limits, drain/put back/finish, threads),
the arrival clock, and flush stats."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from persistence.buffer import Buffer, BufferFull
from persistence.durable import DurableBuffer
from persistence.flusher import FlushStats
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, ArrivalClock, encode, stamp_of
from persistence.service import PersistenceService
from tests.conftest import make_settings
from tests.factories import new_session_id, session, task

BIG = 1 << 40


def make_buffer(hard_limit: int = 1_000_000, hard_limit_bytes: int = BIG) -> DurableBuffer:
    """A buffer in memory mode, used through the interface the intake and flusher use."""
    return DurableBuffer(Buffer(hard_limit, hard_limit_bytes))


def test_records_are_stamped_in_arrival_order() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    first = [task(sid, task_id="a"), task(sid, task_id="b")]
    second = [task(sid, task_id="c")]
    buffer.add(TASKS, first)
    buffer.add(TASKS, second)
    stamps = [r[ORDER_COLUMN] for r in buffer.drain().of(TASKS).values()]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 3


def test_repeated_updates_of_a_task_coalesce_to_the_newest() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="t-1", status="pending")])
    buffer.add(TASKS, [task(sid, task_id="t-1", status="completed", target_text="fait")])
    drained = buffer.drain().of(TASKS)
    assert list(drained) == ["t-1"]
    assert (drained["t-1"]["status"], drained["t-1"]["target_text"]) == ("completed", "fait")


def test_session_counters_never_decrease_but_other_columns_take_the_newest() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(
        SESSIONS,
        [
            session(
                session_id=sid,
                status="processing",
                total_tasks=10,
                completed_tasks=7,
                failed_tasks=2,
                processing_tasks=5,
            )
        ],
    )
    buffer.add(
        SESSIONS,
        [
            session(
                session_id=sid,
                status="completed",
                total_tasks=8,
                completed_tasks=9,
                failed_tasks=1,
                processing_tasks=0,
            )
        ],
    )
    merged = buffer.drain().of(SESSIONS)[sid]
    assert merged["status"] == "completed"
    assert (merged["total_tasks"], merged["completed_tasks"], merged["failed_tasks"]) == (10, 9, 2)
    assert merged["processing_tasks"] == 0  # not monotonic: newest wins


def test_duplicates_inside_one_batch_coalesce_in_order() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    ready = buffer.add(
        TASKS, [task(sid, task_id="a", status="pending"), task(sid, task_id="a", status="failed")]
    )
    assert ready == 1
    assert buffer.drain().of(TASKS)["a"]["status"] == "failed"
    assert buffer.buffer.received() == {"sessions": 0, "tasks": 2}


def test_a_batch_past_the_record_limit_is_refused_whole() -> None:
    buffer = make_buffer(hard_limit=5)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(3)])
    with pytest.raises(BufferFull) as refused:
        buffer.add(TASKS, [task(sid) for _ in range(3)])
    assert (refused.value.what, refused.value.held, refused.value.incoming) == ("records", 3, 3)
    assert buffer.buffer.counts()["tasks"] == 3  # nothing of the refused batch was kept


def test_a_batch_past_the_byte_limit_is_refused_whole() -> None:
    sid = new_session_id()
    one = len(orjson.dumps({**task(sid, task_id="x" * 10), ORDER_COLUMN: 1 << 52}))
    buffer = make_buffer(hard_limit_bytes=one * 3)
    buffer.add(TASKS, [task(sid, task_id=f"{n:010d}") for n in range(2)])
    held = buffer.buffer.counts()["bytes"]
    assert 0 < held <= 2 * one
    with pytest.raises(BufferFull) as refused:
        buffer.add(TASKS, [task(sid, task_id=f"{n:010d}") for n in range(10, 12)])
    assert refused.value.what == "bytes"
    assert buffer.buffer.counts()["bytes"] == held


def test_records_in_flight_count_against_the_limits_until_finished() -> None:
    buffer = make_buffer(hard_limit=4)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(4)])
    nbytes = buffer.buffer.counts()["bytes"]
    batch = buffer.drain()
    assert buffer.buffer.counts() == {
        "sessions": 0,
        "tasks": 0,
        "in_flight": 4,
        "waiting": 0,
        "bytes": nbytes,
    }
    with pytest.raises(BufferFull):
        buffer.add(TASKS, [task(sid)])
    buffer.finish(batch, resolved=True)
    buffer.add(TASKS, [task(sid)])
    assert buffer.buffer.counts()["in_flight"] == 0


def test_restore_lets_updates_that_arrived_meanwhile_win() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(SESSIONS, [session(session_id=sid, status="processing", completed_tasks=5)])
    drained = buffer.drain()
    buffer.add(SESSIONS, [session(session_id=sid, status="completed", completed_tasks=3)])
    buffer.put_back(SESSIONS, drained.of(SESSIONS))
    buffer.finish(drained, resolved=True)
    merged = buffer.drain().of(SESSIONS)[sid]
    assert merged["status"] == "completed"  # the newer update wins ...
    assert merged["completed_tasks"] == 5  # ... but counters still never decrease


def test_a_restored_task_never_overwrites_a_newer_update() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="t", status="processing")])
    drained = buffer.drain()
    buffer.add(TASKS, [task(sid, task_id="t", status="completed")])
    buffer.put_back(TASKS, drained.of(TASKS))
    assert buffer.drain().of(TASKS)["t"]["status"] == "completed"


def test_waiting_tasks_do_not_count_towards_the_flush_trigger() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="w")])
    drained = buffer.drain()
    buffer.put_back(TASKS, drained.of(TASKS), waiting=True)
    assert buffer.buffer.counts()["waiting"] == 1
    assert buffer.add(TASKS, [task(sid, task_id="x")]) == 1
    assert buffer.drain().waiting == {"w"}


def test_a_buffered_record_costs_about_its_encoded_size() -> None:
    """Not the encoder's working buffer (orjson's bytes keep ~8 KiB unless copied)."""
    buffer = make_buffer()
    sid = new_session_id()
    batches = [[task(sid) for _ in range(100)] for _ in range(20)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            buffer.add(TASKS, batch)
        per_record = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    encoded = buffer.buffer.counts()["bytes"] / 2000
    assert per_record < encoded + 400, (per_record, encoded)


def test_a_record_taken_in_by_the_typed_path_costs_about_its_encoded_size(
    tmp_path: Path,
) -> None:
    """The intake's own encoder (msgspec) keeps spare room in its result unless copied:
    about a third more per record, for as long as the record is buffered."""
    settings = make_settings(tmp_path, buffer={"hard_limit": 100_000, "max_buffer_size": 50_000})
    service = PersistenceService(settings)
    sid = new_session_id()
    texts = {"source_text": "The gate opens at dawn. " * 12, "target_text": "La porte. " * 20}
    bodies = [orjson.dumps({"tasks": [task(sid, **texts) for _ in range(100)]}) for _ in range(20)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            service.accept(TASKS, body)
        gc.collect()
        per_record = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    encoded = service.buffer.counts()["bytes"] / 2000
    # The bytes object's header, its key and the dictionary's slot: well under 160 bytes.
    assert per_record < encoded + 160, (per_record, encoded)


def test_concurrent_writers_lose_no_update() -> None:
    """8 threads add interleaved updates; the final state equals sequential coalescing."""
    buffer = make_buffer()
    sid = new_session_id()
    per_thread = 500

    def writer(n: int) -> None:
        for i in range(per_thread):
            buffer.add(TASKS, [task(sid, task_id=f"w{n}-{i % 50}", retry_count=i)])
            buffer.add(SESSIONS, [session(session_id=sid, completed_tasks=n * per_thread + i)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batch = buffer.drain()
    tasks = batch.of(TASKS)
    assert len(tasks) == 8 * 50
    # Each key's last writer wrote i = per_thread - 50 + (key index).
    assert all(t["retry_count"] == per_thread - 50 + int(k.split("-")[1]) for k, t in tasks.items())
    assert batch.of(SESSIONS)[sid]["completed_tasks"] == 8 * per_thread - 1
    assert buffer.buffer.received() == {"sessions": 8 * per_thread, "tasks": 8 * per_thread}


def test_flushes_today_start_again_at_midnight_utc() -> None:
    stats = FlushStats()
    day = datetime(2026, 5, 1, 23, 59, tzinfo=UTC)
    stats.record_success(2.0, day)
    assert stats.flushes_today(day) == 1
    assert stats.flushes_today(day + timedelta(minutes=2)) == 0  # before any flush that day
    stats.record_success(2.0, day + timedelta(minutes=3))
    assert stats.flushes_today(day + timedelta(minutes=4)) == 1


def test_overlapping_updates_of_one_row_keep_the_newest_stamp() -> None:
    """Requests racing on the same keys: whatever order their merges take, each key
    holds the update with the newest stamp handed out (the one a journal replay keeps)."""
    buffer = make_buffer()
    sid = new_session_id()
    keys = [f"race-{n}" for n in range(4)]
    start = threading.Barrier(8)
    acknowledged: list[dict] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        start.wait()
        for i in range(400):
            record = task(sid, task_id=keys[i % len(keys)], retry_count=n * 1000 + i)
            buffer.add(TASKS, [record])  # stamps the record in place
            with lock:
                acknowledged.append(record)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    newest = {}
    for record in acknowledged:
        key = record["task_id"]
        if key not in newest or record[ORDER_COLUMN] > newest[key][ORDER_COLUMN]:
            newest[key] = record
    assert buffer.drain().of(TASKS) == newest


class _PausingClock(ArrivalClock):
    """Hands out stamps; the thread named "late" then pauses until released, so that a
    newer update of the same row reaches the buffer before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stamped = threading.Event()
        self.release = threading.Event()

    def stamps(self, count: int) -> range:
        stamps = super().stamps(count)
        if threading.current_thread().name == "late":
            self.stamped.set()
            assert self.release.wait(10)
        return stamps


def test_an_older_update_merged_after_a_newer_one_does_not_win() -> None:
    clock = _PausingClock()
    buffer = DurableBuffer(Buffer(1000, BIG), clock)
    sid = new_session_id()
    older = task(sid, task_id="t", status="processing")
    late = threading.Thread(target=buffer.add, args=(TASKS, [older]), name="late")
    late.start()
    assert clock.stamped.wait(10)
    newer = task(sid, task_id="t", status="completed")
    buffer.add(TASKS, [newer])
    clock.release.set()
    late.join()
    assert older[ORDER_COLUMN] < newer[ORDER_COLUMN]
    assert buffer.drain().of(TASKS)["t"]["status"] == "completed"


def test_a_put_back_session_never_undoes_a_newer_update_but_keeps_larger_counters() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(SESSIONS, [session(session_id=sid, status="processing", failed_tasks=4)])
    drained = buffer.drain()
    buffer.add(SESSIONS, [session(session_id=sid, status="completed", failed_tasks=1)])
    buffer.put_back(SESSIONS, drained.of(SESSIONS))
    merged = buffer.drain().of(SESSIONS)[sid]
    assert (merged["status"], merged["failed_tasks"]) == ("completed", 4)


def test_a_refused_batch_leaves_no_reservation_behind() -> None:
    buffer = make_buffer(hard_limit=3)
    sid = new_session_id()
    with pytest.raises(BufferFull):
        buffer.add(TASKS, [task(sid) for _ in range(4)])
    buffer.add(TASKS, [task(sid) for _ in range(3)])  # all the room is still there
    assert buffer.buffer.counts()["tasks"] == 3


def test_the_stamp_is_read_from_the_encoded_record() -> None:
    record = {**task(new_session_id(), context='ends in "x": 9}'), ORDER_COLUMN: 1_234_567}
    assert stamp_of(encode(record)) == 1_234_567


def test_stamps_never_go_back_when_the_wall_clock_does(caplog: pytest.LogCaptureFixture) -> None:
    now = [5_000_000_000]
    clock = ArrivalClock(now_us=lambda: now[0])
    first = clock.stamps(3)
    now[0] -= 10_000_000  # the clock steps back 10 s
    second = clock.stamps(2)
    third = clock.stamps(1)
    assert list(first) + list(second) + list(third) == list(range(first[0], first[0] + 6))
    warnings = [r for r in caplog.records if "behind the newest arrival stamp" in r.message]
    assert len(warnings) == 1  # logged once per step, not once per stamp
    now[0] += 20_000_000  # the clock is ahead again: stamps follow it
    assert clock.stamps(1)[0] == now[0]


def test_stamps_start_above_the_newest_stamp_known_elsewhere() -> None:
    clock = ArrivalClock(now_us=lambda: 1_000)
    clock.advance_to(9_000_000)  # e.g. the newest row in the database
    assert clock.stamps(1)[0] == 9_000_001
    clock.advance_to(5)  # never lowers the floor
    assert clock.stamps(1)[0] == 9_000_002
