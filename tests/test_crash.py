"""kill -9 of the whole gunicorn process group under load: no acknowledged record is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]


def load(url: str, sid: str, acked: list[str], stop: threading.Event, worker: int) -> None:
    """Post batches of new tasks until told to stop or the server dies; record what got 200."""
    http = requests.Session()
    n = 0
    while not stop.is_set():
        batch = [task(sid, task_id=f"crash-{worker}-{n}-{i}") for i in range(50)]
        n += 1
        try:
            response = http.post(f"{url}{API}/tasks/batch", json={"tasks": batch}, timeout=5)
        except requests.RequestException:
            return
        if response.status_code == 200:
            acked.extend(t["task_id"] for t in batch)


def test_kill_9_under_load_loses_no_acknowledged_record(
    start_server: Any,
    mysql_env: dict[str, str],
    mysql_db: Database,
    tmp_path: Path,
) -> None:
    env = {
        **mysql_env,
        "SERVICE_WORKERS": "2",
        "BUFFER_DURABILITY": "journal",
        "BUFFER_JOURNAL_DIR": str(tmp_path / "journal"),
        "BUFFER_FLUSH_INTERVAL": "0.5",
        "BUFFER_MAX_SIZE": "400",
    }
    server = start_server(**env)
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    acked: list[str] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=load, args=(server.url, sid, acked, stop, n)) for n in range(4)
    ]
    for client in clients:
        client.start()
    time.sleep(3)
    os.killpg(server.process.pid, signal.SIGKILL)  # master and workers, mid-load
    server.process.wait()
    stop.set()
    for client in clients:
        client.join()
    landed_before = mysql_db.count("translation_tasks")
    assert len(acked) >= 2000, "the load was too small to mean anything"
    assert landed_before < len(acked), "everything landed before the kill: nothing was tested"

    restarted = start_server(**env)
    # Both workers adopt journals as they start; a flush reaches a worker once it listens.
    assert wait_for(lambda: restarted.get(f"{API}/stats").json()["workers"]["count"] == 2)
    flushed = restarted.post(f"{API}/flush")
    assert (flushed.status_code, flushed.json()["workers"]) == (200, 2)
    landed = {row[0] for row in mysql_db.query("SELECT task_id FROM translation_tasks")}
    missing = set(acked) - landed
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged tasks were lost"
    recovered = restarted.get(f"{API}/stats").json()["journal"]["recovered"]
    assert recovered["records"] > 0
    assert restarted.stop() == 0


def test_a_killed_workers_journal_is_replayed_by_its_replacement(
    start_server: Any, mysql_env: dict[str, str], mysql_db: Database, tmp_path: Path
) -> None:
    server = start_server(
        **mysql_env,
        SERVICE_WORKERS="2",
        BUFFER_DURABILITY="journal",
        BUFFER_JOURNAL_DIR=str(tmp_path / "journal"),
        BUFFER_FLUSH_INTERVAL="3600",
    )
    assert wait_for(lambda: server.get(f"{API}/stats").json()["workers"]["count"] == 2)
    sid = new_session_id()
    assert server.post(f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]}).ok
    ids: list[str] = []
    for _ in range(30):
        batch = [task(sid) for _ in range(10)]
        assert server.post(f"{API}/tasks/batch", {"tasks": batch}).status_code == 200
        ids += [t["task_id"] for t in batch]
    stats = server.get(f"{API}/stats").json()["workers"]
    victim = next(pid for pid, held in zip(stats["pids"], stats["buffered"], strict=True) if held)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = server.get(f"{API}/stats").json()["workers"]["pids"]
        return len(pids) == 2 and victim not in pids

    assert wait_for(replaced, timeout=30)
    assert server.post(f"{API}/flush").status_code == 200
    landed = {row[0] for row in mysql_db.query("SELECT task_id FROM translation_tasks")}
    assert landed == set(ids)
