"""The OpenAPI 3 document of the API (``GET /openapi.json``), generated from the schemas.

The record schemas that validate requests (:mod:`persistence.schemas`, built
with the configured statuses) are the source: apispec's MarshmallowPlugin
turns them into JSON Schema, and :func:`_record_rules` adds what their own
field classes know: the character limits (``maxLength``), the byte limits
of ``TEXT`` columns (in the description: JSON Schema counts characters
only), "not blank", UUIDs, and the date-time range. The batch envelopes take
``buffer.max_batch_size`` as ``maxItems``, and the request size limit is
stated on every request body. The response bodies have marshmallow schemas
of their own below, used for this document only: the routes build their
answers directly (and tests/test_openapi.py checks them against it).

The document describes the running configuration: when ``service.auth_tokens``
is set, every operation but ``GET /`` and ``GET /health`` requires the
bearer scheme and may answer 401; otherwise the scheme is declared but
required nowhere.

Thread-safe: :func:`build_document` builds a new document each call.
"""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import EXCLUDE, Schema, fields, validate

from persistence.config import Settings
from persistence.schemas import (
    TIMESTAMP_MAX,
    TIMESTAMP_MIN,
    UUID_TEXT,
    Text,
    UtcTimestamp,
    UuidText,
)
from persistence.version import __version__

OPENAPI_VERSION = "3.0.3"
BEARER = "bearerAuth"
API = "/api/v1/persistence"

# --- response bodies (for the document only) -------------------------------------------------


class _Body(Schema):
    """A JSON object that may grow fields: the document does not forbid others."""

    class Meta:
        unknown = EXCLUDE


class ErrorSchema(_Body):
    detail = fields.String(required=True, metadata={"description": "What is wrong, in a sentence."})
    request_id = fields.String(
        metadata={"description": "The request's id, as in the X-Request-ID header."}
    )


class RecordErrorSchema(_Body):
    index = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Position of the record in the list; null for the list itself."},
    )
    field = fields.String(required=True, allow_none=True)
    message = fields.String(required=True)
    session_id = fields.String(allow_none=True, metadata={"description": "The key as sent."})
    task_id = fields.String(allow_none=True, metadata={"description": "The key as sent."})


class InvalidRecordsSchema(ErrorSchema):
    errors = fields.List(fields.Nested(RecordErrorSchema), required=True)
    error_count = fields.Integer(
        metadata={"description": "Every error found; `errors` lists at most 100 of them."}
    )


class UnavailableSchema(ErrorSchema):
    retry_after = fields.Integer(
        required=True, metadata={"description": "Seconds to wait, as in the Retry-After header."}
    )


class FlushCountsSchema(_Body):
    sessions_written = fields.Integer(required=True)
    tasks_written = fields.Integer(required=True)
    dead_lettered = fields.Integer(required=True)
    tasks_waiting = fields.Integer(required=True)
    duration_ms = fields.Float(required=True)
    workers = fields.Integer(required=True)
    instance_id = fields.String(
        required=True, metadata={"description": "service.instance_id, else <host name>:<port>."}
    )


class FlushedSchema(FlushCountsSchema):
    status = fields.String(required=True, validate=validate.OneOf(["flushed"]))


class FlushFailedSchema(UnavailableSchema, FlushCountsSchema):
    status = fields.String(required=True, validate=validate.OneOf(["error"]))
    sessions_buffered = fields.Integer(required=True)
    tasks_buffered = fields.Integer(required=True)


class AcceptedSchema(_Body):
    status = fields.String(required=True, validate=validate.OneOf(["accepted"]))
    count = fields.Integer(required=True)
    timestamp = fields.DateTime(required=True)


class IndexSchema(_Body):
    service = fields.String(required=True)
    status = fields.String(required=True)
    version = fields.String(required=True)


class HealthBufferSchema(_Body):
    sessions_count = fields.Integer(required=True)
    tasks_count = fields.Integer(required=True)
    last_flush = fields.DateTime(required=True, allow_none=True)


class TlsSchema(_Body):
    required = fields.Boolean(required=True, metadata={"description": "database.ssl_ca is set."})
    enabled = fields.Boolean(
        required=True, allow_none=True, metadata={"description": "null: the probe did not connect."}
    )
    verified = fields.Boolean(required=True)
    identity = fields.Boolean(required=True)
    version = fields.String(required=True, allow_none=True)
    cipher = fields.String(required=True, allow_none=True)


