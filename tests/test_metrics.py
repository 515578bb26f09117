"""``GET /metrics``: what each metric counts, one scrape covering every gunicorn worker, and
the shipped alert rules.

In one process (the Flask test client, SQLite and MariaDB) prometheus_client
keeps the values in memory; under gunicorn (MariaDB) in its multiprocess
mode, where a scrape of any worker must cover all of them, also after a
worker was killed and replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from persistence.service import PersistenceService
from persistence.store import Conflict
from tests.conftest import Database
from tests.factories import new_session_id, session, task
from tests.gunicorn_server import API, REPO, Server, wait_for

ALERTS = REPO / "deploy" / "prometheus-alerts.yml"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(client: FlaskClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(answer.get_data(as_text=True))


def post_batches(client: FlaskClient, sid: str, tasks: int) -> None:
    assert (
        client.post(f"{API}/sessions/batch", json={"sessions": [session(session_id=sid)]})
    ).status_code == 200
    answer = client.post(f"{API}/tasks/batch", json={"tasks": [task(sid) for _ in range(tasks)]})
    assert answer.status_code == 200


# --- one process ---------------------------------------------------------------------------


def test_records_flow_from_received_through_buffered_to_written(
    client: FlaskClient, db: Database
) -> None:
    post_batches(client, new_session_id(), 3)
    before = scrape(client)
    assert value(before, "persistence_records_received_total", type="session") == 1
    assert value(before, "persistence_records_received_total", type="task") == 3
    assert value(before, "persistence_buffered_records", type="task") == 3
    assert value(before, "persistence_buffered_bytes") > 0
    assert value(before, "persistence_oldest_buffered_record_age_seconds") > 0
    assert value(before, "persistence_workers") == 1
    assert value(before, "persistence_database_up") == 1

    assert client.post(f"{API}/flush").status_code == 200
    after = scrape(client)
    assert value(after, "persistence_rows_written_total", type="session") == 1
    assert value(after, "persistence_rows_written_total", type="task") == 3
    assert value(after, "persistence_buffered_records", type="task") == 0
    assert value(after, "persistence_oldest_buffered_record_age_seconds") == 0
    assert value(after, "persistence_flushes_total", outcome="ok") == 1
    assert value(after, "persistence_flush_duration_seconds_count") == 1
    stats = client.get(f"{API}/stats").json
    assert value(after, "persistence_flush_duration_seconds_sum") == pytest.approx(
        stats["flush_info"]["total_flush_duration_ms"] / 1000
    )


def test_the_oldest_record_age_follows_the_oldest_stamp(
    client: FlaskClient, service: PersistenceService, db: Database
) -> None:
    sid = new_session_id()
    post_batches(client, sid, 1)
    oldest = service.buffer.oldest_stamp()
    assert oldest is not None
    # Newer records do not make the oldest younger; an update of the oldest one does.
    client.post(f"{API}/tasks/batch", json={"tasks": [task(sid)]})
    assert service.buffer.oldest_stamp() == oldest
    client.post(f"{API}/sessions/batch", json={"sessions": [session(session_id=sid)]})
    assert service.buffer.oldest_stamp() > oldest
    age = value(scrape(client), "persistence_oldest_buffered_record_age_seconds")
    assert 0 < age < 60


def test_refusals_are_counted_by_reason_in_requests_and_records(client: FlaskClient) -> None:
    sid = new_session_id()
    bad = [task(sid, status="nonsense") for _ in range(4)]
    assert client.post(f"{API}/tasks/batch", json={"tasks": bad}).status_code == 422
    assert client.post(f"{API}/tasks/batch", data="x", content_type="text/plain").status_code == 415
    samples = scrape(client)
    assert value(samples, "persistence_requests_refused_total", reason="invalid") == 1
    assert value(samples, "persistence_records_refused_total", reason="invalid") == 4
    assert (
        value(samples, "persistence_requests_refused_total", reason="unsupported_media_type") == 1
    )
    assert value(samples, "persistence_requests_refused_total", reason="buffer_full") == 0
    assert value(samples, "persistence_records_received_total", type="task") == 0


def test_a_row_the_database_refuses_is_counted_as_dead_lettered(
    client: FlaskClient, db: Database
) -> None:
    db.add_poison_trigger()
    sid = new_session_id()
    client.post(f"{API}/sessions/batch", json={"sessions": [session(session_id=sid)]})
    tasks = [task(sid), task(sid, source_text="poison"), task(sid)]
    client.post(f"{API}/tasks/batch", json={"tasks": tasks})
    assert client.post(f"{API}/flush").status_code == 200
    samples = scrape(client)
    assert (
        value(
            samples,
            "persistence_records_dead_lettered_total",
            type="task",
            reason="refused_by_database",
        )
        == 1
    )
    assert value(samples, "persistence_rows_written_total", type="task") == 2


def test_an_operator_error_shows_in_failures_outcome_and_needs_operator(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(
        buffer={"flush_interval": 3600, "max_buffer_size": 100_000, "hard_limit": 200_000}
    )
    client = app.test_client()
    service: PersistenceService = app.extensions["persistence"]
    db.execute("DROP TABLE persistence_dead_letters")
    db.execute("DROP TABLE translation_tasks")
    service.store.prepare = lambda: None  # type: ignore[method-assign]  # stays missing
    post_batches(client, new_session_id(), 1)
    for _ in range(2):
        assert client.post(f"{API}/flush").status_code == 503
    samples = scrape(client)
    assert value(samples, "persistence_flushes_total", outcome="needs_operator") == 2
    assert value(samples, "persistence_flushes_total", outcome="ok") == 0
    assert value(samples, "persistence_flush_failures_in_a_row") == 2
    assert value(samples, "persistence_needs_operator") == 1
    assert value(samples, "persistence_oldest_buffered_record_age_seconds") > 0

    del service.store.prepare  # the tables are created again by the next write
    assert client.post(f"{API}/flush").status_code == 200
    samples = scrape(client)
    assert value(samples, "persistence_flush_failures_in_a_row") == 0
    assert value(samples, "persistence_needs_operator") == 0


@pytest.mark.mysql
@pytest.mark.parametrize("db", ["mysql"], indirect=True)  # conflicts and skew: MySQL only
def test_conflicts_and_the_clock_skew_are_exposed(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    """A deadlock retried at once counts as a conflict; the probe's skew becomes a gauge."""
    app = app_factory(
        buffer={"flush_interval": 3600, "max_buffer_size": 100_000, "hard_limit": 200_000}
    )
    client = app.test_client()
    service: PersistenceService = app.extensions["persistence"]
    real_upsert, calls = service.store.upsert, []

    def deadlock_once(kind: object, rows: object) -> None:
        calls.append(kind)
        if len(calls) == 1:
            raise Conflict("Deadlock found when trying to get lock", 1213)
        real_upsert(kind, rows)

    service.store.upsert = deadlock_once  # type: ignore[method-assign]
    post_batches(client, new_session_id(), 3)
    assert client.post(f"{API}/flush").status_code == 200
    service.health.refresh()  # a probe measures the clock against the server's
    samples = scrape(client)
    assert value(samples, "persistence_write_conflicts_total") == 1
    skew = service.health.clock_skew()
    assert skew is not None
    assert value(samples, "persistence_clock_skew_seconds") == pytest.approx(skew.skew)
    assert abs(skew.skew) < 1  # one host, one clock: only the measurement's error


