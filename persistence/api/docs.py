"""``GET /openapi.json``: the OpenAPI document of this service's configuration."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from persistence.api import service
from persistence.openapi import build_document

bp = Blueprint("docs", __name__)

_DOCUMENT = "persistence.openapi"


@bp.get("/openapi.json")
def openapi() -> Response:
    # Built once per application, on first use (two racing first requests build it twice).
    document = current_app.extensions.get(_DOCUMENT)
    if document is None:
        receiver = service().receiver
        document = build_document(receiver.settings, receiver.schemas)
        current_app.extensions[_DOCUMENT] = document
    return jsonify(document)