class ClockSchema(_Body):
    skew_seconds = fields.Float(
        required=True, metadata={"description": "This host's clock minus the database's."}
    )
    uncertainty_seconds = fields.Float(required=True)
    max_skew_seconds = fields.Float(required=True)
    measured_at = fields.DateTime(required=True)


class HealthSchema(_Body):
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "unhealthy"]))
    database = fields.String(required=True, validate=validate.OneOf(["healthy", "unhealthy"]))
    database_driver = fields.String(required=True, validate=validate.OneOf(["sqlite", "mysql"]))
    buffer = fields.Nested(HealthBufferSchema, required=True)
    workers = fields.Integer(required=True)
    database_error = fields.String(allow_none=True)
    problems = fields.List(fields.String())
    instance_id = fields.String(
        required=True, metadata={"description": "service.instance_id, else <host name>:<port>."}
    )
    database_server = fields.String(
        required=True, metadata={"description": "The server in use (the file, for SQLite)."}
    )
    tls = fields.Nested(TlsSchema, metadata={"description": "Driver mysql only."})
    galera = fields.Dict(
        keys=fields.String(), metadata={"description": "On a Galera node only: its wsrep state."}
    )
    clock = fields.Nested(ClockSchema, metadata={"description": "Driver mysql, once measured."})


class StatsBufferSchema(_Body):
    sessions_count = fields.Integer(required=True)
    tasks_count = fields.Integer(required=True)
    total_count = fields.Integer(required=True)
    capacity = fields.Integer(required=True)
    usage_percent = fields.Float(required=True)
    in_flight = fields.Integer(required=True)
    tasks_waiting_for_session = fields.Integer(required=True)
    bytes = fields.Integer(required=True)
    hard_limit = fields.Integer(required=True)
    hard_limit_bytes = fields.Integer(required=True)


class StatsFlushInfoSchema(_Body):
    last_flush_time = fields.DateTime(required=True, allow_none=True)
    next_flush_time = fields.DateTime(required=True, allow_none=True)
    flush_count_today = fields.Integer(required=True)
    average_flush_duration_ms = fields.Float(required=True)
    total_flush_duration_ms = fields.Float(required=True)
    failed_flush_count = fields.Integer(required=True)
    failures_in_a_row = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    last_error_category = fields.String(required=True, allow_none=True)
    last_error_time = fields.DateTime(required=True, allow_none=True)
    needs_operator = fields.String(required=True, allow_none=True)
    retry_in_seconds = fields.Float(required=True)
    transactions = fields.Integer(required=True)
    conflicts = fields.Integer(required=True)


class StatsPerformanceSchema(_Body):
    total_sessions_written = fields.Integer(required=True)
    total_tasks_written = fields.Integer(required=True)
    total_flush_count = fields.Integer(required=True)
    average_batch_size = fields.Float(required=True)
    uptime_seconds = fields.Float(required=True)
    sessions_received = fields.Integer(required=True)
    tasks_received = fields.Integer(required=True)


class StatsDeadLettersSchema(_Body):
    sessions = fields.Integer(required=True)
    tasks = fields.Integer(required=True)
    by_reason = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class RefusalCountSchema(_Body):
    batches = fields.Integer(required=True)
    records = fields.Integer(required=True)


class StatsJournalSchema(_Body):
    durability = fields.String(required=True, validate=validate.OneOf(["memory", "journal"]))
    fsyncs = fields.Integer(required=True)
    failures = fields.Integer(required=True)
    recovered = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class StatsDatabaseSchema(_Body):
    driver = fields.String(required=True, validate=validate.OneOf(["sqlite", "mysql"]))
    max_record_bytes = fields.Integer(required=True, allow_none=True)
    server = fields.String(required=True)


class StatsWorkersSchema(_Body):
    count = fields.Integer(required=True)
    pids = fields.List(fields.Integer(), required=True)
    buffered = fields.List(fields.Integer(), required=True)
    unreachable = fields.Integer(required=True)


class StatsSchema(_Body):
    buffer = fields.Nested(StatsBufferSchema, required=True)
    flush_info = fields.Nested(StatsFlushInfoSchema, required=True)
    performance = fields.Nested(StatsPerformanceSchema, required=True)
    dead_letters = fields.Nested(StatsDeadLettersSchema, required=True)
    refused = fields.Dict(
        keys=fields.String(), values=fields.Nested(RefusalCountSchema), required=True
    )
    journal = fields.Nested(StatsJournalSchema, required=True)
    database = fields.Nested(StatsDatabaseSchema, required=True)
    timestamp = fields.DateTime(required=True)
    workers = fields.Nested(StatsWorkersSchema, required=True)
    instance_id = fields.String(
        required=True, metadata={"description": "service.instance_id, else <host name>:<port>."}
    )
    clock = fields.Nested(ClockSchema, required=True, allow_none=True)


