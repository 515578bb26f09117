"""gunicorn settings, read from the service's own configuration (config.yaml + environment).

Run: ``gunicorn -c gunicorn.conf.py wsgi:app``. Options given on the command
line (``-b``, ``--threads`` ...) still win over the values set here.

The scheduler, the connection pool, the journal and the control socket are
started in each worker after the fork (``post_worker_init``), never in the
master, and stopped in ``worker_exit``, which runs on SIGTERM, SIGINT and
SIGQUIT (all three are graceful here): it stops the scheduler, writes
everything buffered and closes the pool. With several workers, each has its
own buffer; the control sockets let any of them answer ``POST /flush`` and
``/stats`` for all (docs/ARCHITECTURE.md).
"""

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

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
# gunicorn's own runtime control socket is not used; without it, instances never collide.
control_socket_disable = True


def _control_dir(master_pid):
    # Private to one master: the workers of another instance on this host never meet.
    return Path(tempfile.gettempdir()) / f"persistence-service-{master_pid}"


def post_worker_init(worker):
    service = worker.wsgi.extensions["persistence"]
    service.start(control_dir=_control_dir(worker.ppid))
    worker.persistence_service = (os.getpid(), service)
    # gthread's quick exit on SIGINT/SIGQUIT raises SystemExit at an arbitrary point of
    # the main loop and can deadlock it, losing the buffer when the master kills the
    # worker. Treat them like SIGTERM: finish the requests, then worker_exit flushes.
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, worker.handle_exit)
        signal.siginterrupt(sig, False)


def worker_exit(server, worker):
    # The master calls this hook too when it reaps a worker; only the worker itself
    # holds the buffer.
    owner = getattr(worker, "persistence_service", None)
    if owner is not None and owner[0] == os.getpid():
        owner[1].stop()


def on_exit(server):
    shutil.rmtree(_control_dir(server.pid), ignore_errors=True)
