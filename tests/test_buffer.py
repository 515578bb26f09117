"""The buffer alone (stamps, coalescing, limits, drain/restore/finish, threads); flush stats."""

from __future__ import annotations

import threading
import tracemalloc
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from persistence.buffer import Buffer, BufferFull
from persistence.flusher import FlushResult, FlushStats
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS
from tests.factories import new_session_id, session, task

BIG = 1 << 40


def make_buffer(hard_limit: int = 1_000_000, hard_limit_bytes: int = BIG) -> Buffer:
    return Buffer(hard_limit, hard_limit_bytes)


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
    assert buffer.received() == {"sessions": 0, "tasks": 2}


def test_a_batch_past_the_record_limit_is_refused_whole() -> None:
    buffer = make_buffer(hard_limit=5)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(3)])
    with pytest.raises(BufferFull) as refused:
        buffer.add(TASKS, [task(sid) for _ in range(3)])
    assert (refused.value.what, refused.value.held, refused.value.incoming) == ("records", 3, 3)
    assert buffer.counts()["tasks"] == 3  # nothing of the refused batch was kept


def test_a_batch_past_the_byte_limit_is_refused_whole() -> None:
    sid = new_session_id()
    one = len(orjson.dumps({**task(sid, task_id="x" * 10), ORDER_COLUMN: 1 << 52}))
    buffer = make_buffer(hard_limit_bytes=one * 3)
    buffer.add(TASKS, [task(sid, task_id=f"{n:010d}") for n in range(2)])
    held = buffer.counts()["bytes"]
    assert 0 < held <= 2 * one
    with pytest.raises(BufferFull) as refused:
        buffer.add(TASKS, [task(sid, task_id=f"{n:010d}") for n in range(10, 12)])
    assert refused.value.what == "bytes"
    assert buffer.counts()["bytes"] == held


def test_records_in_flight_count_against_the_limits_until_finished() -> None:
    buffer = make_buffer(hard_limit=4)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(4)])
    nbytes = buffer.counts()["bytes"]
    batch = buffer.drain()
    assert buffer.counts() == {
        "sessions": 0,
        "tasks": 0,
        "in_flight": 4,
        "waiting": 0,
        "bytes": nbytes,
    }
    with pytest.raises(BufferFull):
        buffer.add(TASKS, [task(sid)])
    buffer.finish(batch)
    buffer.add(TASKS, [task(sid)])
    assert buffer.counts()["in_flight"] == 0


def test_restore_lets_updates_that_arrived_meanwhile_win() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(SESSIONS, [session(session_id=sid, status="processing", completed_tasks=5)])
    drained = buffer.drain()
    buffer.add(SESSIONS, [session(session_id=sid, status="completed", completed_tasks=3)])
    buffer.restore(SESSIONS, drained.of(SESSIONS))
    buffer.finish(drained)
    merged = buffer.drain().of(SESSIONS)[sid]
    assert merged["status"] == "completed"  # the newer update wins ...
    assert merged["completed_tasks"] == 5  # ... but counters still never decrease


def test_a_restored_task_never_overwrites_a_newer_update() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="t", status="processing")])
    drained = buffer.drain()
    buffer.add(TASKS, [task(sid, task_id="t", status="completed")])
    buffer.restore(TASKS, drained.of(TASKS))
    assert buffer.drain().of(TASKS)["t"]["status"] == "completed"


def test_waiting_tasks_do_not_count_towards_the_flush_trigger() -> None:
    buffer = make_buffer()
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="w")])
    drained = buffer.drain()
    buffer.restore(TASKS, drained.of(TASKS), waiting=True)
    assert buffer.counts()["waiting"] == 1
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
    encoded = buffer.counts()["bytes"] / 2000
    assert per_record < encoded + 400, (per_record, encoded)


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
    assert buffer.received() == {"sessions": 8 * per_thread, "tasks": 8 * per_thread}


def test_flushes_today_start_again_at_midnight_utc() -> None:
    stats = FlushStats()
    day = datetime(2026, 5, 1, 23, 59, tzinfo=UTC)
    stats.record_success(FlushResult(1, 1, 0, 0, 2.0), day)
    assert stats.flushes_today(day) == 1
    assert stats.flushes_today(day + timedelta(minutes=2)) == 0  # before any flush that day
    stats.record_success(FlushResult(1, 1, 0, 0, 2.0), day + timedelta(minutes=3))
    assert stats.flushes_today(day + timedelta(minutes=4)) == 1