# --- what the record schemas' own field classes know ------------------------------------------


def _record_rules(self: Any, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """OpenAPI attributes of the service's own field classes (an apispec attribute function)."""
    notes: list[str] = []
    rules: dict[str, Any] = {}
    if isinstance(field, UuidText):
        rules.update(format="uuid", minLength=36, maxLength=36, pattern=f"^{UUID_TEXT.pattern}$")
        notes.append("Stored in lower case.")
    elif isinstance(field, Text):
        if field.max_chars is not None:
            rules["maxLength"] = field.max_chars
        if field.max_bytes is not None:
            # A UTF-8 character takes at least one byte: the byte limit bounds characters too.
            rules["maxLength"] = min(rules.get("maxLength", field.max_bytes), field.max_bytes)
            notes.append(f"At most {field.max_bytes:,} bytes in UTF-8.")
        if field.identifier:
            rules["pattern"] = r"^\S(?:[\s\S]*\S)?$"
            notes.append("No leading or trailing whitespace.")
        elif not field.blank:
            rules["pattern"] = r"\S"
        if not field.blank:
            rules["minLength"] = 1
            notes.append("Not blank.")
    elif isinstance(field, UtcTimestamp):
        notes.append(
            "ISO-8601; without an offset it is taken as UTC; sub-second digits are dropped. "
            f"Between {TIMESTAMP_MIN.isoformat()}Z and {TIMESTAMP_MAX.isoformat()}Z."
        )
    elif isinstance(field, fields.Dict):
        notes.append(
            "A JSON object nested at most 31 levels; integers within the 64-bit range "
            "(-9223372036854775808 to 18446744073709551615)."
        )
    if notes:
        rules["description"] = " ".join(notes)
    return rules


# --- the document ------------------------------------------------------------------------


def build_document(settings: Settings, record_schemas: dict[str, Schema]) -> dict[str, Any]:
    """The OpenAPI document for ``settings``; ``record_schemas`` are the receiver's, by type."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Persistence Service",
        version=__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": (
                "Batched, coalesced writes of translation sessions and tasks. Every answer "
                'but /metrics is JSON; every error is {"detail": ...}. Every response '
                "carries X-Request-ID. See docs/API.md."
            )
        },
    )
    plugin.converter.add_attribute_function(_record_rules)
    secured = bool(settings.service.auth_tokens)
    _components(spec, settings, record_schemas, secured)
    _paths(spec, settings, secured)
    document = spec.to_dict()
    if secured:
        document["security"] = [{BEARER: []}]
    return document


def _components(
    spec: APISpec, settings: Settings, record_schemas: dict[str, Schema], secured: bool
) -> None:
    spec.components.security_scheme(
        BEARER,
        {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "One of service.auth_tokens. "
                + (
                    "Required by every operation but GET / and GET /health."
                    if secured
                    else "No token is configured: no operation requires it."
                )
            ),
        },
    )
    limit = settings.buffer.max_batch_size
    for name, plural in (("session", "sessions"), ("task", "tasks")):
        record = type(record_schemas[name])
        spec.components.schema(
            f"{name.capitalize()}Batch",
            schema=_Body.from_dict(
                {
                    plural: fields.List(
                        fields.Nested(record),
                        required=True,
                        validate=validate.Length(max=limit),
                    )
                },
                name=f"{name.capitalize()}BatchSchema",
            ),
        )
    for schema in (
        ErrorSchema,
        InvalidRecordsSchema,
        UnavailableSchema,
        FlushFailedSchema,
        FlushedSchema,
        AcceptedSchema,
        IndexSchema,
        HealthSchema,
        StatsSchema,
    ):
        spec.components.schema(schema.__name__.removesuffix("Schema"), schema=schema)
    spec.components.header(
        "X-Request-ID",
        {
            "description": "The request's id: the client's X-Request-ID if sane, else a new one.",
            "schema": {"type": "string", "maxLength": 128},
            "required": True,
        },
    )
    spec.components.header(
        "Retry-After",
        {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    )
    spec.components.parameter(
        "RequestId",
        "header",
        {
            "name": "X-Request-ID",
            "required": False,
            "description": (
                "An id for this request (1 to 128 visible ASCII characters, no spaces), sent "
                "back in the response and in the service's log lines; another value is replaced."
            ),
            "schema": {"type": "string"},
        },
    )


def _answer(description: str, schema: str | None = None, **headers: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
    }
    for name, ref in headers.items():
        response["headers"][name.replace("_", "-")] = {"$ref": f"#/components/headers/{ref}"}
    if schema is not None:
        response["content"] = {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
        }
    return response


def _unauthorized() -> dict[str, Any]:
    answer = _answer("No valid bearer token.", "Error")
    answer["headers"]["WWW-Authenticate"] = {
        "description": 'Bearer realm="persistence" (with error="invalid_token" for a wrong one).',
        "schema": {"type": "string"},
    }
    return answer


def _operation(
    summary: str,
    responses: dict[int, dict[str, Any]],
    secured: bool,
    *,
    open_endpoint: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    if secured and not open_endpoint:
        responses = {**responses, 401: _unauthorized()}
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": ["RequestId"],
        "responses": {str(code): answer for code, answer in sorted(responses.items())},
        **extra,
    }
    if open_endpoint:
        operation["security"] = []
    return operation


def _paths(spec: APISpec, settings: Settings, secured: bool) -> None:
    max_bytes = settings.service.max_request_bytes
    batch_errors = {
        400: _answer("The body is not JSON, not an object, or lacks its list.", "Error"),
        408: _answer("The request stopped arriving (service.request_timeout).", "Error"),
        413: _answer(f"The body is larger than {max_bytes} bytes as sent or as inflated.", "Error"),
        415: _answer(
            "Content-Type is not application/json, or Content-Encoding is not gzip, deflate "
            "or identity.",
            "Error",
        ),
        422: _answer(
            f"Too many records (more than {settings.buffer.max_batch_size}) or invalid ones; "
            "nothing was accepted.",
            "InvalidRecords",
        ),
        503: _answer(
            "The buffer is full or the journal cannot be written; nothing was accepted.",
            "Unavailable",
            Retry_After="Retry-After",
        ),
    }
    spec.path(
        "/",
        operations={
            "get": _operation(
                "Name and version",
                {200: _answer("The service runs.", "Index")},
                secured,
                open_endpoint=True,
            )
        },
    )
    spec.path(
        "/health",
        operations={
            "get": _operation(
                "Whether the service can do its job",
                {
                    200: _answer("Healthy.", "Health"),
                    503: _answer(
                        "The database is unreachable or a worker has a problem.", "Health"
                    ),
                },
                secured,
                open_endpoint=True,
            )
        },
    )
    for name in ("session", "task"):
        plural = f"{name}s"
        spec.path(
            f"{API}/{plural}/batch",
            operations={
                "post": _operation(
                    f"Submit {name} records",
                    {200: _answer("Every record was accepted.", "Accepted"), **batch_errors},
                    secured,
                    requestBody={
                        "required": True,
                        "description": (
                            f"At most {max_bytes} bytes (service.max_request_bytes), as sent "
                            "and, with Content-Encoding gzip or deflate, as inflated."
                        ),
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{name.capitalize()}Batch"}
                            }
                        },
                    },
                )
            },
        )
    spec.path(
        f"{API}/flush",
        operations={
            "post": _operation(
                "Write everything buffered now, in every worker",
                {
                    200: _answer("Written.", "Flushed"),
                    503: _answer(
                        "Writing to the database failed; the records stay buffered.",
                        "FlushFailed",
                        Retry_After="Retry-After",
                    ),
                },
                secured,
            )
        },
    )
    spec.path(
        f"{API}/stats",
        operations={
            "get": _operation(
                "Statistics of every worker", {200: _answer("The statistics.", "Stats")}, secured
            )
        },
    )
    metrics = _answer("Prometheus text format 0.0.4 (docs/OPERATIONS.md).")
    metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
    spec.path(
        "/metrics",
        operations={
            "get": _operation("Prometheus metrics of every worker", {200: metrics}, secured)
        },
    )
    document = _answer("This document.")
    document["content"] = {"application/json": {"schema": {"type": "object"}}}
    spec.path(
        "/openapi.json",
        operations={"get": _operation("The OpenAPI document", {200: document}, secured)},
    )
