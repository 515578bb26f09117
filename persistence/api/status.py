"""``GET /`` and ``GET /health``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from persistence.api import service
from persistence.version import __version__

bp = Blueprint("status", __name__)


@bp.get("/")
def index() -> Response:
    return jsonify(service="Persistence Service", status="running", version=__version__)


@bp.get("/health")
def health() -> tuple[Response, int]:
    healthy, report = service().health_report()
    return jsonify(report), 200 if healthy else 503
