"""``POST /api/v1/persistence/flush`` and ``GET /api/v1/persistence/stats``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from persistence.api import service

bp = Blueprint("operations", __name__, url_prefix="/api/v1/persistence")


@bp.post("/flush")
def flush() -> Response:
    result = service().flush()
    return jsonify(
        status="flushed",
        sessions_written=result.sessions_written,
        tasks_written=result.tasks_written,
        duration_ms=result.duration_ms,
        dead_lettered=result.dead_lettered,
        tasks_waiting=result.tasks_waiting,
    )


@bp.get("/stats")
def stats() -> Response:
    return jsonify(service().stats())
