"""HTTP blueprints; each module's ``bp`` is registered by :func:`register_blueprints`."""

from __future__ import annotations

from flask import Flask, current_app

from persistence.service import PersistenceService


def service() -> PersistenceService:
    """The service of the application handling the current request."""
    return current_app.extensions["persistence"]


def register_blueprints(app: Flask) -> None:
    from persistence.api import docs, ingest, metrics, operations, status

    for module in (status, ingest, operations, metrics, docs):
        app.register_blueprint(module.bp)
