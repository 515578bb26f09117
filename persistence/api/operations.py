"""``POST /api/v1/persistence/flush`` and ``GET /api/v1/persistence/stats``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from persistence.api import service

bp = Blueprint("operations", __name__, url_prefix="/api/v1/persistence")


@bp.post("/flush")
def flush() -> Response:
    return jsonify(status="flushed", **service().flush())


@bp.get("/stats")
def stats() -> Response:
    return jsonify(service().stats())
