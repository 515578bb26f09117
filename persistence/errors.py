"""Typed errors of the API and the one JSON envelope every error answer uses.

Every error, including 404, 405 and unexpected 500s, answers
``{"detail": "<a sentence>", ..., "request_id": "<the X-Request-ID>"}`` with a
JSON content type; never HTML.
The HTTP worker (:mod:`persistence.http_worker`) writes the same envelope
for the errors it answers itself: gunicorn's protocol errors, requests that
stop arriving (408), and malformed chunked bodies.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from persistence.logs import REQUEST_ID

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: ``status``, a ``detail`` sentence and extra body fields."""

    status = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ApiError):
    status = 400


class RequestTimeout(ApiError):
    """408: the request (its body) stopped arriving; the connection is closed."""

    status = 408


class Unauthorized(ApiError):
    """401: the request lacks a valid bearer token (``service.auth_tokens``)."""

    status = 401


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class InvalidRecords(ApiError):
    """422: the batch is too large or holds invalid records; ``errors`` lists them."""

    status = 422


class ServiceUnavailable(ApiError):
    """503 with ``Retry-After``: try the same request again later."""

    status = 503

    def __init__(self, detail: str, *, retry_after: int, **extra: Any) -> None:
        super().__init__(
            detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after, **extra
        )


def envelope(detail: str, **extra: Any) -> dict[str, Any]:
    """The body of every error answer, also of those the HTTP worker writes itself."""
    return {"detail": detail, **extra}


def error_response(
    code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """The JSON error envelope, with HTTP status ``code`` and the request's ``request_id``."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        extra["request_id"] = request_id
    response = jsonify(envelope(detail, **extra))
    response.status_code = code
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error of ``app`` with the JSON envelope."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.detail, exc.headers, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers = {}
        if exc.code == 405 and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        detail = {
            404: "No such endpoint: see GET / and docs/API.md for the endpoints.",
            405: "Method not allowed here; allowed: " + headers.get("Allow", "none") + ".",
            413: "Request body is larger than the service accepts (service.max_request_bytes).",
        }.get(exc.code or 500, exc.description or exc.name)
        return error_response(exc.code or 500, detail, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "Internal server error; the service log has the details.")
