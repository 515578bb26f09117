"""The container's health check: ``python -m persistence.healthcheck``.

Loads the settings the way the service does (``$PERSISTENCE_CONFIG`` or
``config.yaml``, then the environment), requests ``GET /health`` on the
address the service listens on (``service.host``/``service.port``; a
wildcard host is probed on the loopback address), prints one line and exits
0 when the answer is 200, 1 otherwise: an error status (503 while the
database is unreachable), no answer within ``--timeout`` seconds, or a bad
setting. The request goes through ``urllib`` from the standard library (the
slim image has no curl) and never through an HTTP proxy named by the
environment. When the service serves HTTPS itself (``service.tls_cert``), the
probe uses HTTPS and trusts exactly the service's own certificate: it checks
that it reached this service, not a host name (it probes the loopback
address). A listener that requires client certificates
(``service.tls_client_ca``) cannot be probed this way; probe through the
proxy in front, or leave the health check to the orchestrator.

Runs as a short-lived process of its own; it shares nothing with the service.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from persistence.config import ConfigError, ServiceSettings, load_settings

DEFAULT_TIMEOUT = 3.0
# Docker keeps the output of each check; one short line is all an operator needs.
MAX_LINE = 400
MAX_BODY = 64 * 1024
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def health_url(service: ServiceSettings) -> str:
    """The URL of ``/health`` where the service described by ``service`` listens."""
    host = WILDCARD_HOSTS.get(service.host, service.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if service.tls_cert else "http"
    return f"{scheme}://{host}:{service.port}/health"


def own_certificate_context(certificate: str) -> ssl.SSLContext:
    """A client context that trusts exactly the service's certificate, at any address."""
    context = ssl.create_default_context(cafile=certificate)
    context.check_hostname = False  # the loopback address is not the certificate's name
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    return context


def check(url: str, timeout: float, context: ssl.SSLContext | None = None) -> tuple[bool, str]:
    """Request ``url``; whether it answered 200, and one line that says what happened."""
    # An empty ProxyHandler: HTTP_PROXY and friends in the container's environment
    # must not send a probe of the loopback address to a proxy.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as response:
            status, body = response.status, response.read(MAX_BODY)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_BODY)
        exc.close()
    except (OSError, http.client.HTTPException) as exc:
        # urllib wraps most socket errors in URLError; a timeout while reading the body
        # arrives bare.
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return False, _line(f"unhealthy: {url}: no answer within {timeout:g} s")
        return False, _line(f"unreachable: {url}: {reason or type(reason).__name__}")
    verdict = "healthy" if status == 200 else "unhealthy"
    return status == 200, _line(f"{verdict}: {url} answered {status}{_summary(body)}")


def _summary(body: bytes) -> str:
    """What /health's JSON says about the database and problems, if anything."""
    try:
        report = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(report, dict):
        return ""
    parts = []
    if report.get("database"):
        parts.append(f"database {report['database']}")
    if report.get("database_error"):
        parts.append(str(report["database_error"]))
    if report.get("problems"):
        parts.append("problems: " + ", ".join(map(str, report["problems"])))
    return f" ({'; '.join(parts)})" if parts else ""


def _line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit status for the container engine (0 healthy, 1 not)."""
    parser = argparse.ArgumentParser(
        prog="python -m persistence.healthcheck",
        description="Exit 0 when the service's GET /health answers 200, else 1.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(_line(f"config error: {exc}"))
        return 1
    service = settings.service
    context = own_certificate_context(service.tls_cert) if service.tls_cert else None
    healthy, line = check(health_url(service), args.timeout, context)
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
