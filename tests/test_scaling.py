"""Several instances: host lists and failover, Galera-aware probes, chunked commits with
conflict retries, the backoff that ends when the database is back, schema changes under
concurrent starts, the clock measured against the database's, instance ids, and the
client's routing by session.

The pure parts are unit tests; the flusher runs on SQLite and MariaDB with faults
injected at the store's driver gate (tests/faults.py); failover uses fault-injecting
TCP proxies in front of the real MariaDB; an instance whose host clock is off runs
under gunicorn (tests/skewed_clock). The Galera cluster and the load balancer have their own modules
(tests/test_scaling_galera.py, tests/test_scaling_nginx.py).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from persistence_client.core import SESSION_HEADER, ClientCore, routing_session
from persistence_client.options import ClientOptions
from persistence_client.outbox import SESSIONS as CLIENT_SESSIONS
from persistence_client.outbox import TASKS as CLIENT_TASKS
from persistence_client.outbox import Outbox

from persistence import create_app
from persistence.buffer import Buffer
from persistence.config import (
    BufferSettings,
    ConfigError,
    DatabaseServer,
    describe,
    load_settings,
    parse_servers,
)
from persistence.durable import DurableBuffer
from persistence.flusher import Flusher, FlushFailed
from persistence.health import ClockSkewFilter
from persistence.records import ORDER_COLUMN, SESSIONS, TASKS, ArrivalClock
from persistence.store import Conflict, Store, TransientError
from persistence.store.probe import ClockSample, GaleraState, galera_refusal
from persistence.store.servers import ServerList
from tests.conftest import Database, MysqlServer, make_settings
from tests.factories import new_session_id, session, task
from tests.faultproxy import FaultProxy
from tests.faults import FaultyStore, writes_to
from tests.gunicorn_server import API, REPO, Server, wait_for


@pytest.fixture
def persistence_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the service's log records (its loggers do not propagate to the root)."""
    logger = logging.getLogger("persistence")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # each record once, through caplog's handler
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


# --- database.host: parsing and failover order (pure) ------------------------------------------


def test_a_host_list_names_servers_with_their_own_or_the_default_port() -> None:
    assert parse_servers("db1, db2:3307,[fd00::5]:3308,[::1]", 3306) == (
        DatabaseServer("db1", 3306),
        DatabaseServer("db2", 3307),
        DatabaseServer("fd00::5", 3308),
        DatabaseServer("::1", 3306),
    )
    assert [str(s) for s in parse_servers("db1,[::1]:3307", 3306)] == ["db1:3306", "[::1]:3307"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("db1,,db2", "without empty entries"),
        ("db1:x", "the port must be an integer 1-65535"),
        ("db1:70000", "the port must be an integer 1-65535"),
        ("::1", "write an IPv6 address in brackets"),
        ("[::1", "is not [IPv6 address]"),
        ("db1,db1", "lists db1:0 twice"),
        (" ", "must not be empty"),
    ],
)
def test_a_bad_host_list_stops_the_start_naming_the_entry(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"DB_HOST": value}, path=None, overrides={"logging": {"file": ""}})
    assert "database.host" in str(error.value)
    assert message in str(error.value)


def test_the_same_server_twice_through_the_default_port_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"lists db1:3307 twice"):
        load_settings(environ={"DB_HOST": "db1,db1:3307", "DB_PORT": "3307"})
    settings = load_settings(environ={"DB_DRIVER": "mysql", "DB_HOST": "db1,db2:3307"})
    assert describe(settings).startswith("mysql root@db1:3306,db2:3307/ai_terminal, ")


def test_the_server_list_moves_on_once_per_failure_of_the_server_in_use() -> None:
    a, b, c = parse_servers("a,b,c", 3306)
    servers = ServerList([a, b, c])
    assert servers.in_probe_order() == [a, b, c]
    assert servers.failed(a, "refused") == b
    # A late error from a server already left behind does not skip the healthy one.
    assert servers.failed(a, "refused again") == b
    assert servers.in_probe_order() == [b, c, a]
    assert servers.failed(b, "gone") == c
    assert servers.failed(c, "gone") == a  # after the last, the first again
    assert servers.use(c, "does not take writes") is True
    assert servers.use(c, "again") is False
    single = ServerList([a])
    assert single.failed(a, "refused") == a


# --- Galera readiness and the clock (pure) ------------------------------------------------------


