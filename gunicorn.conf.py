"""gunicorn settings, read from the service's own configuration (config.yaml + environment).

Run: ``gunicorn -c gunicorn.conf.py wsgi:app``. Options given on the command
line (``-b``, ``--threads`` ...) still win over the values set here.

The scheduler and the connection pool are started in each worker after the
fork (``post_worker_init``), never in the master, and stopped in
``worker_exit``, which runs on SIGTERM, SIGINT and SIGQUIT: it stops the
scheduler, writes everything buffered and closes the pool.
"""

import os
import sys

from persistence.config import ConfigError, load_settings

try:
    _settings = load_settings()
except ConfigError as _exc:
    sys.exit(f"config error: {_exc}")

bind = f"{_settings.service.host}:{_settings.service.port}"
workers = _settings.service.workers
worker_class = "gthread"
threads = _settings.service.threads
reload = _settings.service.reload
loglevel = _settings.service.log_level.lower()
graceful_timeout = _settings.service.graceful_timeout
accesslog = "-"
errorlog = "-"
# The runtime control socket is not used; without it, several instances never collide.
control_socket_disable = True

_WORKERS_REFUSED = (
    "more than one worker is not supported: each worker would keep its own buffer, and "
    "POST /flush and /stats would see only one of them. Run one worker and raise "
    "service.threads (SERVICE_THREADS) instead."
)


def on_starting(server):
    if server.cfg.workers > 1:
        sys.exit(f"config error: workers = {server.cfg.workers}: {_WORKERS_REFUSED}")


def post_worker_init(worker):
    service = worker.wsgi.extensions["persistence"]
    service.start()
    worker.persistence_service = (os.getpid(), service)


def worker_exit(server, worker):
    # The master calls this hook too when it reaps a worker; only the worker itself
    # holds the buffer.
    owner = getattr(worker, "persistence_service", None)
    if owner is not None and owner[0] == os.getpid():
        owner[1].stop()
