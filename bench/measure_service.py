"""The running service: end to end under load, coalescing, latency during a flush, memory."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from bench import loadgen, workload
from bench.context import Context
from bench.measure_http import NO_FLUSH, timed_load
from bench.servers import TASKS_PATH, Gunicorn

SAMPLE_EVERY = 0.5


class Sampler:
    """Every 0.5 s: rows in translation_tasks (SELECT COUNT(*)) and the buffer (GET stats)."""

    def __init__(self, ctx: Context, server: Gunicorn, database: str) -> None:
        self.server = server
        self.conn = ctx.db.connect(database)
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self.origin = 0.0
        self.error: BaseException | None = None

    def start(self, origin: float) -> None:
        self.origin = origin
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.conn.close()

    def last_rows(self) -> int:
        return int(self.samples[-1]["rows"]) if self.samples else 0

    def _loop(self) -> None:
        tick = self.origin
        try:
            while not self._stop.is_set():
                with self.conn.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM translation_tasks")
                    rows = int(cur.fetchone()[0])
                buffer = self.server.stats()["buffer"]
                self.samples.append(
                    {
                        "t": round(time.monotonic() - self.origin, 3),
                        "rows": rows,
                        "buffered": buffer["tasks_count"],
                        "in_flight": buffer["in_flight"],
                    }
                )
                tick += SAMPLE_EVERY
                self._stop.wait(max(0.0, tick - time.monotonic()))
        except BaseException as exc:  # reported by measure_e2e
            self.error = exc


def measure_e2e(
    ctx: Context, role: str = "e2e", duration: float | None = None, **env: str
) -> dict[str, Any]:
    """Sustained closed-loop load with the flusher at work; ``env``: extra service settings."""
    s = ctx.sizes
    duration = duration or s.e2e_duration
    name = ctx.databases.create(role)
    ctx.progress(
        f"{role}: {duration:g} s of {s.e2e_clients} clients x {s.e2e_batch} tasks, "
        f"flush_interval {s.e2e_flush_interval:g} s, max_buffer_size {s.e2e_max_buffer_size}"
        + "".join(f", {k}={v}" for k, v in env.items())
    )
    server = ctx.servers.service(
        role,
        ctx.db.env(name),
        BUFFER_FLUSH_INTERVAL=f"{s.e2e_flush_interval:g}",
        BUFFER_MAX_SIZE=str(s.e2e_max_buffer_size),
        **env,
    )
    try:
        sessions = ctx.new_sessions(server, s.e2e_clients)
        server.flush()  # sessions in the table before the clock starts
        plan = loadgen.LoadPlan(
            host=server.host,
            port=server.port,
            path=TASKS_PATH,
            clients=s.e2e_clients,
            batch=s.e2e_batch,
            session_ids=sessions,
            seed=ctx.rng.randrange(1 << 30),
            warmup=0.0,
            duration=duration,
        )
        load = loadgen.LoadRun(plan).start()
        sampler = Sampler(ctx, server, name)
        try:
            go = load.go()
            sampler.start(go)
            result = load.wait(timeout=duration + 300)
            load_end = go + duration
            accepted = result.accepted_tasks()
            # Keep sampling until everything accepted has landed (or give up).
            deadline = time.monotonic() + 3 * s.e2e_flush_interval + 60
            while sampler.last_rows() < accepted and time.monotonic() < deadline:
                time.sleep(SAMPLE_EVERY / 2)
            time.sleep(SAMPLE_EVERY)
        finally:
            load.terminate()
            sampler.stop()
        if sampler.error is not None:
            raise RuntimeError(f"sampling failed: {sampler.error}")
        stats = server.stats()
    finally:
        server.stop()
    samples = sampler.samples
    load_s = load_end - go
    during = [p for p in samples if p["t"] <= load_s]
    landed_at_end = during[-1]["rows"] if during else 0
    # The steady part: from a fifth of the run (start-up over) to its end.
    steady = [p for p in during if p["t"] >= load_s / 5]
    slope = (
        (steady[-1]["rows"] - steady[0]["rows"]) / (steady[-1]["t"] - steady[0]["t"])
        if len(steady) >= 2 and steady[-1]["t"] > steady[0]["t"]
        else landed_at_end / load_s
    )
    final_rows = samples[-1]["rows"] if samples else 0
    all_landed_at = next((p["t"] for p in samples if p["rows"] >= accepted), None)
    summary = result.summary((go, load_end))
    return {
        "settings": {
            "flush_interval": s.e2e_flush_interval,
            "max_buffer_size": s.e2e_max_buffer_size,
            "hard_limit": stats["buffer"]["hard_limit"],
            "clients": s.e2e_clients,
            "batch": s.e2e_batch,
            "duration_s": duration,
            **{k.lower(): v for k, v in env.items()},
        },
        "accepted_tasks": accepted,
        "accepted_tasks_per_s": round(accepted / load_s, 1),
        "refused_requests": summary["refused"],
        "intake_p50_ms": summary["p50_ms"],
        "intake_p99_ms": summary["p99_ms"],
        "landing_rate_rows_per_s": round(landed_at_end / load_s, 1),
        "steady_landing_rate_rows_per_s": round(slope, 1),
        "max_buffer_depth": max((p["buffered"] for p in samples), default=0),
        "max_held": max((p["buffered"] + p["in_flight"] for p in samples), default=0),
        "rows_at_end": final_rows,
        "all_accepted_landed": final_rows >= accepted,
        "drained_after_s": (
            round(all_landed_at - load_s, 2) if all_landed_at is not None else None
        ),
        "flushes": stats["performance"]["total_flush_count"],
        "average_flush_ms": stats["flush_info"]["average_flush_duration_ms"],
        "average_batch_size": stats["performance"]["average_batch_size"],
        "samples": samples,
    }


def _coalescing_pattern(
    server: Gunicorn, ctx: Context, count: int, group: int = 100
) -> dict[str, Any]:
    """Post ``count`` tasks three times each (pending, processing, completed), group by group."""
    rng = random.Random(ctx.rng.randrange(1 << 30))
    sessions = [sid[0] for sid in ctx.new_sessions(server, 4)]
    server.flush()
    before = server.stats()["performance"]
    records = workload.tasks(sessions, count, rng, status="pending")
    for start in range(0, count, group):
        pending = records[start : start + group]
        processing = [workload.advance(r, "processing", rng) for r in pending]
        completed = [workload.advance(r, "completed", rng) for r in processing]
        for step in (pending, processing, completed):
            server.post_ok(TASKS_PATH, {"tasks": step})
    server.flush()
    after = server.stats()["performance"]
    written = after["total_tasks_written"] - before["total_tasks_written"]
    received = after["tasks_received"] - before["tasks_received"]
    return {
        "tasks": count,
        "records_received": received,
        "rows_written": written,
        "rows_per_record": round(written / received, 4),
        "flushes": after["total_flush_count"] - before["total_flush_count"],
    }


def measure_coalescing(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ctx.progress(f"coalescing: {s.coalesce_tasks} tasks x 3 updates in one flush window")
    name = ctx.databases.create("coalesce")
    server = ctx.servers.service("coalesce", ctx.db.env(name), **NO_FLUSH)
    try:
        one_window = _coalescing_pattern(server, ctx, s.coalesce_tasks)
    finally:
        server.stop()
    completed = ctx.databases.count(name, where="WHERE status = 'completed'")
    one_window["completed_rows_in_database"] = completed

    ctx.progress("coalescing: the same pattern under the default size trigger")
    name = ctx.databases.create("coalesce_default")
    server = ctx.servers.service(
        "coalesce-default",
        ctx.db.env(name),
        BUFFER_FLUSH_INTERVAL=f"{s.e2e_flush_interval:g}",
        BUFFER_MAX_SIZE=str(s.e2e_max_buffer_size),
    )
    try:
        default = _coalescing_pattern(server, ctx, s.coalesce_default_tasks)
    finally:
        server.stop()
    default["settings"] = {
        "flush_interval": s.e2e_flush_interval,
        "max_buffer_size": s.e2e_max_buffer_size,
    }
    return {"one_window": one_window, "default_triggers": default}


def measure_latency(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    name = ctx.databases.create("latency")
    server = ctx.servers.service("latency", ctx.db.env(name), **NO_FLUSH)
    clients, batch = s.latency_clients, s.latency_batch
    try:
        sessions = ctx.new_sessions(server, clients)
        ctx.progress(f"latency: idle, {clients} clients x {batch} tasks")
        idle = timed_load(
            ctx, server, batch, clients, s.latency_warmup, s.latency_idle_window, sessions
        )
        server.flush()

        ctx.progress(f"latency: buffering {s.latency_buffered} tasks")
        _buffer_tasks(ctx, server, clients, s.latency_buffered)
        buffered = server.stats()["buffer"]["tasks_count"]

        ctx.progress(f"latency: {clients} clients x {batch} tasks during a flush of {buffered}")
        plan = loadgen.LoadPlan(
            host=server.host,
            port=server.port,
            path=TASKS_PATH,
            clients=clients,
            batch=batch,
            session_ids=ctx.new_sessions(server, clients),
            seed=ctx.rng.randrange(1 << 30),
            warmup=s.latency_warmup,
            duration=None,
        )
        load = loadgen.LoadRun(plan).start()
        flush_result: dict[str, Any] = {}
        try:
            load.go()
            time.sleep(plan.warmup)
            flush_started = time.monotonic()
            cpu_start = server.worker_cpu_seconds()
            flush_result = server.flush()
            flush_ended = time.monotonic()
            cpu_end = server.worker_cpu_seconds()
            load.stop()
            result = load.wait()
        finally:
            load.terminate()
        during = result.summary((flush_started, flush_ended))
        during["server_cpu_cores"] = round(
            (cpu_end - cpu_start) / max(flush_ended - flush_started, 1e-9), 3
        )
    finally:
        server.stop(fast=True)  # what the clients posted during the flush is not needed
    ratio = (
        round(during["p99_ms"] / idle["p99_ms"], 3)
        if during["p99_ms"] is not None and idle["p99_ms"]
        else None
    )
    return {
        "clients": clients,
        "batch": batch,
        "flush": {
            "tasks_buffered": buffered,
            "tasks_written": flush_result.get("tasks_written"),
            "seconds": round(flush_ended - flush_started, 3),
            "flusher_rows_per_s": round(
                flush_result.get("tasks_written", 0) / max(flush_ended - flush_started, 1e-9), 1
            ),
        },
        "idle": idle,
        "during_flush": during,
        "p99_ratio": ratio,
    }


def _buffer_tasks(ctx: Context, server: Gunicorn, clients: int, count: int) -> None:
    """Post about ``count`` new tasks (new sessions) in 1000-task batches from ``clients``."""
    clients = max(1, min(clients, round(count / 1000)))
    per_client = max(1, round(count / (1000 * clients)))
    sessions = ctx.new_sessions(server, clients)
    plan = loadgen.LoadPlan(
        host=server.host,
        port=server.port,
        path=TASKS_PATH,
        clients=clients,
        batch=1000,
        session_ids=sessions,
        seed=ctx.rng.randrange(1 << 30),
        warmup=0.0,
        duration=None,
        max_requests=per_client,
    )
    result = loadgen.run(plan)
    refused = sum(1 for c in result.clients for st in c.statuses if st != 200)
    if refused:
        raise RuntimeError(f"{refused} batches were refused while buffering")


def measure_memory(ctx: Context) -> dict[str, Any]:
    """RSS growth of the worker while it buffers new tasks (nothing is flushed meanwhile).

    A warm-up first buffers 16,000 tasks (``--quick``: 2,000) through the request
    threads and keeps them, so that the one-time growth (thread arenas, caches)
    is in the baseline. It is not flushed: memory freed by a flush would be
    reused by the next records and hide their cost. Then the buffer is filled in
    five equal steps, reading the worker's VmRSS after each; the headline is the
    least-squares slope of RSS over buffered tasks (bytes per buffered task). The
    plain growth divided by the tasks buffered is reported next to it.
    """
    s = ctx.sizes
    name = ctx.databases.create("memory")
    server = ctx.servers.service("memory", ctx.db.env(name), **NO_FLUSH)
    points: list[tuple[int, int]] = []
    try:
        ctx.progress(f"memory: warm-up (buffer {s.memory_warmup} tasks)")
        _buffer_tasks(ctx, server, 8, s.memory_warmup)
        time.sleep(0.3)
        warm = server.stats()["buffer"]["tasks_count"]
        points.append((warm, server.worker_rss_bytes()))
        ctx.progress(f"memory: buffering {s.memory_tasks} tasks in five steps")
        for step in range(1, 6):
            target = warm + s.memory_tasks * step // 5
            _buffer_tasks(ctx, server, 4, target - points[-1][0])
            time.sleep(0.3)
            buffered = server.stats()["buffer"]["tasks_count"]
            points.append((buffered, server.worker_rss_bytes()))
    finally:
        server.stop(fast=True)  # not worth writing: the database is dropped at the end
    json_bytes = workload.mean_record_bytes()
    buffered = points[-1][0] - points[0][0]
    rss_before, rss_after = points[0][1], points[-1][1]
    slope = _slope(points)
    return {
        "tasks_buffered": buffered,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_growth_bytes": rss_after - rss_before,
        "bytes_per_task": round(slope, 1),
        "growth_per_task": round((rss_after - rss_before) / buffered, 1),
        "bytes_per_100k_tasks": round(slope * 100_000),
        "json_bytes_per_task": round(json_bytes, 1),
        "rss_per_json_byte": round(slope / json_bytes, 2),
        "points": [{"tasks": t, "rss_bytes": r} for t, r in points],
    }


def _slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / var if var else 0.0
