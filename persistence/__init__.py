"""The Persistence Service: batched, coalesced writes of translation sessions and tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from persistence.config import Settings, load_settings
from persistence.version import __version__

__all__ = ["__version__", "create_app"]


def create_app(config: Settings | Mapping[str, Mapping[str, Any]] | None = None) -> Flask:
    """Build the WSGI application. Starts no thread and opens no connection.

    ``config`` is either ready :class:`~persistence.config.Settings` or a
    nested mapping of overrides applied on top of config.yaml and the
    environment (e.g. ``{"database": {"driver": "sqlite"}}``). Threads and the
    connection pool start with ``app.extensions["persistence"].start()``,
    which gunicorn.conf.py calls in each worker after the fork.
    """
    from persistence import cli, errors, logs
    from persistence.api import hooks, register_blueprints
    from persistence.auth import BearerTokens
    from persistence.jsonprovider import OrjsonProvider
    from persistence.service import PersistenceService

    settings = config if isinstance(config, Settings) else load_settings(overrides=config)
    logs.configure_logging(settings.logging)

    app = Flask(__name__)
    # Werkzeug answers "/api//v1/..." and a missing trailing slash with an HTML redirect
    # that no error handler sees; a path is served as written, or 404 in JSON.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.json = OrjsonProvider(app)
    # One byte more than allowed: the ingest blueprint reads a chunked body that far,
    # which tells a body over the limit (413) from one exactly at it.
    app.config["MAX_CONTENT_LENGTH"] = settings.service.max_request_bytes + 1
    # OPTIONS answers 405 in JSON like any other method the API does not serve.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["persistence"] = PersistenceService(settings)
    errors.register_error_handlers(app)
    hooks.init_app(app, BearerTokens(settings.service.auth_tokens))
    register_blueprints(app)
    cli.init_app(app)
    return app
