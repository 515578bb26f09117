"""What every request passes before its route, and every response after it.

- **Request id.** Each request gets an id: the client's ``X-Request-ID``
  when it is sane (1 to 128 visible ASCII characters, no spaces), else a new
  random one. It is set in :data:`persistence.logs.REQUEST_ID` for the log
  lines of the request, sent back in the ``X-Request-ID`` header of every
  response, and put in error bodies as ``request_id``
  (:func:`persistence.errors.error_response`).
- **Bearer token.** When ``service.auth_tokens`` is set, every request but
  ``GET``/``HEAD`` of ``/`` and ``/health`` (what load balancers probe) needs
  ``Authorization: Bearer <token>``; any other gets 401 with
  ``WWW-Authenticate: Bearer``, before its body is looked at, and is counted
  in ``/stats`` ``refused.unauthorized``.

Both cost next to nothing per request, measured under gunicorn: the request
id is kept by a WSGI middleware around Flask (no ``g``, no Flask hook, the
header read from the environ), and the token check is a Flask hook only when
tokens are configured (it needs the route's endpoint).

Threading contract: the middleware and the hook run on the request's own
thread; the context variable is set and reset there, so a pooled thread never
carries one request's id into the next.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, request

from persistence.api import service
from persistence.auth import BearerTokens, Verdict
from persistence.errors import Unauthorized
from persistence.logs import REQUEST_ID, new_request_id

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"
MAX_REQUEST_ID_CHARS = 128
_SANE_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")

# The endpoints a load balancer probes, open whatever the tokens (GET and HEAD only).
OPEN_ENDPOINTS = frozenset({"status.index", "status.health"})
REALM = 'Bearer realm="persistence"'

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def request_id_from(sent: str | None) -> str:
    """The id of a request: the client's ``X-Request-ID`` if it is sane, else a new one."""
    if sent is not None and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return new_request_id()


def init_app(app: Flask, tokens: BearerTokens) -> None:
    """Install the request id and, when tokens are configured, the token check on ``app``."""
    app.wsgi_app = _with_request_id(app.wsgi_app)  # type: ignore[method-assign]
    if tokens.required:

        @app.before_request
        def _check_token() -> None:
            if not _open(request.endpoint, request.method):
                _authenticate(tokens)


def _with_request_id(wsgi_app: WsgiApp) -> WsgiApp:
    """``wsgi_app`` with the request id of the module docstring set around each call."""

    def call(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request_id = request_id_from(environ.get(_REQUEST_ID_ENVIRON))
        header = (REQUEST_ID_HEADER, request_id)

        def start_with_id(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            headers.append(header)
            return start_response(status, headers, *exc_info)

        reset = REQUEST_ID.set(request_id)
        try:
            return wsgi_app(environ, start_with_id)
        finally:
            REQUEST_ID.reset(reset)

    return call


def _open(endpoint: str | None, method: str) -> bool:
    return endpoint in OPEN_ENDPOINTS and method in ("GET", "HEAD")


def _authenticate(tokens: BearerTokens) -> None:
    """Raise 401 unless the request carries a configured token; never say which was sent."""
    verdict = tokens.check(request.headers.get("Authorization"))
    if verdict is Verdict.ALLOWED:
        return
    service().count_refused("unauthorized")
    if verdict is Verdict.MISSING:
        raise Unauthorized(
            "This endpoint needs a bearer token: send 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": REALM},
        )
    raise Unauthorized(
        "The bearer token is not valid.",
        headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
    )
