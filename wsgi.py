"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

``python wsgi.py`` runs Werkzeug's development server with the scheduler
started, for trying the service out; use gunicorn in production.
"""

import ssl
import sys

from persistence import create_app
from persistence.config import ConfigError, ServiceSettings

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"config error: {exc}")


def development_tls(settings: ServiceSettings) -> ssl.SSLContext | None:
    """HTTPS for the development server from ``service.tls_*``, as gunicorn.conf.py sets it
    for gunicorn (None: plain HTTP)."""
    if not settings.tls_cert:
        return None
    # With a CA file, only its CAs are trusted for client certificates (no system ones).
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=settings.tls_client_ca or None
    )
    context.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    if settings.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


if __name__ == "__main__":
    service = app.extensions["persistence"]
    service.start()
    try:
        app.run(
            host=service.settings.service.host,
            port=service.settings.service.port,
            threaded=True,
            use_reloader=False,
            ssl_context=development_tls(service.settings.service),
        )
    finally:
        service.stop()
