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

Threading contract: the hooks run on the request's own thread; the context
variable is set and reset there, so a pooled thread never carries one
request's id into the next.
"""

from __future__ import annotations

import re

from flask import Flask, Response, g, request

from persistence.api import service
from persistence.auth import BearerTokens, Verdict
from persistence.errors import Unauthorized
from persistence.logs import REQUEST_ID, new_request_id

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128
_SANE_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")

# The endpoints a load balancer probes, open whatever the tokens (GET and HEAD only).
OPEN_ENDPOINTS = frozenset({"status.index", "status.health"})
REALM = 'Bearer realm="persistence"'


def request_id_from(sent: str | None) -> str:
    """The id of a request: the client's ``X-Request-ID`` if it is sane, else a new one."""
    if sent is not None and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return new_request_id()


def init_app(app: Flask, tokens: BearerTokens) -> None:
    """Install the hooks of the module docstring on ``app``."""

    @app.before_request
    def _begin() -> None:
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.request_id = request_id
        g.request_id_reset = REQUEST_ID.set(request_id)
        if tokens.required and not _open(request.endpoint, request.method):
            _authenticate(tokens)

    @app.after_request
    def _stamp(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.teardown_request
    def _end(exc: BaseException | None) -> None:
        reset = g.pop("request_id_reset", None)
        if reset is not None:
            REQUEST_ID.reset(reset)


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
