"""Combining the statistics of several worker processes into the service's.

Pure functions over the JSON dictionaries each worker reports (see
:meth:`persistence.service.PersistenceService.worker_stats`): counters add
up, times take the latest (or, for the next flush, the earliest), and
averages and percentages are computed again from the totals.
"""

from __future__ import annotations

from typing import Any


def _add(values: list[Any]) -> Any:
    """Numbers add up; dictionaries combine key by key; anything else keeps the first."""
    first = values[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return first
    if isinstance(first, (int, float)):
        return sum(v for v in values if isinstance(v, (int, float)))
    if isinstance(first, dict):
        keys = {key for value in values for key in value}
        return {key: _add([v[key] for v in values if key in v]) for key in sorted(keys)}
    return first


def _latest(values: list[str | None]) -> str | None:
    present = [v for v in values if v]
    return max(present) if present else None  # ISO-8601 UTC strings sort by time


def _earliest(values: list[str | None]) -> str | None:
    present = [v for v in values if v]
    return min(present) if present else None


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The service's statistics from its workers' (the first is the answering worker's)."""
    combined = _add(reports)
    flush_infos = [r["flush_info"] for r in reports]
    info = combined["flush_info"]
    info["last_flush_time"] = _latest([f["last_flush_time"] for f in flush_infos])
    info["next_flush_time"] = _earliest([f["next_flush_time"] for f in flush_infos])
    info["retry_in_seconds"] = max(f["retry_in_seconds"] for f in flush_infos)
    last_errors = [f for f in flush_infos if f["last_error_time"]]
    newest_error = max(last_errors, key=lambda f: f["last_error_time"], default=None)
    for key in ("last_error", "last_error_category", "last_error_time"):
        info[key] = newest_error[key] if newest_error else None
    info["failures_in_a_row"] = max(f["failures_in_a_row"] for f in flush_infos)
    info["needs_operator"] = next(
        (f["needs_operator"] for f in flush_infos if f["needs_operator"]), None
    )
    combined["database"]["max_record_bytes"] = reports[0]["database"]["max_record_bytes"]
    perf = combined["performance"]
    flushes = perf["total_flush_count"]
    info["average_flush_duration_ms"] = (
        round(info["total_flush_duration_ms"] / flushes, 3) if flushes else 0.0
    )

    buffer = combined["buffer"]
    buffer["usage_percent"] = (
        round(100 * buffer["total_count"] / buffer["capacity"], 2) if buffer["capacity"] else 0.0
    )
    written = perf["total_sessions_written"] + perf["total_tasks_written"]
    perf["average_batch_size"] = (
        round(written / perf["total_flush_count"], 2) if perf["total_flush_count"] else 0.0
    )
    perf["uptime_seconds"] = max(r["performance"]["uptime_seconds"] for r in reports)
    combined["timestamp"] = reports[0]["timestamp"]
    combined["workers"] = {
        "count": len(reports),
        "pids": [r["worker"]["pid"] for r in reports],
        "buffered": [r["buffer"]["total_count"] for r in reports],
    }
    combined.pop("worker", None)
    return combined
