"""Several instances under gunicorn on a 3-node MariaDB Galera cluster (tests/galera.py).

Each test starts with every node Synced; tests that kill or stop nodes bring them
back. Rows are read on every node with ``wsrep_sync_wait = 1``, so a read sees every
write the cluster committed before it.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql
import pytest
import requests

from tests.conftest import REAL_CONNECT
from tests.factories import new_session_id, session, task
from tests.galera import GaleraCluster, GaleraNode, galera_cluster  # noqa: F401 - fixture
from tests.gunicorn_server import API, Server, wait_for

pytestmark = [pytest.mark.mysql, pytest.mark.e2e, pytest.mark.galera]

STATUSES = ("pending", "processing", "completed", "failed")
# Quick flushes and probes, short database timeouts: a dead node costs seconds, not minutes.
QUICK = {
    "BUFFER_FLUSH_INTERVAL": "0.2",
    "HEALTH_CHECK_INTERVAL": "0.5",
    "DB_CONNECT_TIMEOUT": "1",
    "DB_READ_TIMEOUT": "10",
    "DB_WRITE_TIMEOUT": "10",
    "SERVICE_GRACEFUL_TIMEOUT": "20",
}


@dataclass
class GaleraDatabase:
    """A database of one test on the cluster, readable on any node."""

    cluster: GaleraCluster
    name: str

    def env(self, *order: int, **extra: str) -> dict[str, str]:
        """The service's environment with DB_HOST listing the nodes of ``order``."""
        return {
            "DB_DRIVER": "mysql",
            "DB_HOST": self.cluster.hosts(*order),
            "DB_USER": "root",
            "DB_PASSWORD": "",
            "DB_DATABASE": self.name,
            **QUICK,
            **extra,
        }

    def query(self, node: GaleraNode, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = REAL_CONNECT(
            host="127.0.0.1",
            port=node.port,
            user="root",
            password="",
            database=self.name,
            connect_timeout=5,
            read_timeout=30,
            autocommit=True,
        )
        try:
            with conn.cursor() as cur:
                # Causal read: wait until this node applied everything committed before.
                cur.execute("SET SESSION wsrep_sync_wait = 1")
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def execute(self, node: GaleraNode, sql: str) -> None:
        self.query(node, sql)


@pytest.fixture
def cluster(galera_cluster: GaleraCluster) -> GaleraCluster:  # noqa: F811 - the fixture
    """The shared cluster with every node up and Synced."""
    galera_cluster.ensure_healthy()
    return galera_cluster


@pytest.fixture
def gdb(cluster: GaleraCluster) -> Iterator[GaleraDatabase]:
    name = f"pstest_galera_{secrets.token_hex(4)}"
    first = cluster.nodes[0]
    conn = REAL_CONNECT(host="127.0.0.1", port=first.port, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    yield GaleraDatabase(cluster, name)
    cluster.ensure_healthy()
    conn = REAL_CONNECT(host="127.0.0.1", port=first.port, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def post(server: Server, kind: str, records: list[dict[str, Any]]) -> bool:
    """Post a batch; whether the service acknowledged it (any failure counts as not)."""
    try:
        return requests.post(f"{server.url}{API}/{kind}/batch", json={kind: records}, timeout=10).ok
    except requests.RequestException:
        return False


def flush_until_done(server: Server, timeout: float = 60) -> dict[str, Any]:
    """POST /flush until it answers 200 (a cluster that just lost a node stalls writes)."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.post(f"{server.url}{API}/flush", timeout=60)
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(0.5)


def errors_in(server: Server) -> list[str]:
    return [line for line in server.output().splitlines() if re.search(r"\bERROR\b", line)]


# --- two instances, overlapping updates of the same rows ----------------------------------------


@dataclass
class Acknowledged:
    """What the service acknowledged, per row: the last update, the largest counter."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    most_completed: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)

    def session(self, record: dict[str, Any]) -> None:
        with self.lock:
            sid = record["session_id"]
            self.sessions[sid] = record
            self.most_completed[sid] = max(
                self.most_completed.get(sid, 0), record["completed_tasks"]
            )

    def task(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.tasks[record["task_id"]] = record["target_text"]


def test_overlapping_updates_through_two_nodes_end_as_the_last_acknowledged_everywhere(
    gdb: GaleraDatabase, start_server: Callable[..., Server]
) -> None:
    first = start_server(**gdb.env(0, 1, 2), SERVICE_INSTANCE_ID="on-node1")
    second = start_server(**gdb.env(1, 2, 0), SERVICE_INSTANCE_ID="on-node2")
    instances = (first, second)
    sids = [new_session_id() for _ in range(12)]
    task_ids = {sid: [f"{sid[:8]}-task-{n}" for n in range(4)] for sid in sids}
    acked = Acknowledged()
    samples: dict[str, list[int]] = {sid: [] for sid in sids}
    stop = threading.Event()

    def update(sid: str, rng: random.Random) -> None:
        # Updates of one row are sent one after the other, alternating instances: each
        # is acknowledged before the next, so "the last acknowledged" is well defined.
        for round_ in range(15):
            via = instances[(round_ + rng.randrange(2)) % 2]
            record = session(
                session_id=sid,
                status=rng.choice(STATUSES),
                completed_tasks=rng.randrange(100),
                metadata={"round": round_, "via": via.url},
            )
            if post(via, "sessions", [record]):
                acked.session(record)
            tasks = [task(sid, task_id=i, target_text=f"round {round_}") for i in task_ids[sid]]
            if post(via, "tasks", tasks):
                for record in tasks:
                    acked.task(record)
            time.sleep(rng.uniform(0, 0.1))

    def sample() -> None:
        # The session counters as a third node sees them, over and over: they never go back.
        node = gdb.cluster.nodes[2]
        marks = ", ".join(["%s"] * len(sids))
        while not stop.is_set():
            try:
                rows = gdb.query(
                    node,
                    "SELECT session_id, completed_tasks FROM translation_sessions "
                    f"WHERE session_id IN ({marks})",
                    *sids,
                )
            except pymysql.MySQLError:
                continue  # the tables may not exist yet
            for sid, completed in rows:
                samples[sid].append(completed)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    writers = [
        threading.Thread(target=update, args=(sid, random.Random(n))) for n, sid in enumerate(sids)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    for instance in instances:
        flush_until_done(instance)
    stop.set()
    sampler.join(10)

    assert acked.sessions, "no session update was acknowledged"
    for node in gdb.cluster.nodes:
        rows = {
            row[0]: row[1:]
            for row in gdb.query(
                node,
                "SELECT session_id, status, completed_tasks, metadata FROM translation_sessions",
            )
        }
        for sid, last in acked.sessions.items():
            status, completed, metadata = rows[sid]
            assert (status, completed) == (last["status"], acked.most_completed[sid]), node.name
            assert json.loads(metadata) == last["metadata"], node.name
        stored_tasks = dict(gdb.query(node, "SELECT task_id, target_text FROM translation_tasks"))
        assert stored_tasks == acked.tasks, node.name
    for sid, seen in samples.items():
        assert seen == sorted(seen), f"completed_tasks of {sid} went back: {seen}"
    for instance in instances:
        assert errors_in(instance) == []


# --- a node dies under load --------------------------------------------------------------------


def test_a_killed_node_is_left_for_the_next_nothing_acknowledged_is_lost_and_it_rejoins_by_ist(
    gdb: GaleraDatabase, start_server: Callable[..., Server]
) -> None:
    cluster = gdb.cluster
    doomed = cluster.nodes[0]
    on_doomed = start_server(**gdb.env(0, 1, 2), SERVICE_INSTANCE_ID="on-node1")
    elsewhere = start_server(**gdb.env(1, 2, 0), SERVICE_INSTANCE_ID="on-node2")
    sid = new_session_id()
    assert post(on_doomed, "sessions", [session(session_id=sid)])
    flush_until_done(on_doomed)
    acknowledged: list[str] = []
    lock = threading.Lock()
    batches_sent = threading.Semaphore(0)

    def load(server: Server, prefix: str) -> None:
        for n in range(60):
            records = [task(sid, task_id=f"{prefix}-{n}-{i}") for i in range(20)]
            if post(server, "tasks", records):
                with lock:
                    acknowledged.extend(r["task_id"] for r in records)
            batches_sent.release()
            time.sleep(0.05)

    loaders = [
        threading.Thread(target=load, args=(on_doomed, "a")),
        threading.Thread(target=load, args=(elsewhere, "b")),
    ]
    for loader in loaders:
        loader.start()
    for _ in range(30):  # mid-load: a quarter of the batches are out
        batches_sent.acquire(timeout=60)
    cluster.kill(doomed)
    for loader in loaders:
        loader.join(120)
    assert len(acknowledged) == 2 * 60 * 20  # the buffer takes every batch meanwhile
    for server in (on_doomed, elsewhere):
        flush_until_done(server)
    health = on_doomed.get("/health").json()
    assert health["database_server"] != doomed.address
    for node in cluster.nodes[1:]:
        stored = {row[0] for row in gdb.query(node, "SELECT task_id FROM translation_tasks")}
        assert set(acknowledged) <= stored, node.name

    logged_before = len(doomed.log_text())
    cluster.rejoin(doomed)
    rejoin_log = doomed.log_text()[logged_before:]
    assert "IST received" in rejoin_log
    stored = {row[0] for row in gdb.query(doomed, "SELECT task_id FROM translation_tasks")}
    assert set(acknowledged) <= stored


# --- the cluster loses quorum -------------------------------------------------------------------


def test_quorum_loss_turns_health_503_and_records_land_soon_after_the_cluster_recovers(
    gdb: GaleraDatabase, start_server: Callable[..., Server]
) -> None:
    cluster = gdb.cluster
    # A long backoff: without the probe ending it, records would wait minutes.
    server = start_server(
        **gdb.env(0, 1, 2, BUFFER_RETRY_BACKOFF_INITIAL="300", BUFFER_RETRY_BACKOFF_MAX="300")
    )
    sid = new_session_id()
    assert post(server, "sessions", [session(session_id=sid)])
    flush_until_done(server)
    assert server.get("/health").status_code == 200

    for node in cluster.nodes[1:]:
        cluster.freeze(node)  # two of three nodes go silent: the survivor loses quorum
    assert wait_for(lambda: server.get("/health").status_code == 503, timeout=30), (
        "/health stayed 200 after the cluster lost quorum"
    )
    report = server.get("/health").json()
    assert report["database"] == "unhealthy"
    assert report["database_error"]
    tasks = [task(sid) for _ in range(50)]
    assert post(server, "tasks", tasks)  # buffered while no node takes writes

    def backing_off_long() -> bool:
        # Full jitter may draw a short backoff; wait for a failed flush that drew a long one.
        return server.get(f"{API}/stats").json()["flush_info"]["retry_in_seconds"] > 60

    assert wait_for(backing_off_long, timeout=120)

    for node in cluster.nodes[1:]:
        cluster.thaw(node)
    # A thawed node reports its old state for a moment; wait until the cluster is whole.
    for node in cluster.nodes:
        cluster.wait_synced(node)
    assert wait_for(lambda: server.get("/health").status_code == 200, timeout=30), (
        "/health did not recover with the cluster"
    )
    healthy_at = time.monotonic()
    wanted = {t["task_id"] for t in tasks}

    def landed() -> bool:
        try:
            rows = gdb.query(cluster.nodes[0], "SELECT task_id FROM translation_tasks")
        except pymysql.MySQLError:
            return False
        return wanted <= {row[0] for row in rows}

    assert wait_for(landed, timeout=10), "the records waited for the flush backoff"
    assert time.monotonic() - healthy_at < 10


# --- instances starting together ---------------------------------------------------------------


@pytest.mark.parametrize("tables", ["none", "without ingest_seq"])
def test_instances_starting_together_on_three_nodes_log_no_error(
    gdb: GaleraDatabase, start_server: Callable[..., Server], tables: str
) -> None:
    if tables != "none":
        starter = start_server(**gdb.env(0))
        starter.stop()
        for table in ("translation_tasks", "translation_sessions"):
            gdb.execute(gdb.cluster.nodes[0], f"ALTER TABLE {table} DROP COLUMN ingest_seq")
    started: list[Server] = []
    failures: list[BaseException] = []

    def start(order: tuple[int, ...], name: str) -> None:
        try:
            started.append(start_server(**gdb.env(*order), SERVICE_INSTANCE_ID=name))
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=start, args=(order, f"instance-{n}"))
        for n, order in enumerate([(0, 1, 2), (1, 2, 0), (2, 0, 1)])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    sid = new_session_id()
    assert post(started[0], "sessions", [session(session_id=sid)])
    flush_until_done(started[0])
    for n, server in enumerate(started):
        assert post(server, "tasks", [task(sid, task_id=f"t-{n}")])
        flush_until_done(server)
    for server in started:
        assert server.get("/health").status_code == 200
        assert errors_in(server) == []
    for node in gdb.cluster.nodes:
        assert gdb.query(node, "SELECT COUNT(*) FROM translation_tasks") == [(3,)]


# --- a large backlog against a concurrent writer -----------------------------------------------


def test_a_backlog_of_20000_rows_lands_in_chunks_and_never_overwrites_newer_updates(
    gdb: GaleraDatabase, start_server: Callable[..., Server]
) -> None:
    backlog = start_server(
        **gdb.env(
            0,
            1,
            2,
            BUFFER_FLUSH_INTERVAL="3600",
            BUFFER_MAX_SIZE="100000",
            BUFFER_HARD_LIMIT="200000",
            DB_MAX_ROWS_PER_TRANSACTION="2000",
        ),
        SERVICE_INSTANCE_ID="backlog",
    )
    writer = start_server(**gdb.env(1, 2, 0), SERVICE_INSTANCE_ID="writer")
    sid = new_session_id()
    assert post(backlog, "sessions", [session(session_id=sid)])
    flush_until_done(backlog)
    ids = [f"row-{n:05d}" for n in range(20_000)]
    for start in range(0, len(ids), 1000):
        records = [task(sid, task_id=i, target_text="backlog") for i in ids[start : start + 1000]]
        assert post(backlog, "tasks", records)

    newer: dict[str, str] = {}
    stop = threading.Event()

    def write_newer() -> None:
        rng = random.Random(3)
        round_ = 0
        while not stop.is_set():
            round_ += 1
            chosen = rng.sample(ids, 200)
            records = [task(sid, task_id=i, target_text=f"newer {round_}") for i in chosen]
            if post(writer, "tasks", records):
                for record in records:
                    newer[record["task_id"]] = record["target_text"]

    concurrent = threading.Thread(target=write_newer)
    concurrent.start()
    try:
        assert wait_for(lambda: len(newer) > 1000, timeout=60)
        result = flush_until_done(backlog, timeout=120)
    finally:
        stop.set()
        concurrent.join(30)
    flush_until_done(writer)
    assert result["tasks_written"] == 20_000
    stats = backlog.get(f"{API}/stats").json()
    assert stats["flush_info"]["transactions"] >= 20_000 // 2000
    stored = dict(
        gdb.query(gdb.cluster.nodes[2], "SELECT task_id, target_text FROM translation_tasks")
    )
    assert len(stored) == 20_000
    overwritten = [i for i, text in newer.items() if stored[i] != text]
    assert overwritten == [], f"{len(overwritten)} newer updates were overwritten by the backlog"
    assert all(stored[i] == "backlog" for i in ids if i not in newer)