def galera(**changes: Any) -> GaleraState:
    values: dict[str, Any] = {
        "ready": True,
        "local_state": 4,
        "local_state_comment": "Synced",
        "cluster_status": "Primary",
        "cluster_size": 3,
        "sst_method": "rsync",
    }
    values.update(changes)
    return GaleraState(**values)


@pytest.mark.parametrize(
    ("state", "refused_because"),
    [
        (galera(), None),
        (
            galera(local_state=2, local_state_comment="Donor/Desynced", sst_method="mariabackup"),
            None,
        ),
        (galera(local_state=2, local_state_comment="Donor/Desynced"), "donor locked by rsync"),
        (galera(cluster_status="non-Primary", ready=False, local_state=0), "quorum lost"),
        (galera(ready=False, local_state=1, local_state_comment="Joining"), "wsrep_ready OFF"),
        (galera(local_state=3, local_state_comment="Joined"), "not synced"),
    ],
)
def test_a_galera_node_takes_writes_only_when_synced_or_a_donor_that_still_serves(
    state: GaleraState, refused_because: str | None
) -> None:
    refusal = galera_refusal(state)
    if refused_because is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert refused_because in refusal


def test_the_skew_estimate_keeps_the_sample_with_the_shortest_round_trip() -> None:
    estimates = ClockSkewFilter(size=3)
    estimates.add(ClockSample(skew=0.004, uncertainty=0.004), at=1.0)
    best = estimates.add(ClockSample(skew=0.0011, uncertainty=0.0002), at=2.0)
    assert (best.skew, best.measured_at) == (0.0011, 2.0)
    best = estimates.add(ClockSample(skew=0.006, uncertainty=0.005), at=3.0)
    assert best.skew == 0.0011  # a noisier sample does not replace a sharper one
    for at in (4.0, 5.0, 6.0):  # the sharp sample ages out after `size` newer ones
        best = estimates.add(ClockSample(skew=0.003, uncertainty=0.003), at=at)
    assert best.measured_at >= 4.0


def test_a_clock_step_replaces_the_older_samples_at_once() -> None:
    estimates = ClockSkewFilter()
    estimates.add(ClockSample(skew=0.001, uncertainty=0.0001), at=1.0)
    # Both cannot be right: the host's clock stepped 10 s forward.
    best = estimates.add(ClockSample(skew=10.001, uncertainty=0.002), at=2.0)
    assert best.skew == 10.001


def test_stamps_follow_the_database_clock_and_never_go_back() -> None:
    now = [1_000_000_000]
    clock = ArrivalClock(now_us=lambda: now[0])
    assert list(clock.stamps(2)) == [1_000_000_000, 1_000_000_001]
    clock.adjust(5_000_000)  # the database's clock is 5 s ahead of this host's
    assert clock.now_us() == 1_005_000_000
    assert clock.stamps(1)[0] == 1_005_000_000
    clock.adjust(-5_000_000)  # corrected the other way: stamps hold, never go back
    assert list(clock.stamps(2)) == [1_005_000_001, 1_005_000_002]
    now[0] += 20_000_000
    assert clock.stamps(1)[0] == 1_015_000_000


# --- chunked commits and conflicts (SQLite and MariaDB) -----------------------------------------


@pytest.fixture
def chunked(
    tmp_path: Path, db: Database
) -> Iterator[tuple[DurableBuffer, FaultyStore, Callable[..., Flusher], list[list[str]]]]:
    """A flusher over a faulty store that writes at most 10 rows per transaction over one
    connection (tests/test_flusher.py covers two), and the keys of every task upsert
    attempted, in order."""
    settings = make_settings(
        tmp_path,
        database={
            **db.settings,
            "max_rows_per_transaction": 10,
            "conflict_retries": 2,
            "flush_connections": 1,
        },
    )
    store = FaultyStore(settings.database)
    store.prepare()
    durable = DurableBuffer(Buffer(100_000, 1 << 30))
    attempts: list[list[str]] = []

    def record(name: str, args: tuple[Any, ...]) -> bool:
        if writes_to("translation_tasks")(name, args):
            attempts.append([row[0] for row in args[1]])
        return False

    store.fail_when(record, RuntimeError("never raised"))

    def flusher(**buffer: Any) -> Flusher:
        return Flusher(durable, store, BufferSettings(**{"retry_backoff_initial": 0.01, **buffer}))

    yield durable, store, flusher, attempts
    store.close()


