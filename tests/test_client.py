"""The Python client (client/, package ``persistence_client``).

Against the real service under gunicorn with MariaDB (``mysql``/``e2e``): the
seed's calls, a stalled service, a restart, a 503 storm, a 422, batching,
queue overflow, the sync twin. Against a small recording HTTP server in this
file: the bytes on the wire (token, gzip), the retry rules of each status,
close and process exit. The fault proxy of tests/faultproxy.py sits between
client and service where the link must fail.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import gzip
import http
import http.server
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import persistence_client
import persistence_client.sync
import pytest
from persistence_client import (
    ClientStats,
    PersistenceClient,
    SyncPersistenceClient,
    __version__,
)
from persistence_client.core import ClientCore
from persistence_client.outbox import SESSIONS, TASKS, Outbox
from persistence_client.retry import backoff_delay, parse_retry_after

from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.faultproxy import FaultProxy
from tests.gunicorn_server import REPO, Server, free_port, wait_for

STATS_URL = "/api/v1/persistence/stats"
SOURCE_TEXT = "The gate opens at dawn."  # every factory task's text: never in a client log

# --- helpers -------------------------------------------------------------------------------


def assert_conserved(stats: ClientStats) -> None:
    """Every record handed to the client is accounted for exactly once."""
    assert stats.submitted == stats.sent + stats.refused + stats.given_up + stats.pending
    assert stats.given_up == sum(stats.given_up_by_reason.values())


def task_ids_in(db: Database, ids: list[str]) -> set[str]:
    marks = ",".join("?" * len(ids))
    return {
        row[0]
        for row in db.query(
            f"SELECT task_id FROM translation_tasks WHERE task_id IN ({marks})", *ids
        )
    }


def session_ids_in(db: Database, ids: list[str]) -> set[str]:
    marks = ",".join("?" * len(ids))
    rows = db.query(
        f"SELECT session_id FROM translation_sessions WHERE session_id IN ({marks})", *ids
    )
    return {row[0] for row in rows}


def access_log_count(server: Server, path: str) -> int:
    """Requests gunicorn logged for ``POST <path>`` (its access log goes to the server's log)."""
    return server.output().count(f'"POST {path} HTTP/1.1"')


def service_stats(server: Server) -> dict[str, Any]:
    return server.get(STATS_URL).json()


@pytest.fixture
def client_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="persistence_client")
    return caplog


def client_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "persistence_client"]


@pytest.fixture
def service(start_server: Callable[..., Server], mysql_env: dict[str, str]) -> Server:
    """The service under gunicorn on MariaDB, flushing its buffer every 0.2 s."""
    return start_server(**mysql_env, BUFFER_FLUSH_INTERVAL="0.2")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def proxy_to() -> Iterator[Callable[[int], FaultProxy]]:
    """``proxy_to(port)``: a FaultProxy in front of 127.0.0.1:``port``, closed afterwards."""
    proxies: list[FaultProxy] = []

    def build(port: int) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", port)
        proxies.append(proxy)
        return proxy

    yield build
    for proxy in proxies:
        proxy.close()


