"""``GET /metrics``: the Prometheus metrics of every worker (docs/OPERATIONS.md)."""

from __future__ import annotations

from flask import Blueprint, Response

from persistence.api import service
from persistence.metrics import CONTENT_TYPE

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(service().metrics_text(), content_type=CONTENT_TYPE)