def test_the_hard_limit_ratio_is_the_fuller_of_records_and_bytes(
    app_factory: Callable[..., Flask], db: Database
) -> None:
    app = app_factory(
        service={"max_request_bytes": 512 * 1024},
        buffer={
            "flush_interval": 3600,
            "max_buffer_size": 10,
            "max_batch_size": 10,
            "hard_limit": 100,
            "hard_limit_bytes": 1024 * 1024,
        },
    )
    client = app.test_client()
    service: PersistenceService = app.extensions["persistence"]
    sid = new_session_id()
    client.post(f"{API}/tasks/batch", json={"tasks": [task(sid) for _ in range(5)]})
    samples = scrape(client)
    assert value(samples, "persistence_buffer_hard_limit_usage_ratio") == pytest.approx(5 / 100)

    large = [task(sid, source_text="x" * 60_000) for _ in range(5)]
    assert client.post(f"{API}/tasks/batch", json={"tasks": large}).status_code == 200
    held = service.buffer.counts()["bytes"]
    assert held / (1024 * 1024) > 10 / 100  # now the bytes are the fuller
    samples = scrape(client)
    assert value(samples, "persistence_buffer_hard_limit_usage_ratio") == pytest.approx(
        held / (1024 * 1024)
    )


def test_journal_fsyncs_are_counted(app_factory: Callable[..., Flask], tmp_path: Path) -> None:
    app = app_factory(
        buffer={
            "durability": "journal",
            "journal_dir": str(tmp_path / "journal"),
            "flush_interval": 3600,
        }
    )
    client = app.test_client()
    post_batches(client, new_session_id(), 2)
    samples = scrape(client)
    fsyncs = client.get(f"{API}/stats").json["journal"]["fsyncs"]
    assert fsyncs >= 2
    assert value(samples, "persistence_journal_fsyncs_total") == fsyncs
    assert value(samples, "persistence_journal_healthy") == 1
    assert value(scrape(client), "persistence_journal_fsyncs_total") == fsyncs  # not twice


