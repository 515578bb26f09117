"""The HTTP floor (parse-only app), the load generator's own limit, and the service's intake.

Intake runs against the real service with validation on, a flush interval of an
hour and buffer limits far away, so that no flush runs while a window is
measured; ``POST /flush`` between runs empties the buffer (not timed). Each
intake configuration is measured right after the floor at the same batch size
and concurrency (both servers run side by side; the idle one costs nothing).
"""

from __future__ import annotations

import time
from typing import Any

from bench import loadgen
from bench.context import Context
from bench.servers import TASKS_PATH, Gunicorn

# Buffer settings under which intake is measured without any flush interfering.
NO_FLUSH = {
    "BUFFER_FLUSH_INTERVAL": "3600",
    "BUFFER_MAX_SIZE": "5000000",
    "BUFFER_HARD_LIMIT": "10000000",
    "BUFFER_HARD_LIMIT_BYTES": str(16 * 1024**3),
}


def timed_load(
    ctx: Context,
    server: Gunicorn,
    batch: int,
    clients: int,
    warmup: float,
    window: float,
    sessions: tuple[tuple[str, ...], ...] | None = None,
) -> dict[str, Any]:
    """One closed-loop run; the summary adds the worker's CPU use in the window."""
    plan = loadgen.LoadPlan(
        host=server.host,
        port=server.port,
        path=TASKS_PATH,
        clients=clients,
        batch=batch,
        session_ids=sessions or ctx.new_sessions(None, clients),
        seed=ctx.rng.randrange(1 << 30),
        warmup=warmup,
        duration=window,
    )
    load = loadgen.LoadRun(plan).start()
    try:
        go = load.go()
        _sleep_until(go + warmup)
        cpu_start = server.worker_cpu_seconds()
        _sleep_until(go + warmup + window)
        cpu_end = server.worker_cpu_seconds()
        result = load.wait()
    finally:
        load.terminate()
    summary = result.summary()
    summary["server_cpu_cores"] = round((cpu_end - cpu_start) / window, 3)
    # The worker's CPU per task: what the floor's and the service's rates come down to.
    summary["server_cpu_us_per_task"] = (
        round(summary["server_cpu_cores"] * 1e6 / summary["tasks_per_s"], 3)
        if summary["tasks_per_s"]
        else None
    )
    return summary


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def measure(ctx: Context, want_intake: bool) -> dict[str, Any]:
    """The parse-only floor at every configuration and, with ``want_intake``, the service's
    intake right after it at the same configuration, so that each ratio compares two
    measurements taken seconds apart (whatever else the machine does drifts less)."""
    s = ctx.sizes
    ctx.progress("http: starting the parse-only app" + (" and the service" if want_intake else ""))
    floor = ctx.servers.floor()
    service = None
    if want_intake:
        name = ctx.databases.create("intake")
        service = ctx.servers.service("intake", ctx.db.env(name), **NO_FLUSH)
    floor_runs: list[dict[str, Any]] = []
    intake_runs: list[dict[str, Any]] = []
    journal_runs: list[dict[str, Any]] = []
    try:
        for batch, clients in s.configs:
            ctx.progress(f"http floor: {batch} tasks x {clients} clients")
            base = timed_load(ctx, floor, batch, clients, s.floor_warmup, s.floor_window)
            floor_runs.append(base)
            if service is None:
                continue
            ctx.progress(f"intake: {batch} tasks x {clients} clients")
            sessions = ctx.new_sessions(service, clients)
            run = timed_load(
                ctx, service, batch, clients, s.intake_warmup, s.intake_window, sessions
            )
            run["flushed_after_run"] = service.flush()["tasks_written"]  # not timed
            run["floor_tasks_per_s"] = base["tasks_per_s"]
            run["floor_p99_ms"] = base["p99_ms"]
            run["floor_cpu_us_per_task"] = base["server_cpu_us_per_task"]
            run["ratio_to_floor"] = round(run["tasks_per_s"] / base["tasks_per_s"], 3)
            intake_runs.append(run)
        if service is not None:
            service.stop()
            journal_runs = _journal_intake(ctx, floor, name)
        # The client's own limit: more processes against the same floor. If the rate does
        # not grow with them, the server side is what limits, not the load generator.
        check_batch = max(b for b, _ in s.configs)
        check = [r for r in floor_runs if r["batch"] == check_batch]
        for clients in s.client_check_clients:
            ctx.progress(f"client check: {check_batch} tasks x {clients} client processes")
            check.append(
                timed_load(ctx, floor, check_batch, clients, s.floor_warmup, s.floor_window)
            )
        access_log = _access_log_cost(ctx, floor)
    finally:
        floor.stop()
        if service is not None:
            service.stop()
    best = max(check, key=lambda r: r["tasks_per_s"])
    results: dict[str, Any] = {
        "http_floor": {
            "runs": floor_runs,
            "client_check": {
                "batch": check_batch,
                "runs": check,
                "client_max_tasks_per_s": best["tasks_per_s"],
                "client_max_cpu_cores": max(r["client_cpu_cores"] for r in check),
                "server_cpu_cores_at_max": best["server_cpu_cores"],
            },
            "access_log": access_log,
        }
    }
    if intake_runs:
        top = max(intake_runs, key=lambda r: r["tasks_per_s"])
        results["intake"] = {
            "settings": {k.lower(): v for k, v in NO_FLUSH.items()},
            "runs": intake_runs,
            "max_tasks_per_s": top["tasks_per_s"],
            "server_cpu_cores_at_max": top["server_cpu_cores"],
            "journal_runs": journal_runs,
        }
    return results


