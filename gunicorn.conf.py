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

from persistence.config import ConfigError, load_settings
from persistence.control import create_control_directory

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


def on_starting(server):
    # One private directory per master for the workers' control sockets, kept on the
    # arbiter: this file is read again on SIGHUP, the arbiter stays.
    server.persistence_control_dir = create_control_directory(server.cfg.uid, server.cfg.gid)


def post_fork(server, worker):
    worker.control_dir = server.persistence_control_dir


def post_worker_init(worker):
    service = worker.wsgi.extensions["persistence"]
    service.start(control_dir=worker.control_dir)
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
    shutil.rmtree(server.persistence_control_dir, ignore_errors=True)
