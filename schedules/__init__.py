"""The APScheduler jobs of one worker process: flushes, the health probe, journal adoption.

The scheduler is built and started in the worker after gunicorn forks
(``post_worker_init``) and shut down in ``worker_exit``; never at import or
in the master. Jobs keep ``max_instances=1`` and ``coalesce=True``; a late
run is still run if it is at most one interval late (APScheduler's default
grace of 1 s would skip it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

FLUSH_JOB = "flush"
HEALTH_JOB = "health-probe"
ADOPT_JOB = "journal-adoption"


def build_scheduler(
    flush: Callable[[], object],
    flush_interval: float,
    probe: Callable[[], object],
    probe_interval: float,
    adopt: Callable[[], object] | None = None,
) -> BackgroundScheduler:
    """A scheduler (not started) running ``flush`` and ``probe`` at their intervals, and
    ``adopt`` (journal mode: take over the journals of workers that died) at the flush
    interval.

    Four executor threads: one for the interval flush, one for an on-demand
    flush waiting behind it, one so that the health probe never waits for a
    flush, one for the adoption.
    """
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone=UTC,
    )
    scheduler.add_job(
        flush,
        "interval",
        seconds=flush_interval,
        id=FLUSH_JOB,
        name="interval flush",
        misfire_grace_time=max(1, int(flush_interval)),
    )
    scheduler.add_job(
        probe,
        "interval",
        seconds=probe_interval,
        id=HEALTH_JOB,
        name="database health probe",
        next_run_time=datetime.now(UTC),
        misfire_grace_time=max(1, int(probe_interval)),
    )
    if adopt is not None:
        scheduler.add_job(
            adopt,
            "interval",
            seconds=flush_interval,
            id=ADOPT_JOB,
            name="journal adoption",
            misfire_grace_time=max(1, int(flush_interval)),
        )
    return scheduler


def run_soon(scheduler: BackgroundScheduler, func: Callable[[], object], name: str) -> None:
    """Run ``func`` once, now, on the scheduler's executor (off the calling thread)."""
    scheduler.add_job(func, "date", run_date=datetime.now(UTC), name=name, misfire_grace_time=None)


def next_run_time(scheduler: BackgroundScheduler | None, job_id: str) -> datetime | None:
    """When the job runs next, or None when the scheduler or the job is not there."""
    job = scheduler.get_job(job_id) if scheduler is not None and scheduler.running else None
    return job.next_run_time if job is not None else None
