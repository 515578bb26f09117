"""Operator settings compared (opt-in section ``tuning``): threads, workers, flushes.

Intake at 16 concurrent clients (100- and 1000-task batches) with 4, 8
(the default) and 16 threads, and with 2 workers; then the end-to-end load
for a shorter time with 1 and with 2 workers (each worker has its own buffer
and flushes it on connections of its own); then the flusher with 1, 2 and 4
connections and chunks of 500, 1000 and 5000 rows
(:func:`bench.measure_db.measure_flush_settings`). Each intake run gets a
fresh instance, stopped without writing what it buffered (the database is
dropped).
"""

from __future__ import annotations

from typing import Any

from bench.context import Context
from bench.measure_db import measure_flush_settings
from bench.measure_http import NO_FLUSH, timed_load
from bench.measure_service import measure_e2e

VARIANTS = (
    ("threads 4", {"SERVICE_THREADS": "4"}),
    ("threads 8 (default)", {}),
    ("threads 16", {"SERVICE_THREADS": "16"}),
    ("workers 2 x threads 8", {"SERVICE_WORKERS": "2"}),
)
LOADS = ((100, 16), (1000, 16))


def measure_tuning(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    name = ctx.databases.create("tuning")
    intake = []
    for label, env in VARIANTS:
        for batch, clients in LOADS:
            ctx.progress(f"tuning: intake {batch} tasks x {clients} clients, {label}")
            server = ctx.servers.service("tuning", ctx.db.env(name), **NO_FLUSH, **env)
            try:
                sessions = ctx.new_sessions(server, clients)
                run = timed_load(
                    ctx, server, batch, clients, s.intake_warmup, s.intake_window, sessions
                )
            finally:
                server.stop(fast=True)
            intake.append({"variant": label, **run})
    e2e = {}
    for label, env in (("workers 1", {}), ("workers 2", {"SERVICE_WORKERS": "2"})):
        result = measure_e2e(ctx, f"tuning_e2e_{label[-1]}", s.tuning_e2e_duration, **env)
        result.pop("samples")
        e2e[label] = result
    return {"intake": intake, "e2e": e2e, "flush": measure_flush_settings(ctx)}
