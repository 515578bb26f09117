"""The buffer alone: coalescing, the hard limit, drain/restore/release, threads."""

from __future__ import annotations

import threading

import pytest

from persistence.buffer import Buffer, BufferFull
from persistence.records import SESSIONS, TASKS
from tests.factories import new_session_id, session, task


def test_repeated_updates_of_a_task_coalesce_to_the_newest() -> None:
    buffer = Buffer(hard_limit=100)
    sid = new_session_id()
    first = task(sid, task_id="t-1", status="pending")
    second = task(sid, task_id="t-1", status="completed", target_text="fait")
    buffer.add(TASKS, [first])
    buffer.add(TASKS, [second])
    batch = buffer.drain()
    assert batch.of(TASKS) == {"t-1": second}


def test_session_counters_never_decrease_but_other_columns_take_the_newest() -> None:
    buffer = Buffer(hard_limit=100)
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
    buffer = Buffer(hard_limit=100)
    sid = new_session_id()
    ready = buffer.add(
        TASKS, [task(sid, task_id="a", status="pending"), task(sid, task_id="a", status="failed")]
    )
    assert ready == 1
    assert buffer.drain().of(TASKS)["a"]["status"] == "failed"
    assert buffer.received() == {"sessions": 0, "tasks": 2}


def test_a_batch_past_the_hard_limit_is_refused_whole() -> None:
    buffer = Buffer(hard_limit=5)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(3)])
    with pytest.raises(BufferFull) as refused:
        buffer.add(TASKS, [task(sid) for _ in range(3)])
    assert (refused.value.held, refused.value.incoming, refused.value.limit) == (3, 3, 5)
    assert buffer.counts()["tasks"] == 3  # nothing of the refused batch was kept


def test_records_in_flight_count_against_the_hard_limit_until_released() -> None:
    buffer = Buffer(hard_limit=4)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid) for _ in range(4)])
    batch = buffer.drain()
    assert buffer.counts() == {"sessions": 0, "tasks": 0, "in_flight": 4, "waiting": 0}
    with pytest.raises(BufferFull):
        buffer.add(TASKS, [task(sid)])
    buffer.release(len(batch))
    buffer.add(TASKS, [task(sid)])
    assert buffer.counts()["in_flight"] == 0


def test_restore_lets_updates_that_arrived_meanwhile_win() -> None:
    buffer = Buffer(hard_limit=100)
    sid = new_session_id()
    buffer.add(SESSIONS, [session(session_id=sid, status="processing", completed_tasks=5)])
    drained = buffer.drain()
    buffer.add(SESSIONS, [session(session_id=sid, status="completed", completed_tasks=3)])
    buffer.restore(SESSIONS, drained.of(SESSIONS))
    merged = buffer.drain().of(SESSIONS)[sid]
    assert merged["status"] == "completed"  # the newer update wins ...
    assert merged["completed_tasks"] == 5  # ... but counters still never decrease
    assert buffer.counts()["in_flight"] == 1  # the restored record merged into the newer one


def test_waiting_tasks_do_not_count_towards_the_flush_trigger() -> None:
    buffer = Buffer(hard_limit=100)
    sid = new_session_id()
    buffer.add(TASKS, [task(sid, task_id="w")])
    drained = buffer.drain()
    buffer.restore(TASKS, drained.of(TASKS), {"w": 12.5})
    assert buffer.counts()["waiting"] == 1
    assert buffer.add(TASKS, [task(sid, task_id="x")]) == 1
    assert buffer.drain().waiting_since == {"w": 12.5}


def test_concurrent_writers_lose_no_update() -> None:
    """8 threads add interleaved updates; the final state equals sequential coalescing."""
    buffer = Buffer(hard_limit=1_000_000)
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
