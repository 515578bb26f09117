"""The database floor and the service's own flusher, measured on the same rows.

Every repetition makes ``rows`` new realistic tasks, validates them with the
service's schema and converts them with the service's dialect, then writes
them (new rows), then writes the same tasks again one step later
(``completed``: updates), by each writer in turn:

- ``raw1``: raw ``executemany`` on one connection (the floor the goals refer to);
- ``raw2``: raw ``executemany`` split over two connections in parallel (two threads);
- ``flush1``, ``flush2``: the service's flusher with ``database.flush_connections``
  1 and 2: a :class:`~persistence.service.PersistenceService` built in this
  process, the tasks given to ``service.accept`` (not timed), and
  ``service.flush()`` timed.

In the ``db-floor`` and ``flush`` sections each writer writes into a database
of its own, so all of them see tables of the same size. The ``bigtable``
section (:func:`measure_bigtable`) first fills one table with a million rows,
more than MariaDB's default 128 MiB buffer pool holds, and every writer then
writes into that one table, the order of the writers rotating from one
repetition to the next. The rates are medians over the repetitions; a ratio
is the median of the ratios of each repetition (the two writes compared ran
seconds apart).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench import workload
from bench.context import Context
from bench.databases import DbServer, raw_upsert, raw_upsert_timed, service_settings
from persistence import records as records_module
from persistence.records import SESSIONS, TASKS, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.service import PersistenceService
from persistence.store import Store
from persistence.store.dialects import MysqlDialect

SESSIONS_PER_RUN = 16
PHASES = ("insert", "update")
# The big table also measures updates of rows written long before (by its fill), spread
# over the whole table: what needs pages that are not in the buffer pool.
OLD_ROWS_PHASE = "update_old"
FLUSH_CONNECTIONS = (1, 2)
# The flushers of the db-floor, flush and bigtable sections: the defaults, but for the
# number of connections.
FLUSHERS = {f"flush{n}": {"flush_connections": n} for n in FLUSH_CONNECTIONS}
# What the tuning section compares.
TUNING_CONNECTIONS = (1, 2, 4)
TUNING_CHUNKS = (500, 1000, 5000)
WARM_UP_ROWS = 100


@dataclass
class Writers:
    """The writers of one measurement: which database each writes into, and the
    in-process services of the flushers."""

    databases: dict[str, str]
    phases: tuple[str, ...] = PHASES
    services: dict[str, PersistenceService] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    cpu_share: dict[str, list[float]] = field(default_factory=dict)

    def close(self) -> None:
        for service in self.services.values():
            service.store.close()


def measure(ctx: Context, want_floor: bool, want_flush: bool) -> dict[str, Any]:
    roles = ["raw1", *(["raw2"] if want_floor else [])]
    if want_flush:
        roles += [f"flush{n}" for n in FLUSH_CONNECTIONS]
    databases = {role: ctx.databases.create(f"db_{role}") for role in roles}
    writers = _writers(ctx, databases, FLUSHERS)
    try:
        _write_repetitions(ctx, writers, ctx.sizes.db_rows, ctx.sizes.db_reps, "db")
    finally:
        writers.close()
    result: dict[str, Any] = {}
    if want_floor:
        result["db_floor"] = _floor_results(writers, ctx.sizes.db_rows, ctx.sizes.db_reps)
    if want_flush:
        result["flush"] = _flush_results(writers, ctx.sizes.db_rows, ctx.sizes.db_reps)
    return result


def measure_bigtable(ctx: Context) -> dict[str, Any]:
    """Every writer on one table that already holds ``bigtable_rows`` rows."""
    sizes = ctx.sizes
    name = ctx.databases.create("bigtable")
    roles = ["raw1", "raw2", *(f"flush{n}" for n in FLUSH_CONNECTIONS)]
    writers = _writers(ctx, dict.fromkeys(roles, name), FLUSHERS)
    writers.phases = (*PHASES, OLD_ROWS_PHASE)
    try:
        ctx.progress(f"bigtable: filling one table with {sizes.bigtable_rows:,} rows")
        started = time.perf_counter()
        _fill(ctx, name, sizes.bigtable_rows, random.Random(ctx.seed + 11))
        fill_seconds = time.perf_counter() - started
        size_before = table_size(ctx.db, name)
        _write_repetitions(
            ctx,
            writers,
            sizes.bigtable_write_rows,
            sizes.bigtable_reps,
            "bigtable",
            old_rows=sizes.bigtable_rows,
        )
        size_after = table_size(ctx.db, name)
    finally:
        writers.close()
    return {
        "rows_before": size_before["rows"],
        "fill_seconds": round(fill_seconds, 1),
        "table_before": size_before,
        "table_after": size_after,
        "floor": _floor_results(writers, sizes.bigtable_write_rows, sizes.bigtable_reps),
        "flush": _flush_results(writers, sizes.bigtable_write_rows, sizes.bigtable_reps),
    }


def measure_flush_settings(ctx: Context) -> dict[str, Any]:
    """The flusher with other numbers of connections and chunk sizes (section ``tuning``),
    each writer in a database of its own, against raw executemany on one connection."""
    flushers = {
        f"flush{connections}x{chunk}": {
            "flush_connections": connections,
            "max_rows_per_transaction": chunk,
        }
        for connections in TUNING_CONNECTIONS
        for chunk in TUNING_CHUNKS
    }
    roles = ["raw1", *flushers]
    databases = {role: ctx.databases.create(f"tune_{role}") for role in roles}
    writers = _writers(ctx, databases, flushers)
    count, reps = ctx.sizes.db_rows, ctx.sizes.tuning_flush_reps
    try:
        _write_repetitions(ctx, writers, count, reps, "tuning: flush")
    finally:
        writers.close()
    runs = []
    for role, settings in flushers.items():
        run: dict[str, Any] = {
            "connections": settings["flush_connections"],
            "max_rows_per_transaction": settings["max_rows_per_transaction"],
        }
        for phase in PHASES:
            flushed = writers.samples[f"{role}_{phase}"]
            per_rep = _ratios(flushed, writers.samples[f"raw1_{phase}"])
            run[phase] = {
                "flusher_rows_per_s": _median(flushed),
                "ratio": round(statistics.median(per_rep), 3),
                "ratio_per_repetition": per_rep,
            }
        runs.append(run)
    return {
        "rows": count,
        "repetitions": reps,
        "raw_one_connection_rows_per_s": {
            phase: _median(writers.samples[f"raw1_{phase}"]) for phase in PHASES
        },
        "runs": runs,
    }


# --- writing --------------------------------------------------------------------------------


def _writers(
    ctx: Context, databases: dict[str, str], flushers: dict[str, dict[str, Any]]
) -> Writers:
    """Tables and the run's sessions in every database; a service for each writer named
    in ``flushers``, with those database settings."""
    writers = Writers(databases)
    for role, name in databases.items():
        if role in flushers:
            writers.services[role] = PersistenceService(
                service_settings(
                    ctx.db,
                    name,
                    ctx.workdir,
                    flushers[role],
                    flush_interval=3600,
                    max_buffer_size=5_000_000,
                    hard_limit=10_000_000,
                )
            )
    for name in sorted(set(databases.values())):
        store = Store(service_settings(ctx.db, name, ctx.workdir).database)
        store.create_schema()
        store.close()
    return writers


class Rows:
    """Records validated by the service's own schemas and converted by its own dialect
    into the parameter tuples of its upsert, and the upsert statements themselves."""

    def __init__(self, ctx: Context) -> None:
        settings = service_settings(ctx.db, "bench", ctx.workdir)
        statuses = settings.validation
        self.schemas = {
            SESSIONS.name: build_session_schema(statuses.session_statuses),
            TASKS.name: build_task_schema(statuses.task_statuses),
        }
        dialect = MysqlDialect(settings.database)
        self.sql = {kind.name: dialect.upsert_sql(kind) for kind in (SESSIONS, TASKS)}
        self._to_row = {kind.name: dialect.row_converter(kind) for kind in (SESSIONS, TASKS)}

    def of(self, kind: RecordType, records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        to_row = self._to_row[kind.name]
        return [to_row(r) for r in _complete(kind, self.schemas[kind.name].load(records))]


def _write_repetitions(
    ctx: Context, writers: Writers, count: int, reps: int, label: str, old_rows: int = 0
) -> None:
    """``reps`` times: ``count`` new tasks, then the same tasks updated, by every writer;
    with ``old_rows`` (the rows :func:`_fill` put in the table), then also ``count``
    updates of rows of the fill, picked at random, none picked twice."""
    rng = random.Random(ctx.seed + 7)
    rows = Rows(ctx)
    session_ids = [workload.new_session_id(rng) for _ in range(SESSIONS_PER_RUN)]
    sessions = rows.of(SESSIONS, [workload.session_record(sid, rng) for sid in session_ids])
    for name in sorted(set(writers.databases.values())):
        raw_upsert(ctx.db, name, rows.sql[SESSIONS.name], sessions)
    roles = list(writers.databases)
    # A first flush opens the pool's connections; the raw writers open theirs untimed.
    for index, service in enumerate(writers.services.values()):
        _timed_flush(service, workload.tasks(session_ids, WARM_UP_ROWS, rng, f"w{index}"))
    # Writers that share a table each write tasks of their own.
    shared = len(set(writers.databases.values())) < len(roles)
    old = iter(rng.sample(range(old_rows), reps * len(roles) * count) if old_rows else ())
    for rep in range(reps):
        ctx.progress(f"{label}: repetition {rep + 1}/{reps}, {count} rows by {', '.join(roles)}")
        # Each repetition starts with another writer: none always follows the same one.
        order = roles[rep % len(roles) :] + roles[: rep % len(roles)]
        batches = {
            role: workload.tasks(
                session_ids, count, rng, prefix=f"{rep + 1:02d}{index if shared else ''}"
            )
            for index, role in enumerate(roles)
        }
        for phase in writers.phases:
            if phase == "update":
                batches = {
                    role: [workload.advance(record, "completed", rng) for record in records]
                    for role, records in batches.items()
                }
            elif phase == OLD_ROWS_PHASE:
                batches = {
                    role: [
                        {**record, "task_id": fill_key(next(old), old_rows)}
                        for record in workload.tasks(session_ids, count, rng, status="completed")
                    ]
                    for role in roles
                }
            for role in order:
                records = batches[role]
                if role in writers.services:
                    seconds = _timed_flush(writers.services[role], records)
                else:
                    seconds, cpu = raw_upsert_timed(
                        ctx.db,
                        writers.databases[role],
                        rows.sql[TASKS.name],
                        rows.of(TASKS, records),
                        int(role.removeprefix("raw")),
                    )
                    if role == "raw1":
                        writers.cpu_share.setdefault(phase, []).append(cpu / seconds)
                writers.samples.setdefault(f"{role}_{phase}", []).append(count / seconds)


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


# --- the big table ---------------------------------------------------------------------------

_SEED_ROWS = 1000
_FILL_STATEMENT_ROWS = 100_000


def _fill(ctx: Context, database: str, rows: int, rng: random.Random) -> None:
    """Put ``rows`` realistic tasks into translation_tasks, server-side and in key order.

    A thousand tasks of the workload are the seed; row ``n`` copies seed
    ``n mod 1000`` under the key ``task-<8 hex digits rising with n>-bulk-<n>``,
    whose prefix spreads the keys evenly over the key space of the workload's
    own task ids (``task-<first 8 hex digits of the session>-...``), so the
    tasks of new sessions land between existing rows. Rows go in key order, in
    statements of 100,000 rows.
    """
    convert = Rows(ctx)
    session_ids = [workload.new_session_id(rng) for _ in range(SESSIONS_PER_RUN)]
    sessions = convert.of(SESSIONS, [workload.session_record(sid, rng) for sid in session_ids])
    raw_upsert(ctx.db, database, convert.sql[SESSIONS.name], sessions)
    seed = convert.of(TASKS, workload.tasks(session_ids, _SEED_ROWS, rng, prefix="seed"))
    columns = TASKS.columns
    number = " + ".join(f"{10**i} * d{i}.d" for i in range(7))
    digits = ", ".join(f"bench_digits d{i}" for i in range(7))
    key = f"CONCAT('task-', LPAD(LOWER(HEX(n.n * {(1 << 32) // rows})), 8, '0'), '-bulk-', n.n)"
    copied = [key if c == TASKS.key else f"s.{c}" for c in columns]
    marks = ", ".join(["%s"] * (len(columns) + 1))
    conn = ctx.db.connect(database, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
            cur.execute("CREATE TABLE bench_seed LIKE translation_tasks")
            cur.execute("ALTER TABLE bench_seed ADD COLUMN seed_no INT NOT NULL, ADD KEY (seed_no)")
            cur.executemany(
                f"INSERT INTO bench_seed ({', '.join(columns)}, seed_no) VALUES ({marks})",
                [(*row, index) for index, row in enumerate(seed)],
            )
            cur.execute("CREATE TABLE bench_digits (d INT PRIMARY KEY)")
            cur.executemany("INSERT INTO bench_digits VALUES (%s)", [(d,) for d in range(10)])
            cur.execute("CREATE TABLE bench_numbers (n INT PRIMARY KEY)")
            cur.execute(
                f"INSERT INTO bench_numbers SELECT {number} FROM {digits} WHERE {number} < %s",
                (rows,),
            )
            for start in range(0, rows, _FILL_STATEMENT_ROWS):
                cur.execute(
                    f"INSERT INTO translation_tasks ({', '.join(columns)}) "
                    f"SELECT {', '.join(copied)} FROM bench_numbers n "
                    f"JOIN bench_seed s ON s.seed_no = n.n MOD {_SEED_ROWS} "
                    "WHERE n.n >= %s AND n.n < %s ORDER BY n.n",
                    (start, start + _FILL_STATEMENT_ROWS),
                )
            for helper in ("bench_seed", "bench_digits", "bench_numbers"):
                cur.execute(f"DROP TABLE {helper}")
            cur.execute("ANALYZE TABLE translation_tasks")
            cur.fetchall()
    finally:
        conn.close()


def fill_key(n: int, rows: int) -> str:
    """The key :func:`_fill` gives row ``n`` of ``rows``."""
    return f"task-{n * ((1 << 32) // rows):08x}-bulk-{n}"


def table_size(server: DbServer, database: str) -> dict[str, Any]:
    """Rows of translation_tasks and its size on disk, data and indexes (MiB)."""
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM translation_tasks")
            (rows,) = cur.fetchone()
            cur.execute(
                "SELECT data_length, index_length FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = 'translation_tasks'",
                (database,),
            )
            data, index = cur.fetchone()
    finally:
        conn.close()
    return {
        "rows": int(rows),
        "data_mib": round(int(data) / 2**20, 1),
        "index_mib": round(int(index) / 2**20, 1),
    }


# --- results --------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    return [round(n / d, 3) for n, d in zip(numerators, denominators, strict=True)]


def _floor_results(writers: Writers, rows: int, reps: int) -> dict[str, Any]:
    samples = writers.samples
    return {
        "rows": rows,
        "repetitions": reps,
        "one_connection": {
            f"{p}_rows_per_s": _median(samples[f"raw1_{p}"]) for p in writers.phases
        },
        "two_connections": {
            f"{p}_rows_per_s": _median(samples[f"raw2_{p}"]) for p in writers.phases
        },
        # Of the one-connection write's wall time, the share this process spent on
        # the CPU (PyMySQL building statements, holding the GIL).
        "python_cpu_share": {
            phase: round(statistics.median(values), 3)
            for phase, values in writers.cpu_share.items()
        },
        "two_vs_one": {
            phase: round(
                statistics.median(_ratios(samples[f"raw2_{phase}"], samples[f"raw1_{phase}"])), 3
            )
            for phase in writers.phases
        },
        "samples_rows_per_s": {
            k: [round(v, 1) for v in vs] for k, vs in samples.items() if k.startswith("raw")
        },
    }


def _flush_results(writers: Writers, rows: int, reps: int) -> dict[str, Any]:
    """For each number of flush connections and phase: rates and ratios to the raw writes."""
    samples = writers.samples
    runs = []
    for connections in FLUSH_CONNECTIONS:
        run: dict[str, Any] = {"connections": connections}
        for phase in writers.phases:
            flushed = samples[f"flush{connections}_{phase}"]
            # Each repetition's flush against the raw write next to it in time, then
            # the median: slow drifts of the machine cancel out.
            per_rep = _ratios(flushed, samples[f"raw1_{phase}"])
            run[phase] = {
                "flusher_rows_per_s": _median(flushed),
                "raw_one_connection_rows_per_s": _median(samples[f"raw1_{phase}"]),
                "ratio_per_repetition": per_rep,
                "ratio": round(statistics.median(per_rep), 3),
            }
            if f"raw2_{phase}" in samples:
                run[phase]["ratio_to_raw_two_connections"] = round(
                    statistics.median(_ratios(flushed, samples[f"raw2_{phase}"])), 3
                )
        runs.append(run)
    return {
        "rows": rows,
        "repetitions": reps,
        "runs": runs,
        "samples_rows_per_s": {
            k: [round(v, 1) for v in vs] for k, vs in samples.items() if k.startswith("flush")
        },
    }
