"""gunicorn settings, read from the service's own configuration (config.yaml + environment).

Run: ``gunicorn -c gunicorn.conf.py wsgi:app``. Options given on the command
line (``-b``, ``--threads`` ...) still win over the values set here.

The worker class is the service's own gthread worker
(:mod:`persistence.http_worker`): it reads requests whole before a thread
takes them, answers only JSON, and starts the final flush as soon as it is
told to stop. The scheduler, the connection pool, the journal and the
control socket are started in each worker after the fork
(``post_worker_init``), never in the master, and stopped in ``worker_exit``:
it waits for the flush begun at the stop signal, writes what the last
requests added, and closes the pool. With several workers, each has its own
buffer; the control sockets let any of them answer ``POST /flush`` and
``/stats`` for all (docs/ARCHITECTURE.md).

Timeouts (docs/DEPLOYMENT.md): the master kills a worker that has not exited
``graceful_timeout`` seconds after SIGTERM, SIGINT or SIGQUIT, so the final
flush must fit in it; requests still arriving take at most
``service.request_timeout`` of it. On SIGHUP and SIGTTOU the master waits for
the old worker's heartbeat instead, which the worker keeps alive until its
final flush is done.
"""

import os
import shutil
import ssl
import sys

from persistence.config import ConfigError, load_settings
from persistence.control import create_control_directory
from persistence.http_worker import PersistenceWorker

try:
    _settings = load_settings()
except ConfigError as _exc:
    sys.exit(f"config error: {_exc}")

bind = f"{_settings.service.host}:{_settings.service.port}"
workers = _settings.service.workers
worker_class = "persistence.http_worker.PersistenceWorker"
threads = _settings.service.threads
reload = _settings.service.reload
loglevel = _settings.service.log_level.lower()
graceful_timeout = _settings.service.graceful_timeout
accesslog = "-"
errorlog = "-"
# gunicorn's default line, then the request id the service answered (X-Request-ID).
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}o)s'
)
if _settings.logging.format == "json":
    logger_class = "persistence.logs.JsonGunicornLogger"
# gunicorn's own runtime control socket is not used; without it, instances never collide.
control_socket_disable = True
# HTTPS on the listener itself (service.tls_*); the worker drives the handshakes on its
# event loop, so TLS keeps the protection against stalled clients.
if _settings.service.tls_cert:
    certfile = _settings.service.tls_cert
    keyfile = _settings.service.tls_key or None
    if _settings.service.tls_client_ca:
        ca_certs = _settings.service.tls_client_ca
        cert_reqs = ssl.CERT_REQUIRED


def on_starting(server):
    # One private directory per master for the workers' control sockets, kept on the
    # arbiter: this file is read again on SIGHUP, the arbiter stays.
    server.persistence_control_dir = create_control_directory(server.cfg.uid, server.cfg.gid)
    # prometheus_client's multiprocess mode (persistence/metrics.py): the workers' values
    # live in files there. Set before any process imports prometheus_client, which reads
    # it once: the workers import the application after the fork, with this environment.
    metrics_dir = server.persistence_control_dir / "metrics"
    metrics_dir.mkdir(mode=0o700)
    if (server.cfg.uid, server.cfg.gid) != (os.geteuid(), os.getegid()):
        os.chown(metrics_dir, server.cfg.uid, server.cfg.gid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)


def post_fork(server, worker):
    worker.control_dir = server.persistence_control_dir


def post_worker_init(worker):
    if not isinstance(worker, PersistenceWorker):
        raise RuntimeError(
            f"worker class {type(worker).__name__}: the service needs "
            "persistence.http_worker.PersistenceWorker (do not pass -k/--worker-class)"
        )
    worker.service.start(control_dir=worker.control_dir)
    worker.service_started = True


def worker_exit(server, worker):
    # The master calls this hook too when it reaps a worker; only the worker itself
    # started a service (the flag is set after the fork, in the worker's memory).
    if getattr(worker, "service_started", False):
        worker.service.stop()


def child_exit(server, worker):
    # In the master: the exited worker's gauges leave the scrape (its counters stay).
    # Imported here, long after on_starting set the multiprocess directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, str(server.persistence_control_dir / "metrics"))


def on_exit(server):
    shutil.rmtree(server.persistence_control_dir, ignore_errors=True)