def proxy_url(proxy: FaultProxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


# --- a small HTTP server that records what it receives --------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def records(self) -> Any:
        raw = (
            gzip.decompress(self.body)
            if self.headers.get("content-encoding") == "gzip"
            else self.body
        )
        return json.loads(raw)


@dataclass
class Recorder:
    """Records every request; answers from ``script`` (status, headers, body), else 200."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def batches(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith("/batch")]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    state = Recorder()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.requests.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                scripted = state.script.pop(0) if state.script else None
            status, headers, payload = scripted or (200, {}, b'{"status":"accepted"}')
            self.send_response(status)
            headers = {"Content-Type": "application/json", **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def nothing_listens() -> str:
    """The URL of a port where no server listens: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"


# --- against the real service --------------------------------------------------------------


@pytest.mark.mysql
@pytest.mark.e2e
def test_the_seed_calls_work_unchanged_and_rows_land(service: Server, mysql_db: Database) -> None:
    sid = new_session_id()
    tasks = [task(sid) for _ in range(6)]

    async def backend() -> tuple[bool, ClientStats]:
        # The seed's integration code, only the import changed.
        client = PersistenceClient(base_url=service.url, timeout=2.0)
        await client.persist_session(session(session_id=sid))
        fire_and_forget = asyncio.create_task(client.persist_tasks(tasks[:3]))
        await asyncio.wait_for(client.persist_tasks(tasks[3:]), 2.0)
        await fire_and_forget
        flushed = await client.flush_all()
        await client.close()
        return flushed, client.stats

    flushed, stats = asyncio.run(backend())
    assert flushed
    assert session_ids_in(mysql_db, [sid]) == {sid}
    assert task_ids_in(mysql_db, [t["task_id"] for t in tasks]) == {t["task_id"] for t in tasks}
    assert (stats.sent, stats.pending, stats.given_up, stats.refused) == (7, 0, 0, 0)
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_a_stalled_service_never_holds_the_event_loop_and_records_land_later(
    service: Server, mysql_db: Database, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(port_of(service.url))
    sid = new_session_id()
    tasks = [task(sid) for _ in range(30)]
    timeout = 1.0

    async def backend() -> tuple[float, float, float, bool, bool, ClientStats]:
        client = PersistenceClient(
            proxy_url(proxy), timeout=timeout, batch_size=10, linger=0.05, backoff_max=0.3
        )
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        proxy.set_mode("stall")
        slowest_call = 0.0
        started = time.monotonic()
        await client.persist_session(session(session_id=sid))
        for record in tasks:
            begin = time.monotonic()
            assert await client.persist_tasks([record])
            slowest_call = max(slowest_call, time.monotonic() - begin)
            await asyncio.sleep(0.01)
        begin = time.monotonic()
        flushed_while_stalled = await client.flush_all()
        flush_took = time.monotonic() - begin
        assert time.monotonic() - started > timeout  # the stall outlasted a request timeout
        stop.set()
        await ticking

        proxy.set_mode("pass")
        landed = False
        deadline = time.monotonic() + 20
        while not landed and time.monotonic() < deadline:
            landed = await client.flush_all(timeout=5)
        await client.aclose()
        return slowest_call, flush_took, max(gaps), flushed_while_stalled, landed, client.stats

    slowest_call, flush_took, worst_gap, flushed_while_stalled, landed, stats = asyncio.run(
        backend()
    )
    assert slowest_call < timeout
    assert flush_took < timeout + 0.5  # flush_all gives up at its timeout (plus scheduling)
    assert worst_gap < timeout  # the event loop kept running while requests hung
    assert not flushed_while_stalled
    assert landed
    assert stats.failures_by_cause.get("timeout", 0) >= 1
    assert stats.retries >= 1
    assert (stats.sent, stats.given_up, stats.pending) == (31, 0, 0)
    assert task_ids_in(mysql_db, [t["task_id"] for t in tasks]) == {t["task_id"] for t in tasks}
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_records_queued_while_the_service_restarts_land_after_it(
    start_server: Callable[..., Server],
    mysql_env: dict[str, str],
    mysql_db: Database,
    proxy_to: Callable[[int], FaultProxy],
) -> None:
    first = start_server(**mysql_env)
    proxy = proxy_to(port_of(first.url))
    sid = new_session_id()
    before = [task(sid) for _ in range(5)]
    during = [task(sid) for _ in range(7)]

    with SyncPersistenceClient(
        proxy_url(proxy), timeout=1.0, linger=0.05, backoff_initial=0.05, backoff_max=0.3
    ) as client:
        client.persist_session(session(session_id=sid))
        client.persist_tasks(before)
        assert client.flush_all(timeout=10)

        assert first.stop() == 0  # SIGTERM: the service writes its buffer and exits
        for record in during:
            assert client.persist_tasks([record])
        assert wait_for(lambda: client.stats.failures_by_cause.get("connection", 0) >= 2)
        assert client.stats.pending == len(during)

        second = start_server(**mysql_env)
        proxy.retarget("127.0.0.1", port_of(second.url))
        assert client.flush_all(timeout=10)
    stats = client.stats

    ids = [t["task_id"] for t in before + during]
    assert task_ids_in(mysql_db, ids) == set(ids)
    assert (stats.sent, stats.given_up, stats.pending) == (13, 0, 0)
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_a_503_storm_is_retried_after_retry_after_until_everything_lands(
    request: pytest.FixtureRequest,
    start_server: Callable[..., Server],
    mysql_env: dict[str, str],
    mysql_db: Database,
) -> None:
    database = FaultProxy(mysql_env["DB_HOST"], int(mysql_env["DB_PORT"]))
    request.addfinalizer(database.close)
    service = start_server(
        **{**mysql_env, "DB_HOST": "127.0.0.1", "DB_PORT": str(database.port)},
        DB_CONNECT_TIMEOUT="1",
        DB_READ_TIMEOUT="2",
        DB_WRITE_TIMEOUT="2",
        BUFFER_MAX_SIZE="5",
        BUFFER_MAX_BATCH_SIZE="5",
        BUFFER_HARD_LIMIT="10",
        BUFFER_FLUSH_INTERVAL="0.3",
        BUFFER_RETRY_BACKOFF_INITIAL="0.2",
        BUFFER_RETRY_BACKOFF_MAX="0.5",
    )
    sid = new_session_id()
    tasks = [task(sid) for _ in range(24)]
    database.set_mode("cut")  # the service cannot write: its buffer fills to the hard limit
    started = time.monotonic()

    async def backend() -> tuple[bool, ClientStats]:
        async with PersistenceClient(
            service.url, batch_size=5, linger=0.05, backoff_initial=0.05, backoff_max=5
        ) as client:
            await client.persist_session(session(session_id=sid))
            await client.persist_tasks(tasks)
            assert await asyncio.to_thread(
                wait_for, lambda: client.stats.failures_by_cause.get("http_503", 0) >= 1
            )
            await asyncio.sleep(1.5)  # a storm: every batch sent now gets 503
            database.set_mode("pass")
            return await client.flush_all(timeout=20), client.stats

    flushed, stats = asyncio.run(backend())
    elapsed = time.monotonic() - started
    assert flushed
    ids = [t["task_id"] for t in tasks]
    assert task_ids_in(mysql_db, ids) == set(ids)
    assert (stats.sent, stats.given_up, stats.refused, stats.pending) == (25, 0, 0, 0)
    assert stats.retries >= 1
    assert stats.last_error is not None
    assert stats.last_error.startswith("HTTP 503: The buffer is full")
    refused_503 = service_stats(service)["refused"]["buffer_full"]["batches"]
    assert refused_503 == stats.failures_by_cause["http_503"]
    # Retry-After is 1 s here: waiting for it allows at most one 503 per second (+ the first).
    assert refused_503 <= elapsed + 1
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_a_422_is_refused_once_not_retried_and_counted_with_the_services_reason(
    service: Server, mysql_db: Database, client_log: pytest.LogCaptureFixture
) -> None:
    sid = new_session_id()
    bad = [task(sid), task(sid, row_index=-1), task(sid)]
    good = task(sid)

    async def backend() -> tuple[bool, bool, ClientStats]:
        async with PersistenceClient(service.url, batch_size=3, linger=0.05) as client:
            await client.persist_session(session(session_id=sid))
            await client.persist_tasks(bad)
            after_refusal = await client.flush_all(timeout=10)
            await client.persist_tasks([good])
            after_good = await client.flush_all(timeout=10)
            return after_refusal, after_good, client.stats

    after_refusal, after_good, stats = asyncio.run(backend())
    assert not after_refusal  # records queued before it were refused
    assert after_good
    assert stats.refused == 3
    assert stats.refused_by_status == {422: 3}
    assert stats.retries == 0
    assert stats.requests == 3  # the session, the refused tasks once, the good task
    refusal = stats.last_refusal
    assert refusal is not None
    assert (refusal.kind, refusal.status, refusal.records) == (TASKS, 422, 3)
    assert refusal.detail == "1 of 3 tasks are invalid; nothing was accepted."
    assert [(e["index"], e["task_id"], e["field"]) for e in refusal.errors] == [
        (1, bad[1]["task_id"], "row_index")
    ]
    assert service_stats(service)["refused"]["invalid"]["batches"] == 1
    assert task_ids_in(mysql_db, [t["task_id"] for t in [*bad, good]]) == {good["task_id"]}

    [warning] = [m for m in client_messages(client_log) if "refused" in m]
    assert "HTTP 422" in warning
    assert refusal.detail in warning
    assert f"index 1 task_id={bad[1]['task_id']!r} row_index" in warning
    assert not any(SOURCE_TEXT in m for m in client_messages(client_log))
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_n_calls_become_n_over_batch_size_requests_on_one_connection(
    service: Server, mysql_db: Database, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(port_of(service.url))
    sid = new_session_id()
    tasks = [task(sid) for _ in range(100)]
    late = [task(sid) for _ in range(3)]
    received_before = service_stats(service)["performance"]["tasks_received"]

    async def backend() -> tuple[int, int, ClientStats]:
        async with PersistenceClient(proxy_url(proxy), batch_size=25, linger=0.3) as client:
            await client.persist_session(session(session_id=sid))
            for record in tasks:  # one call per record, as progress reports come
                await client.persist_tasks([record])
            assert await asyncio.to_thread(wait_for, lambda: client.stats.sent == 101)
            connections = proxy.connections
            burst_requests = client.stats.requests
            for record in late:
                await client.persist_tasks([record])
            # Fewer than batch_size records go out once the oldest has waited `linger`.
            assert await asyncio.to_thread(wait_for, lambda: client.stats.sent == 104)
            return connections, burst_requests, client.stats

    connections, burst_requests, stats = asyncio.run(backend())
    assert burst_requests == 1 + 100 // 25
    assert connections == 1  # one pooled connection for every request of the burst
    assert stats.requests == burst_requests + 1
    assert stats.batches_sent == stats.requests
    api = "/api/v1/persistence"
    assert wait_for(lambda: access_log_count(service, f"{api}/tasks/batch") == 100 // 25 + 1)
    assert access_log_count(service, f"{api}/sessions/batch") == 1
    received = service_stats(service)["performance"]["tasks_received"] - received_before
    assert received == 103
    ids = [t["task_id"] for t in tasks + late]
    assert wait_for(lambda: len(task_ids_in(mysql_db, ids)) == len(ids))


@pytest.mark.mysql
@pytest.mark.e2e
def test_queue_overflow_is_counted_exactly_and_what_fit_lands(
    service: Server, mysql_db: Database, proxy_to: Callable[[int], FaultProxy]
) -> None:
    proxy = proxy_to(port_of(service.url))
    proxy.set_mode("cut")
    sid = new_session_id()
    fitting = [task(sid) for _ in range(9)]
    overflow = [task(sid) for _ in range(3)]

    async def backend() -> tuple[list[bool], ClientStats, bool, ClientStats]:
        async with PersistenceClient(
            proxy_url(proxy), max_queue=10, linger=0.05, backoff_max=0.2
        ) as client:
            results = [await client.persist_session(session(session_id=sid))]
            for record in fitting:
                results.append(await client.persist_tasks([record]))
            results.append(await client.persist_tasks(overflow[:2]))  # all or nothing
            results.append(await client.persist_tasks(overflow[2:]))
            while_full = client.stats
            proxy.set_mode("pass")
            flushed = await client.flush_all(timeout=10)
            return results, while_full, flushed, client.stats

    results, while_full, flushed, stats = asyncio.run(backend())
    assert results == [True] * 10 + [False, False]
    assert while_full.pending == 10
    assert while_full.given_up == len(overflow) == stats.given_up
    assert stats.given_up_by_reason == {"queue_full": len(overflow)}
    assert flushed
    assert (stats.submitted, stats.sent, stats.pending) == (13, 10, 0)
    ids = [t["task_id"] for t in fitting + overflow]
    assert task_ids_in(mysql_db, ids) == {t["task_id"] for t in fitting}
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_the_sync_twin_delivers_and_sends_its_queue_on_close(
    service: Server, mysql_db: Database
) -> None:
    sid = new_session_id()
    first = [task(sid) for _ in range(4)]
    last = [task(sid) for _ in range(3)]
    results: list[bool] = []

    with SyncPersistenceClient(service.url, timeout=2.0, linger=60) as client:
        results.append(client.persist_session(session(session_id=sid)))

        def report(records: list[dict[str, Any]]) -> None:
            results.append(client.persist_tasks(records))

        threads = [threading.Thread(target=report, args=([t],)) for t in first]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.flush_all(timeout=10)
        assert task_ids_in(mysql_db, [t["task_id"] for t in first]) == {t["task_id"] for t in first}
        results.append(client.persist_tasks(last))  # linger 60 s: only close sends these
    stats = client.stats

    assert results == [True] * 6
    assert (stats.sent, stats.pending, stats.given_up) == (8, 0, 0)
    ids = [t["task_id"] for t in last]
    assert wait_for(lambda: task_ids_in(mysql_db, ids) == set(ids))  # the service's own flush
    assert_conserved(stats)


@pytest.mark.mysql
@pytest.mark.e2e
def test_gzip_bodies_and_a_token_land_through_the_real_service(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    token = "tok-" + f"{random.getrandbits(128):032x}"
    server = start_server(**mysql_env, SERVICE_AUTH_TOKENS=token, BUFFER_FLUSH_INTERVAL="0.2")
    sid = new_session_id()
    tasks = [task(sid, source_text="The gate opens at dawn. " * 40) for _ in range(20)]

    async def backend(key: str) -> tuple[bool, ClientStats]:
        async with PersistenceClient(
            server.url, token=key, gzip=True, batch_size=5, linger=0.05, max_retries=1
        ) as client:
            await client.persist_session(session(session_id=sid))
            await client.persist_tasks(tasks)
            flushed = await client.flush_all(timeout=10)
        return flushed, client.stats

    refused_flush, refused = asyncio.run(backend("not-the-token"))
    assert not refused_flush
    assert refused.refused_by_status == {401: 21}  # refused at once, not retried
    assert refused.retries == 0
    assert_conserved(refused)

    flushed, stats = asyncio.run(backend(token))
    assert flushed
    assert (stats.sent, stats.given_up, stats.refused) == (21, 0, 0)
    assert task_ids_in(mysql_db, [t["task_id"] for t in tasks]) == {t["task_id"] for t in tasks}
    answer = httpx.get(
        server.url + STATS_URL, headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    service_view = answer.json()
    assert service_view["performance"]["tasks_received"] == 20
    # The refused client's 4 task batches, its session batch and its flush.
    assert service_view["refused"]["unauthorized"]["batches"] == 6
    assert token not in server.output()


# --- against a recording server: the wire, the status rules, close and exit ---------------


def test_token_and_gzip_are_on_the_wire(
    recorder: Recorder, client_log: pytest.LogCaptureFixture
) -> None:
    token = "tok-" + f"{random.getrandbits(128):032x}"
    sid = new_session_id()
    record = session(session_id=sid)
    tasks = [task(sid) for _ in range(3)]

    async def backend() -> bool:
        async with PersistenceClient(recorder.url, token=token, gzip=True, linger=0.05) as client:
            await client.persist_session(record)
            await client.persist_tasks(tasks)
            record["status"] = "changed after the call"  # the client sent a snapshot
            return await client.flush_all(timeout=5)

    assert asyncio.run(backend())
    sessions_req, tasks_req, flush_req = recorder.requests
    assert (sessions_req.path, tasks_req.path, flush_req.path) == (
        "/api/v1/persistence/sessions/batch",
        "/api/v1/persistence/tasks/batch",
        "/api/v1/persistence/flush",
    )
    for request in recorder.requests:
        assert request.headers["authorization"] == f"Bearer {token}"
        assert request.headers["user-agent"] == f"persistence-client/{__version__}"
    for request in (sessions_req, tasks_req):
        assert request.headers["content-encoding"] == "gzip"
        assert request.headers["content-type"] == "application/json"
        assert int(request.headers["content-length"]) == len(request.body)
        assert request.body[:2] == b"\x1f\x8b"
        assert len(request.headers["x-request-id"]) == 32
    assert sessions_req.records() == {"sessions": [{**record, "status": "processing"}]}
    assert tasks_req.records() == {"tasks": tasks}
    assert not any(token in m for m in client_messages(client_log))


def test_without_token_or_gzip_the_body_is_plain_json(recorder: Recorder) -> None:
    with SyncPersistenceClient(recorder.url, linger=0.05) as client:
        client.persist_tasks(
            [
                {
                    "task_id": "t1",
                    "start_time": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
                }
            ]
        )
        assert client.flush_all(timeout=5)
    [batch] = recorder.batches()
    assert "authorization" not in batch.headers
    assert "content-encoding" not in batch.headers
    assert json.loads(batch.body) == {
        "tasks": [{"task_id": "t1", "start_time": "2026-01-02T03:04:05+00:00"}]
    }


def test_408_429_and_5xx_are_retried_other_4xx_are_refused_with_the_reason(
    recorder: Recorder,
) -> None:
    detail = b'{"detail":"Missing or invalid bearer token."}'
    recorder.script += [
        (500, {}, b'{"detail":"boom"}'),
        (408, {}, b""),
        (429, {"Retry-After": "0"}, b"{}"),
        (503, {"Retry-After": "0"}, b'{"detail":"busy"}'),
        (200, {}, b"{}"),  # the first batch lands on its fifth attempt
        (401, {}, detail),  # the second is refused at once
        (413, {"Content-Type": "text/html"}, b"<html>too large</html>"),  # the third too
    ]
    with SyncPersistenceClient(
        recorder.url, linger=0, backoff_initial=0.01, backoff_max=0.05
    ) as client:
        assert client.persist_tasks([{"task_id": "a"}])
        assert wait_for(lambda: client.stats.sent == 1)
        client.persist_tasks([{"task_id": "b"}])
        assert wait_for(lambda: client.stats.refused == 1)
        client.persist_tasks([{"task_id": "c"}, {"task_id": "d"}])
        assert wait_for(lambda: client.stats.refused == 3)
        stats = client.stats

    assert [r.records()["tasks"][0]["task_id"] for r in recorder.batches()] == ["a"] * 5 + [
        "b",
        "c",
    ]
    assert stats.retries == 4
    assert stats.failures_by_cause == {"http_500": 1, "http_408": 1, "http_429": 1, "http_503": 1}
    assert stats.refused_by_status == {401: 1, 413: 2}
    assert stats.last_refusal is not None
    phrase = http.HTTPStatus(413).phrase
    assert stats.last_refusal.detail == f"HTTP 413 {phrase} (no JSON detail)"
    assert stats.last_refusal.records == 2
    assert_conserved(stats)


def test_max_retries_gives_a_batch_up_and_counts_it(recorder: Recorder) -> None:
    recorder.script += [(503, {"Retry-After": "0"}, b'{"detail":"busy"}')] * 3
    with SyncPersistenceClient(
        recorder.url, linger=0, max_retries=2, backoff_initial=0.01, backoff_max=0.05
    ) as client:
        client.persist_tasks([{"task_id": "a"}, {"task_id": "b"}])
        assert wait_for(lambda: client.stats.given_up == 2)
        stats = client.stats
    assert len(recorder.batches()) == 3  # the first attempt and two retries
    assert stats.given_up_by_reason == {"retries_exhausted": 2}
    assert_conserved(stats)


def test_close_gives_up_what_it_cannot_send_within_its_timeout(
    client_log: pytest.LogCaptureFixture,
) -> None:
    async def backend() -> tuple[float, ClientStats, bool]:
        client = PersistenceClient(nothing_listens(), linger=0, backoff_initial=0.05)
        await client.persist_session(session())
        await client.persist_tasks([task(new_session_id()) for _ in range(4)])
        begin = time.monotonic()
        await client.aclose(timeout=0.5)
        took = time.monotonic() - begin
        accepted_after_close = await client.persist_tasks([task(new_session_id())])
        return took, client.stats, accepted_after_close

    took, stats, accepted_after_close = asyncio.run(backend())
    assert took < 0.5 + 0.5
    assert not accepted_after_close
    assert stats.given_up_by_reason == {"closed": 6}
    assert stats.pending == 0
    assert stats.failures_by_cause.get("connection", 0) >= 1
    assert any("closed with 5 records not delivered" in m for m in client_messages(client_log))
    assert_conserved(stats)


def test_an_event_loop_that_ends_before_aclose_counts_the_queue_as_given_up(
    client_log: pytest.LogCaptureFixture,
) -> None:
    client = PersistenceClient(nothing_listens(), linger=60)

    async def backend() -> None:
        await client.persist_tasks([task(new_session_id()) for _ in range(3)])

    asyncio.run(backend())  # asyncio.run cancels the client's sender as it ends
    assert client.stats.given_up_by_reason == {"closed": 3}
    assert any("before aclose()" in m for m in client_messages(client_log))
    asyncio.run(client.aclose())


def test_a_sync_client_left_open_sends_its_queue_at_interpreter_exit(recorder: Recorder) -> None:
    program = (
        "from persistence_client import SyncPersistenceClient\n"
        f"client = SyncPersistenceClient({recorder.url!r}, linger=60)\n"
        "client.persist_tasks([{'task_id': 'at-exit'}])\n"
    )
    # Where this test imported the package from (an install, or client/src).
    package_root = str(Path(persistence_client.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": package_root}
    subprocess.run([sys.executable, "-c", program], check=True, timeout=30, env=env)
    assert [r.records() for r in recorder.batches()] == [{"tasks": [{"task_id": "at-exit"}]}]


def test_a_defect_in_a_sender_step_is_logged_and_the_sender_goes_on(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, client_log: pytest.LogCaptureFixture
) -> None:
    real = ClientCore.on_response
    calls = []

    def fails_once(self: ClientCore, *args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a defect")
        real(self, *args)

    monkeypatch.setattr(ClientCore, "on_response", fails_once)
    monkeypatch.setattr(persistence_client.sync, "DEFECT_PAUSE", 0.05)
    with SyncPersistenceClient(recorder.url, linger=0) as client:
        client.persist_tasks([{"task_id": "a"}])
        assert wait_for(lambda: client.stats.sent == 1)
    assert len(recorder.batches()) == 2  # the answer lost to the defect, then a new attempt
    assert any("sender step failed" in m for m in client_messages(client_log))


def test_a_record_that_is_not_json_is_refused_at_the_call(recorder: Recorder) -> None:
    with SyncPersistenceClient(recorder.url) as client:
        with pytest.raises(TypeError, match="tasks record at index 1 is a str"):
            client.persist_tasks([{"task_id": "a"}, "b"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="index 0 cannot be sent as JSON"):
            client.persist_tasks([{"task_id": "a", "confidence": float("nan")}])
        assert client.stats.submitted == 0


def test_options_that_cannot_work_are_refused_by_name() -> None:
    for kwargs, name in [
        ({"base_url": "localhost:8001"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_queue": True}, "max_queue"),
        ({"backoff_initial": 2.0, "backoff_max": 1.0}, "backoff_max"),
        ({"token": "two words"}, "token"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} = "):
            SyncPersistenceClient(**kwargs)


def test_the_package_version_matches_its_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "client" / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["version"] == __version__
    assert pyproject["project"]["dependencies"] == ["httpx>=0.27,<1"]
    assert (REPO / "client" / "src" / "persistence_client" / "py.typed").exists()


# --- the pure parts: batching order, backoff ----------------------------------------------


def test_outbox_sends_queued_sessions_before_due_tasks_and_cuts_by_bytes() -> None:
    outbox = Outbox(batch_size=3, max_batch_bytes=10, linger=60)
    outbox.add(TASKS, [b"t1", b"t2", b"t3"], now=0)
    outbox.add(SESSIONS, [b"s1"], now=0)
    first, second = outbox.take_due(now=0), outbox.take_due(now=0)
    assert first is not None
    assert second is not None
    assert (first.kind, [e.payload for e in first.entries]) == (SESSIONS, [b"s1"])
    assert (second.kind, [e.payload for e in second.entries]) == (TASKS, [b"t1", b"t2", b"t3"])
    outbox.add(TASKS, [b"x" * 6, b"y" * 6], now=0)
    assert outbox.take_due(now=0) is not None  # 12 bytes queued: due, cut at 10 bytes
    assert len(outbox) == 1
    assert outbox.take_due(now=59) is None
    assert outbox.due_in(now=59) == pytest.approx(1)
    assert outbox.take_due(now=60) is not None


def test_backoff_grows_with_jitter_and_honours_retry_after_up_to_its_cap() -> None:
    rng = random.Random(7)
    for failures, cap in [(1, 0.2), (3, 0.8), (20, 30.0)]:
        delays = [backoff_delay(failures, 0.2, 30.0, None, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # full jitter spreads over the whole range
    with_retry_after = [backoff_delay(1, 0.2, 30.0, 5.0, rng) for _ in range(200)]
    assert all(5.0 <= d <= 5.5 for d in with_retry_after)
    assert all(30.0 <= backoff_delay(1, 0.2, 30.0, 3600.0, rng) <= 33.0 for _ in range(50))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0 ") == 0.0
    date = "Wed, 21 Oct 2026 07:28:05 GMT"
    at = email.utils.parsedate_to_datetime(date).timestamp()
    assert parse_retry_after(date, now=at - 10) == pytest.approx(10.0)
    assert parse_retry_after(date, now=at + 10) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
