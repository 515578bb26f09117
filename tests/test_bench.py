"""The benchmark harness runs end to end (``python -m bench --quick``, the default sections
and the big table) and reports every section.

Speed is never asserted: only that each measurement was taken and is a positive number.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.runner import DEFAULT_SECTIONS
from tests.conftest import MysqlServer

pytestmark = [pytest.mark.mysql, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent

# Per section of results.json, the measurements that must be positive numbers.
# "runs[]" means: in every entry of the list "runs".
MEASURED = {
    "http_floor": [
        "runs[].tasks_per_s",
        "runs[].p99_ms",
        "client_check.client_max_tasks_per_s",
        "client_check.client_max_cpu_cores",
        "access_log.without_access_log_tasks_per_s",
    ],
    "db_floor": [
        "one_connection.insert_rows_per_s",
        "one_connection.update_rows_per_s",
        "two_connections.insert_rows_per_s",
        "two_connections.update_rows_per_s",
        "python_cpu_share.insert",
    ],
    "intake": [
        "runs[].tasks_per_s",
        "runs[].p50_ms",
        "runs[].p99_ms",
        "runs[].ratio_to_floor",
        "runs[].server_cpu_cores",
        "journal_runs[].tasks_per_s",
    ],
    "flush": [
        "runs[].connections",
        "runs[].insert.flusher_rows_per_s",
        "runs[].insert.ratio",
        "runs[].update.flusher_rows_per_s",
        "runs[].update.ratio",
    ],
    "bigtable": [
        "table_before.rows",
        "table_before.data_mib",
        "floor.one_connection.insert_rows_per_s",
        "floor.two_connections.update_rows_per_s",
        "flush.runs[].insert.ratio",
        "flush.runs[].update.ratio",
    ],
    "e2e": [
        "accepted_tasks_per_s",
        "landing_rate_rows_per_s",
        "max_buffer_depth",
        "rows_at_end",
    ],
    "coalescing": ["one_window.rows_per_record", "default_triggers.rows_per_record"],
    "latency": ["idle.p99_ms", "during_flush.p99_ms", "p99_ratio", "flush.tasks_written"],
    "memory": ["tasks_buffered", "bytes_per_task"],
}


def values_at(data: Any, path: str) -> list[Any]:
    """The values at a dotted path; ``name[]`` steps into every item of a list."""
    found = [data]
    for step in path.split("."):
        if step.endswith("[]"):
            found = [item for value in found for item in value[step[:-2]]]
        else:
            found = [value[step] for value in found]
    return found


def test_quick_benchmark_reports_every_section(mysql_server: MysqlServer, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "SERVICE_", "BUFFER_", "LOG_", "PERSISTENCE_", "BENCH_"))
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            ",".join([*DEFAULT_SECTIONS, "bigtable"]),
            "--out",
            str(out),
            "--db-host",
            mysql_server.host,
            "--db-port",
            str(mysql_server.port),
            "--db-user",
            mysql_server.user,
            "--db-password",
            mysql_server.password,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for section, paths in MEASURED.items():
        assert section in results, f"{section} missing from results.json"
        for path in paths:
            values = values_at(results[section], path)
            assert values, f"{section}.{path}: no value"
            for value in values:
                assert isinstance(value, (int, float)), f"{section}.{path} = {value!r}"
                assert not isinstance(value, bool)
                assert value > 0, f"{section}.{path} = {value!r}"

    goals = results["goals"]
    assert goals
    assert all(isinstance(goal["pass"], bool) for goal in goals)
    assert results["e2e"]["all_accepted_landed"] is True
    assert [run["connections"] for run in results["flush"]["runs"]] == [1, 2]
    assert results["bigtable"]["table_after"]["rows"] > results["bigtable"]["table_before"]["rows"]
    assert "Goals" in result.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "plot.png").stat().st_size > 0

    # The run dropped every database it created.
    conn = mysql_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            left = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    prefix = results["meta"]["databases_prefix"]
    assert not [name for name in left if name.startswith(prefix)]