def buffered_tasks(durable: DurableBuffer) -> int:
    return durable.buffer.counts()["tasks"]


def test_a_flush_commits_in_key_ordered_chunks(chunked: Any, db: Database) -> None:
    durable, _, make, attempts = chunked
    flusher = make()
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    numbers = list(range(25))
    random.Random(5).shuffle(numbers)  # arrival order is not key order
    durable.add(TASKS, [task(sid, task_id=f"t-{n:02d}") for n in numbers])
    result = flusher.flush_once()
    assert result.tasks_written == 25
    assert [len(keys) for keys in attempts] == [10, 10, 5]
    flat = [key for keys in attempts for key in keys]
    assert flat == sorted(flat)
    assert flusher.stats.transactions == 4  # one for the session, three for the tasks
    assert db.count("translation_tasks") == 25


def test_a_conflict_is_retried_at_once_and_counted_as_a_warning(
    chunked: Any, db: Database, persistence_log: pytest.LogCaptureFixture
) -> None:
    durable, store, make, _ = chunked
    flusher = make()
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    durable.add(TASKS, [task(sid) for _ in range(15)])
    store.fail_when(writes_to("translation_tasks"), Conflict("Deadlock found", 1213), times=2)
    result = flusher.flush_once()
    assert result.tasks_written == 15
    assert flusher.stats.conflicts == 2
    assert flusher.failures_in_a_row == 0
    assert flusher.backoff_remaining() == 0
    warnings = [r for r in persistence_log.records if "conflict writing" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert not [r for r in persistence_log.records if r.levelno >= logging.ERROR]
    assert db.count("translation_tasks") == 15


def test_conflicts_beyond_the_retries_keep_the_committed_chunks_and_back_off(
    chunked: Any, db: Database, persistence_log: pytest.LogCaptureFixture
) -> None:
    durable, store, make, _ = chunked
    flusher = make(retry_backoff_initial=100, retry_backoff_max=100)
    sid = new_session_id()
    durable.add(SESSIONS, [session(session_id=sid)])
    ids = [f"t-{n:02d}" for n in range(25)]
    durable.add(TASKS, [task(sid, task_id=i) for i in ids])
    # The second chunk (t-10 .. t-19) loses every race.
    store.fail_when(writes_to("translation_tasks", "t-15"), Conflict("Deadlock found", 1213))
    with pytest.raises(FlushFailed) as failed:
        flusher.flush_once()
    assert failed.value.result.tasks_written == 10
    assert flusher.stats.conflicts == 3  # the first try and database.conflict_retries = 2
    stored = {row[0] for row in db.query("SELECT task_id FROM translation_tasks")}
    assert stored == set(ids[:10])
    assert buffered_tasks(durable) == 15  # the failed chunk and the one never tried
    assert flusher.backoff_remaining() > 0
    assert flusher.stats.last_error_category == "conflict"
    assert not [r for r in persistence_log.records if r.levelno >= logging.ERROR]
    store.clear()
    assert flusher.flush_once().tasks_written == 15


def test_the_backoff_ends_when_a_probe_after_the_failure_finds_the_database(
    chunked: Any,
) -> None:
    durable, store, make, _ = chunked
    now = [1000.0]
    flusher = make(retry_backoff_initial=600, retry_backoff_max=600)
    flusher._clock = lambda: now[0]
    durable.add(SESSIONS, [session()])
    store.fail_when(
        writes_to("translation_sessions"), TransientError("Can't connect", 2003), times=1
    )
    probe_before_the_failure = now[0] - 1
    with pytest.raises(FlushFailed):
        flusher.flush_once()
    while flusher.backoff_remaining() == 0:  # full jitter may draw 0: fail again
        store.fail_when(writes_to("translation_sessions"), TransientError("refused", 2003), 1)
        with pytest.raises(FlushFailed):
            flusher.flush_once()
    assert flusher.database_back(probe_before_the_failure) is False
    assert flusher.backoff_remaining() > 0
    now[0] += 1
    assert flusher.database_back(now[0]) is True
    assert flusher.backoff_remaining() == 0
    assert flusher.flush_if_due() is not None


def test_a_backoff_for_a_database_that_answers_is_not_cut_short(chunked: Any) -> None:
    durable, store, make, _ = chunked
    now = [1000.0]
    flusher = make(retry_backoff_initial=600, retry_backoff_max=600)
    flusher._clock = lambda: now[0]
    durable.add(SESSIONS, [session()])
    store.fail_when(writes_to("translation_sessions"), TransientError("lock wait timeout", 1205))
    while flusher.backoff_remaining() == 0:
        with pytest.raises(FlushFailed):
            flusher.flush_once()
    now[0] += 1
    assert flusher.database_back(now[0]) is False
    assert flusher.backoff_remaining() > 0


# --- schema changes when instances start together (SQLite and MariaDB) --------------------------


def test_instances_starting_together_create_the_schema_once_without_errors(
    tmp_path: Path, db: Database, persistence_log: pytest.LogCaptureFixture
) -> None:
    for table in ("persistence_dead_letters", "translation_tasks", "translation_sessions"):
        db.execute(f"DROP TABLE IF EXISTS {table}")
    settings = make_settings(tmp_path, database=db.settings)
    stores = [Store(settings.database) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def start(store: Store) -> None:
        barrier.wait()
        try:
            store.prepare()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for store in stores:
        store.close()
    assert errors == []
    assert not [r for r in persistence_log.records if r.levelno >= logging.ERROR]
    assert db.count("translation_sessions") == 0
    assert db.query(f"SELECT {ORDER_COLUMN} FROM translation_tasks") == []


def test_old_tables_get_the_order_column_once_when_instances_start_together(
    tmp_path: Path, db: Database, persistence_log: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, database=db.settings)
    Store(settings.database).create_schema()
    for kind in (TASKS, SESSIONS):
        db.execute(f"ALTER TABLE {kind.table} DROP COLUMN {ORDER_COLUMN}")
    stores = [Store(settings.database) for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def start(store: Store) -> None:
        barrier.wait()
        try:
            store.prepare()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for store in stores:
        store.close()
    assert errors == []
    assert not [r for r in persistence_log.records if r.levelno >= logging.ERROR]
    for kind in (TASKS, SESSIONS):
        assert db.query(f"SELECT {ORDER_COLUMN} FROM {kind.table}") == []


def test_a_complete_schema_is_left_alone_at_start(tmp_path: Path, db: Database) -> None:
    settings = make_settings(tmp_path, database=db.settings)
    Store(settings.database).create_schema()
    store = FaultyStore(settings.database)
    ddl: list[str] = []

    def record(name: str, args: tuple[Any, ...]) -> bool:
        sql = args[0] if args and isinstance(args[0], str) else ""
        if sql.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
            ddl.append(sql)
        return False

    store.fail_when(record, RuntimeError("never raised"))
    store.prepare()
    store.close()
    assert ddl == []


# --- failover between servers (MariaDB behind two proxies) --------------------------------------


@pytest.fixture
def two_proxies(mysql_server: MysqlServer) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    first = FaultProxy(mysql_server.host, mysql_server.port)
    second = FaultProxy(mysql_server.host, mysql_server.port)
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def listed_app(
    tmp_path: Path,
    mysql_server: MysqlServer,
    mysql_database: str,
    two_proxies: tuple[FaultProxy, FaultProxy],
) -> Iterator[tuple[Flask, Database]]:
    """An app whose DB_HOST lists two servers (both proxies of the same MariaDB)."""
    first, second = two_proxies
    database = {
        "driver": "mysql",
        "host": f"127.0.0.1:{first.port},127.0.0.1:{second.port}",
        "user": mysql_server.user,
        "password": mysql_server.password,
        "database": mysql_database,
        "connect_timeout": 1,
        "read_timeout": 2,
        "write_timeout": 2,
    }
    app = create_app(
        make_settings(
            tmp_path,
            database=database,
            buffer={
                "flush_interval": 3600,
                "retry_backoff_initial": 600,
                "retry_backoff_max": 600,
            },
            health={"check_interval": 0.5},
            service={"instance_id": "east-1"},
        )
    )
    service = app.extensions["persistence"]
    service.start()
    direct = Database("mysql", {"database": mysql_database}, mysql_server)
    for table in ("translation_tasks", "translation_sessions"):
        direct.execute(f"DELETE FROM {table}")
    yield app, direct
    for proxy in two_proxies:
        proxy.set_mode("pass")
    service.stop()


@pytest.mark.mysql
def test_a_failed_server_is_left_for_the_next_and_nothing_is_lost(
    listed_app: tuple[Flask, Database], two_proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    app, db = listed_app
    first, second = two_proxies
    client = app.test_client()
    health = client.get("/health").get_json()
    assert health["database_server"] == f"127.0.0.1:{first.port}"
    sid = new_session_id()
    body = {"sessions": [session(session_id=sid)]}
    assert client.post(f"{API}/sessions/batch", json=body).status_code == 200
    first.set_mode("cut")
    # The write fails on the first server, and the store moves to the second at once.
    assert client.post(f"{API}/flush").status_code == 503
    assert client.post(f"{API}/flush").get_json()["sessions_written"] == 1
    assert db.query("SELECT session_id FROM translation_sessions") == [(sid,)]
    health = client.get("/health").get_json()
    assert health["database_server"] == f"127.0.0.1:{second.port}"
    # It stays there when the first comes back, and moves again when the second fails.
    first.set_mode("pass")
    second.set_mode("cut")
    tasks = [task(sid) for _ in range(5)]
    assert client.post(f"{API}/tasks/batch", json={"tasks": tasks}).status_code == 200
    assert wait_for(
        lambda: client.get("/health").get_json()["database_server"] == f"127.0.0.1:{first.port}",
        timeout=10,
    ), "the health probe did not move to the first server"
    assert client.post(f"{API}/flush").get_json()["tasks_written"] == 5
    assert db.count("translation_tasks") == 5


@pytest.mark.mysql
def test_the_probe_ends_the_backoff_and_the_flush_follows_at_once(
    listed_app: tuple[Flask, Database], two_proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    app, db = listed_app
    second = two_proxies[1]
    service = app.extensions["persistence"]
    client = app.test_client()
    for proxy in two_proxies:
        proxy.set_mode("cut")
    sid = new_session_id()
    body = {"sessions": [session(session_id=sid)]}
    assert client.post(f"{API}/sessions/batch", json=body).status_code == 200

    def backing_off_long() -> bool:
        if service.flusher.backoff_remaining() == 0:
            service.runtime.wake_flusher()  # fail (again): full jitter may draw a short wait
        return service.flusher.backoff_remaining() > 30

    assert wait_for(backing_off_long, timeout=60)
    second.set_mode("pass")  # the database returns, at least half a minute before the backoff ends
    assert wait_for(lambda: db.count("translation_sessions") == 1, timeout=10), (
        "the flush waited for its backoff although the probe saw the database back"
    )


@pytest.mark.mysql
def test_health_stats_and_flush_name_the_instance_and_the_clock(
    listed_app: tuple[Flask, Database],
) -> None:
    app, _ = listed_app
    client = app.test_client()
    health = client.get("/health").get_json()
    assert health["instance_id"] == "east-1"
    assert "galera" not in health  # a plain MariaDB
    clock = health["clock"]
    assert abs(clock["skew_seconds"]) < 1  # one host, one clock
    assert 0 <= clock["uncertainty_seconds"] < 1
    assert clock["max_skew_seconds"] == 1.0
    stats = client.get(f"{API}/stats").get_json()
    assert stats["instance_id"] == "east-1"
    assert stats["clock"]["skew_seconds"] == pytest.approx(clock["skew_seconds"], abs=0.5)
    assert stats["database"]["server"] == health["database_server"]
    assert {"transactions", "conflicts"} <= set(stats["flush_info"])
    flushed = client.post(f"{API}/flush").get_json()
    assert flushed["instance_id"] == "east-1"


def test_the_instance_id_defaults_to_the_host_name_and_port(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, service={"port": 8123})
    assert settings.service.effective_instance_id.endswith(":8123")
    assert settings.service.effective_instance_id.split(":")[0]


# --- a host whose clock is off (under gunicorn) -------------------------------------------------

# tests/skewed_clock/sitecustomize.py moves the wall clock of a Python process that has
# that directory on its PYTHONPATH.
SKEWED_CLOCK = Path(__file__).resolve().parent / "skewed_clock"


def skewed_clock_env(offset: float) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([str(SKEWED_CLOCK), str(REPO)]),
        "TEST_CLOCK_OFFSET_SECONDS": str(offset),
    }


QUICK = {
    "BUFFER_FLUSH_INTERVAL": "0.2",
    "HEALTH_CHECK_INTERVAL": "0.5",
    "SERVICE_GRACEFUL_TIMEOUT": "10",
}


@pytest.mark.mysql
@pytest.mark.e2e
def test_a_host_clock_ten_seconds_ahead_is_unhealthy_and_still_loses_to_newer_updates(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    skewed = start_server(
        **mysql_env, **QUICK, **skewed_clock_env(10), SERVICE_INSTANCE_ID="skewed"
    )
    honest = start_server(**mysql_env, **QUICK, SERVICE_INSTANCE_ID="honest")
    response = skewed.get("/health")
    assert response.status_code == 503
    report = response.json()
    assert report["instance_id"] == "skewed"
    assert report["database"] == "healthy"
    assert report["clock"]["skew_seconds"] == pytest.approx(10, abs=0.5)
    assert any("10.0" in p and "ahead of the database" in p for p in report["problems"])
    assert honest.get("/health").status_code == 200

    # The update sent through the skewed instance first is older, whatever its host's clock
    # says: its stamps follow the database's clock, so the newer update wins.
    sid = new_session_id()
    older = session(session_id=sid, status="processing", completed_tasks=3)
    newer = session(session_id=sid, status="completed", completed_tasks=2)
    assert skewed.post(f"{API}/sessions/batch", {"sessions": [older]}).ok
    assert skewed.post(f"{API}/flush").ok
    assert honest.post(f"{API}/sessions/batch", {"sessions": [newer]}).ok
    assert honest.post(f"{API}/flush").ok
    assert mysql_db.query(
        "SELECT status, completed_tasks FROM translation_sessions WHERE session_id = ?", sid
    ) == [("completed", 3)]


# --- the client routes by session ---------------------------------------------------------------


def test_the_client_cuts_batches_of_one_session_and_names_it_in_a_header() -> None:
    core = ClientCore(ClientOptions(batch_size=3, linger=60), wake=lambda: None)
    a, b = new_session_id(), new_session_id()
    core.submit("tasks", [task(a), task(b), task(a), task(b), task(a)])
    core.submit("sessions", [session(session_id=b)])
    core.request_flush(timeout=5)
    sent = []
    while True:
        step = core.next_step()
        batch = getattr(step, "batch", None)
        if batch is None:
            break
        request = core.prepare(batch)
        sent.append((batch.kind, request.headers.get(SESSION_HEADER), len(batch)))
        core.on_response(batch, 200, _headers(), b"{}")
    # The tasks of session a were due first (batch_size); session b's update goes
    # before its tasks.
    assert sent == [("tasks", a, 3), ("sessions", b, 1), ("tasks", b, 2)]


def test_the_outbox_keeps_fifo_order_across_sessions_and_sessions_before_their_tasks() -> None:
    outbox = Outbox(batch_size=100, max_batch_bytes=1000, linger=1)
    outbox.add(CLIENT_TASKS, [b"a1", b"a2"], now=0, sessions=["a", "a"])
    outbox.add(CLIENT_TASKS, [b"b1"], now=0.5, sessions=["b"])
    outbox.add(CLIENT_SESSIONS, [b"A"], now=0.6, sessions=["a"])
    assert outbox.take_due(now=0.9) is None
    first = outbox.take_due(now=1.0)
    assert first is not None
    assert (first.kind, first.session_id, [e.payload for e in first.entries]) == (
        CLIENT_SESSIONS,
        "a",
        [b"A"],
    )
    second = outbox.take_due(now=1.0)
    assert second is not None
    assert (second.session_id, [e.payload for e in second.entries]) == ("a", [b"a1", b"a2"])
    assert outbox.take_due(now=1.0) is None  # b's task has waited 0.5 s of its 1 s
    third = outbox.take_due(now=1.5)
    assert third is not None
    assert (third.session_id, len(outbox)) == ("b", 0)


@pytest.mark.parametrize(
    ("value", "routed"),
    [
        ("3f2504e0-4f89-41d3-9a0c-0305e82c3301", True),
        ("", False),
        (None, False),
        (42, False),
        ("bad id", False),
        ("line\r\nbreak", False),
        ("é", False),
        ("x" * 256, False),
    ],
)
def test_only_a_session_id_fit_for_a_header_is_routed(value: Any, routed: bool) -> None:
    assert routing_session({"session_id": value}) == (value if routed else None)


def _headers() -> httpx.Headers:
    return httpx.Headers()
