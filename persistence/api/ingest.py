"""``POST /api/v1/persistence/sessions/batch`` and ``.../tasks/batch``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from persistence.api import service
from persistence.contentcoding import coding_of, inflate
from persistence.errors import ApiError, PayloadTooLarge, UnsupportedMediaType
from persistence.flusher import iso, utc_now
from persistence.records import SESSIONS, TASKS, RecordType

bp = Blueprint("ingest", __name__, url_prefix="/api/v1/persistence")

# The /stats "refused" counter of each refusal that happens before validation. A body
# that stopped arriving (408) was not a batch that could be read: it counts as malformed.
_REASONS = {400: "malformed", 408: "malformed", 413: "too_large", 415: "unsupported_media_type"}


@bp.post("/sessions/batch")
def sessions_batch() -> Response:
    return _accept(SESSIONS)


@bp.post("/tasks/batch")
def tasks_batch() -> Response:
    return _accept(TASKS)


def _accept(kind: RecordType) -> Response:
    try:
        body = _json_body()
    except ApiError as exc:
        service().count_refused(_REASONS[exc.status])
        raise
    count = service().accept(kind, body)
    return jsonify(status="accepted", count=count, timestamp=iso(utc_now()))


def _json_body() -> bytes:
    """The JSON body of a request, inflated if it came compressed; 400, 413 or 415 if not.

    ``service.max_request_bytes`` limits the body as sent and as inflated.
    """
    if not request.is_json:
        sent = request.mimetype or "none"
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {sent}.")
    coding = coding_of(request.headers.get("Content-Encoding"))
    limit = service().settings.service.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"Request body is {request.content_length} bytes; the limit is {limit} bytes "
            "(service.max_request_bytes). Send smaller batches."
        )
    # A body sent without Content-Length (chunked) is read up to one byte past the limit
    # (MAX_CONTENT_LENGTH, see create_app), so that a longer one is seen, not cut.
    data = request.get_data(cache=False)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"Request body is larger than the limit of {limit} bytes "
            "(service.max_request_bytes). Send smaller batches."
        )
    return data if coding is None else inflate(data, coding, limit)
