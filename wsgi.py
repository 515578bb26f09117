"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

``python wsgi.py`` runs Werkzeug's development server with the scheduler
started, for trying the service out; use gunicorn in production.
"""

import sys

from persistence import create_app
from persistence.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"config error: {exc}")

if __name__ == "__main__":
    service = app.extensions["persistence"]
    service.start()
    try:
        app.run(
            host=service.settings.service.host,
            port=service.settings.service.port,
            threaded=True,
            use_reloader=False,
        )
    finally:
        service.stop()
