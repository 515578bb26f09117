"""The database floor and the service's own flusher, measured on the same rows.

Every repetition makes ``rows`` new realistic tasks, validates them with the
service's schema and converts them with the service's dialect, then writes
them (new rows), then writes the same tasks again one step later
(``completed``: updates), in turn:

- raw ``executemany`` on one connection (the floor the goals refer to);
- raw ``executemany`` split over two connections in parallel (two threads);
- the service's flusher: a :class:`~persistence.service.PersistenceService`
  built in this process, the tasks given to ``service.accept``, and
  ``service.flush()`` timed.

Each way writes into a database of its own, so all three see tables of the
same size. The rates are medians over the repetitions; a ratio is the median of the
ratios of each repetition (the two writes compared ran seconds apart).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import orjson

from bench import workload
from bench.context import Context
from bench.databases import raw_upsert, raw_upsert_timed, service_settings
from persistence import records as records_module
from persistence.records import SESSIONS, TASKS, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.service import PersistenceService
from persistence.store import Store
from persistence.store.dialects import MysqlDialect

SESSIONS_PER_RUN = 16


def measure(ctx: Context, want_floor: bool, want_flush: bool) -> dict[str, Any]:
    sizes = ctx.sizes
    count, reps = sizes.db_rows, sizes.db_reps
    rng = random.Random(ctx.seed + 7)
    roles = ["raw1", *(["raw2"] if want_floor else []), *(["flush"] if want_flush else [])]
    databases = {role: ctx.databases.create(f"db_{role}") for role in roles}
    settings = {
        role: service_settings(
            ctx.db,
            name,
            ctx.workdir,
            flush_interval=3600,
            max_buffer_size=5_000_000,
            hard_limit=10_000_000,
        )
        for role, name in databases.items()
    }
    dialect = MysqlDialect(settings["raw1"].database)
    task_sql, session_sql = dialect.upsert_sql(TASKS), dialect.upsert_sql(SESSIONS)
    task_row, session_row = dialect.row_converter(TASKS), dialect.row_converter(SESSIONS)

    service = PersistenceService(settings["flush"]) if want_flush else None
    validation = settings["raw1"].validation  # the service's own schemas
    schemas = {
        SESSIONS.name: build_session_schema(validation.session_statuses),
        TASKS.name: build_task_schema(validation.task_statuses),
    }
    session_ids = [workload.new_session_id(rng) for _ in range(SESSIONS_PER_RUN)]
    sessions = [workload.session_record(sid, rng) for sid in session_ids]
    session_rows = [
        session_row(r) for r in _complete(SESSIONS, schemas[SESSIONS.name].load(sessions))
    ]
    for role, name in databases.items():
        store = Store(settings[role].database)
        store.create_schema()
        store.close()
        if role != "flush":
            raw_upsert(ctx.db, name, session_sql, session_rows)
    if service is not None:
        service.accept(SESSIONS, orjson.dumps({"sessions": sessions}))
        service.flush()

    samples: dict[str, list[float]] = {}
    cpu_share: dict[str, list[float]] = {}

    def note(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(count / seconds)

    for rep in range(reps):
        ctx.progress(f"db: repetition {rep + 1}/{reps}, {count} rows")
        new = workload.tasks(session_ids, count, rng, prefix=f"{rep + 1:02d}")
        later = [workload.advance(record, "completed", rng) for record in new]
        for phase, records in (("insert", new), ("update", later)):
            rows = [task_row(r) for r in _complete(TASKS, schemas[TASKS.name].load(records))]
            # Each repetition starts with another writer: none always follows the same one.
            for role in roles[rep % len(roles) :] + roles[: rep % len(roles)]:
                if role == "flush":
                    seconds = _timed_flush(service, records)
                else:
                    connections = 2 if role == "raw2" else 1
                    seconds, cpu = raw_upsert_timed(
                        ctx.db, databases[role], task_sql, rows, connections
                    )
                    if role == "raw1":
                        cpu_share.setdefault(phase, []).append(cpu / seconds)
                note(f"{role}_{phase}", seconds)
    if service is not None:
        service.store.close()

    def med(key: str) -> float:
        return round(statistics.median(samples[key]), 1)

    result: dict[str, Any] = {}
    if want_floor:
        result["db_floor"] = {
            "rows": count,
            "repetitions": reps,
            "one_connection": {
                "insert_rows_per_s": med("raw1_insert"),
                "update_rows_per_s": med("raw1_update"),
            },
            "two_connections": {
                "insert_rows_per_s": med("raw2_insert"),
                "update_rows_per_s": med("raw2_update"),
            },
            # Of the one-connection write's wall time, the share this process spent on
            # the CPU (PyMySQL building statements, holding the GIL).
            "python_cpu_share": {
                phase: round(statistics.median(values), 3) for phase, values in cpu_share.items()
            },
            "two_vs_one": {
                phase: round(
                    statistics.median(
                        two / one
                        for two, one in zip(
                            samples[f"raw2_{phase}"], samples[f"raw1_{phase}"], strict=True
                        )
                    ),
                    3,
                )
                for phase in ("insert", "update")
            },
            "samples_rows_per_s": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
        }
    if want_flush:
        result["flush"] = {
            "rows": count,
            "repetitions": reps,
            **{
                phase: {
                    "flusher_rows_per_s": med(f"flush_{phase}"),
                    "raw_one_connection_rows_per_s": med(f"raw1_{phase}"),
                    "ratio_per_repetition": [
                        round(f / r, 3)
                        for f, r in zip(
                            samples[f"flush_{phase}"], samples[f"raw1_{phase}"], strict=True
                        )
                    ],
                    # Each repetition's flush against the raw write next to it in time,
                    # then the median: slow drifts of the machine cancel out.
                    "ratio": round(
                        statistics.median(
                            f / r
                            for f, r in zip(
                                samples[f"flush_{phase}"], samples[f"raw1_{phase}"], strict=True
                            )
                        ),
                        3,
                    ),
                }
                for phase in ("insert", "update")
            },
            "samples_rows_per_s": {
                k: [round(v, 1) for v in vs] for k, vs in samples.items() if k.startswith("flush")
            },
        }
    return result


def _timed_flush(service: PersistenceService, records: list[dict[str, Any]]) -> float:
    """Buffer ``records`` through ``service.accept`` (not timed), then time one flush."""
    limit = service.settings.buffer.max_batch_size
    for start in range(0, len(records), limit):
        service.accept(TASKS, orjson.dumps({"tasks": records[start : start + limit]}))
    started = time.perf_counter()
    result = service.flush()
    seconds = time.perf_counter() - started
    written = result["tasks_written"] if isinstance(result, dict) else result.tasks_written
    if written != len(records):
        raise RuntimeError(f"the flush wrote {written} of {len(records)} tasks")
    return seconds


_last_stamp = 0


def _complete(kind: RecordType, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated records with every column the upsert binds.

    The buffer adds columns of its own on arrival (the arrival stamp,
    ``records.ORDER_COLUMN`` when the service has one); the raw floor binds the
    same values: strictly increasing microseconds since the epoch.
    """
    global _last_stamp
    order = getattr(records_module, "ORDER_COLUMN", None)
    for record in records:
        for column in kind.columns:
            if column in record:
                continue
            if column == order:
                _last_stamp = max(time.time_ns() // 1000, _last_stamp + 1)
                record[column] = _last_stamp
            else:
                record[column] = None
    return records