# --- under gunicorn ------------------------------------------------------------------------


def scrape_server(server: Server) -> Samples:
    answer = requests.get(server.url + "/metrics", timeout=5)
    assert answer.status_code == 200
    return parse(answer.text)


def post_to(server: Server, path: str, body: object) -> None:
    # A new connection each time: the kernel spreads them over the workers.
    answer = requests.post(server.url + path, json=body, headers={"Connection": "close"}, timeout=5)
    assert answer.status_code == 200


@pytest.mark.mysql
@pytest.mark.e2e
def test_one_scrape_covers_every_worker_also_after_one_was_killed(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(**mysql_env, SERVICE_WORKERS="2", BUFFER_FLUSH_INTERVAL="3600")
    assert wait_for(lambda: server.get(f"{API}/stats").json()["workers"]["count"] == 2)
    sid = new_session_id()
    post_to(server, f"{API}/sessions/batch", {"sessions": [session(session_id=sid)]})
    sent = 0
    # Eight at a time, each on a new connection, until both workers hold some: a busy
    # worker leaves the next connection to the other.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(20):
            batches = [{"tasks": [task(sid) for _ in range(3)]} for _ in range(8)]
            list(pool.map(lambda body: post_to(server, f"{API}/tasks/batch", body), batches))
            sent += 24
            if all(server.get(f"{API}/stats").json()["workers"]["buffered"]):
                break
    assert all(server.get(f"{API}/stats").json()["workers"]["buffered"]), "not spread"

    samples = scrape_server(server)
    assert value(samples, "persistence_workers") == 2
    assert value(samples, "persistence_records_received_total", type="task") == sent
    assert value(samples, "persistence_buffered_records", type="task") == sent

    assert server.post(f"{API}/flush").status_code == 200
    samples = scrape_server(server)
    assert value(samples, "persistence_rows_written_total", type="task") == sent
    assert value(samples, "persistence_buffered_records", type="task") == 0
    assert mysql_db.count("translation_tasks") == sent

    victim = server.get(f"{API}/stats").json()["workers"]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(
        lambda: (
            victim not in (pids := server.get(f"{API}/stats").json()["workers"]["pids"])
            and len(pids) == 2
        ),
        timeout=30,
    )
    samples = scrape_server(server)
    assert value(samples, "persistence_workers") == 2  # the dead worker's gauges are gone
    assert value(samples, "persistence_rows_written_total", type="task") == sent  # counted
    assert value(samples, "persistence_records_received_total", type="task") == sent


@pytest.mark.e2e
def test_the_metrics_files_live_in_the_masters_private_directory(
    start_server: Callable[..., Server],
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="pm-"))  # short: the control sockets go there too
    try:
        server = start_server(TMPDIR=str(scratch))
        scrape_server(server)
        worker = server.get(f"{API}/stats").json()["workers"]["pids"][0]
        [control_dir] = scratch.glob("persistence-service-*")
        metrics_dir = control_dir / "metrics"
        assert metrics_dir.stat().st_mode & 0o777 == 0o700
        assert any(p.name.endswith(f"_{worker}.db") for p in metrics_dir.iterdir())
        assert server.stop() == 0
        assert not control_dir.exists()  # removed with the control directory at exit
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- alert rules ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, object]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_every_alert_names_metrics_the_service_exposes(client: FlaskClient) -> None:
    exposed = {name for name, _ in scrape(client)}
    families = exposed | {re.sub(r"_(total|count|sum|bucket)$", "", n) for n in exposed}
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "PersistenceServiceDown",
        "PersistenceDatabaseDown",
        "PersistenceRecordsStuck",
        "PersistenceFlushesFailing",
        "PersistenceNeedsOperator",
        "PersistenceJournalUnhealthy",
        "PersistenceDeadLettersGrowing",
        "PersistenceRefusingBatches",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        for name in re.findall(r"\bpersistence_[a-z_]+", str(rule["expr"])):
            assert name in exposed or name in families, f"{rule['alert']}: {name} is not exposed"


def test_the_records_stuck_threshold_leaves_room_for_tasks_waiting_for_their_session() -> None:
    from persistence.config import BufferSettings

    [rule] = [r for r in alert_rules() if r["alert"] == "PersistenceRecordsStuck"]
    threshold = float(str(rule["expr"]).rsplit(">", 1)[1])
    defaults = BufferSettings()
    assert threshold > defaults.orphan_task_timeout + defaults.flush_interval


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