def _journal_intake(ctx: Context, floor: Gunicorn, database: str) -> list[dict[str, Any]]:
    """Intake with ``buffer.durability: journal`` (each batch fsynced before its 200), each
    configuration right after the floor at the same configuration. Not a goal: the cost
    of durability, for operators who turn it on."""
    s = ctx.sizes
    journal_dir = ctx.workdir / "journal"
    ctx.progress("intake: starting the service with buffer.durability journal")
    service = ctx.servers.service(
        "intake-journal",
        ctx.db.env(database),
        BUFFER_DURABILITY="journal",
        BUFFER_JOURNAL_DIR=str(journal_dir),
        **NO_FLUSH,
    )
    runs = []
    try:
        for batch, clients in s.journal_configs:
            ctx.progress(f"http floor: {batch} tasks x {clients} clients (before the journal)")
            base = timed_load(ctx, floor, batch, clients, s.floor_warmup, s.floor_window)
            ctx.progress(f"intake, journal: {batch} tasks x {clients} clients")
            sessions = ctx.new_sessions(service, clients)
            fsyncs = service.stats()["journal"]["fsyncs"]
            run = timed_load(
                ctx, service, batch, clients, s.intake_warmup, s.intake_window, sessions
            )
            stats = service.stats()
            run["fsyncs"] = stats["journal"]["fsyncs"] - fsyncs
            run["flushed_after_run"] = service.flush()["tasks_written"]  # not timed
            run["floor_tasks_per_s"] = base["tasks_per_s"]
            run["floor_p99_ms"] = base["p99_ms"]
            run["ratio_to_floor"] = round(run["tasks_per_s"] / base["tasks_per_s"], 3)
            runs.append(run)
    finally:
        service.stop()
    return runs


def _access_log_cost(ctx: Context, floor: Gunicorn) -> dict[str, Any]:
    """What gunicorn's access log (on in gunicorn.conf.py) costs where requests are many:
    the smallest batch at the highest concurrency, with and without it, back to back."""
    s = ctx.sizes
    small = min(b for b, _ in s.configs)
    busiest = max(c for b, c in s.configs if b == small)
    ctx.progress(f"http floor: {small} tasks x {busiest} clients without an access log")
    quiet = ctx.servers.floor(name="parse-only-no-access-log", access_log=False)
    try:
        with_log = timed_load(ctx, floor, small, busiest, s.floor_warmup, s.floor_window)
        no_log = timed_load(ctx, quiet, small, busiest, s.floor_warmup, s.floor_window)
    finally:
        quiet.stop()
    return {
        "batch": small,
        "clients": busiest,
        "with_access_log_tasks_per_s": with_log["tasks_per_s"],
        "without_access_log_tasks_per_s": no_log["tasks_per_s"],
        "gain": round(no_log["tasks_per_s"] / with_log["tasks_per_s"], 3),
    }
