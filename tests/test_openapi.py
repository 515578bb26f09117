"""``GET /openapi.json``: a valid OpenAPI 3 document, generated from the schemas that validate
requests, and true to what the service does.

The document is checked with openapi-spec-validator and against the settings
it comes from; then schemathesis generates requests from it (valid ones,
and invalid ones for the batch endpoints) and sends them to the service
under gunicorn with MariaDB and a bearer token: no answer may be a 5xx, and
every answer must be one the document lists for the operation, with the
content type, headers and body it describes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Database
from tests.gunicorn_server import API, Server

TOKEN = "openapi-test-token-6b86b273ff34fce1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 25


def document(app: Flask, **headers: str) -> dict[str, Any]:
    answer = app.test_client().get("/openapi.json", headers=headers)
    assert answer.status_code == 200
    return answer.json


# --- the document --------------------------------------------------------------------------


def test_the_document_is_valid_openapi_and_lists_every_route(app: Flask) -> None:
    spec = document(app)
    validate(spec)
    served = {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint != "static"
    }
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == served


def test_record_rules_come_from_the_configured_schemas(app_factory: Callable[..., Flask]) -> None:
    app = app_factory(
        validation={"task_statuses": ["queued", "done"]}, buffer={"max_batch_size": 250}
    )
    spec = document(app)
    schemas = spec["components"]["schemas"]
    task = schemas["Task"]["properties"]
    assert task["status"]["enum"] == ["queued", "done"]
    assert schemas["TaskBatch"]["properties"]["tasks"]["maxItems"] == 250
    assert schemas["TaskBatch"]["required"] == ["tasks"]
    assert task["sheet_name"]["maxLength"] == 255
    assert task["sheet_name"]["minLength"] == 1
    assert task["source_text"]["maxLength"] == 65_535
    assert "65,535 bytes in UTF-8" in task["source_text"]["description"]
    assert task["target_text"]["nullable"] is True
    assert task["row_index"] == {"type": "integer", "minimum": 0, "maximum": 2_147_483_647}
    assert task["confidence"]["maximum"] == 1.0
    assert task["session_id"]["format"] == "uuid"
    assert set(schemas["Task"]["required"]) == {
        "task_id",
        "session_id",
        "batch_id",
        "sheet_name",
        "row_index",
        "column_name",
        "source_text",
        "status",
    }
    session = schemas["Session"]["properties"]
    assert session["status"]["enum"] == [
        "pending",
        "processing",
        "completed",
        "failed",
        "cancelled",
    ]
    assert session["filename"]["maxLength"] == 255
    assert session["metadata"]["type"] == "object"
    body = spec["paths"][f"{API}/tasks/batch"]["post"]["requestBody"]
    assert "10485760 bytes" in body["description"]


def test_without_tokens_the_scheme_is_declared_but_required_nowhere(app: Flask) -> None:
    spec = document(app)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in spec
    for item in spec["paths"].values():
        for operation in item.values():
            assert "401" not in operation["responses"]


def test_with_tokens_every_operation_but_the_probes_needs_the_bearer_token(
    app_factory: Callable[..., Flask],
) -> None:
    app = app_factory(service={"auth_tokens": [TOKEN]})
    assert app.test_client().get("/openapi.json").status_code == 401
    spec = document(app, **AUTH)
    validate(spec)
    assert spec["security"] == [{"bearerAuth": []}]
    for path, item in spec["paths"].items():
        for operation in item.values():
            probe = path in ("/", "/health")
            assert (operation.get("security") == []) is probe, path
            assert ("401" in operation["responses"]) is not probe, path


def test_every_error_names_its_envelope_and_every_answer_the_request_id(app: Flask) -> None:
    spec = document(app)
    for path, item in spec["paths"].items():
        for operation in item.values():
            for status, answer in operation["responses"].items():
                assert "X-Request-ID" in answer["headers"], (path, status)
                if status.startswith(("4", "5")) and path != "/health":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    name = ref.rsplit("/", 1)[1]
                    assert "detail" in spec["components"]["schemas"][name]["required"]
                if status == "503":
                    assert "Retry-After" in answer["headers"] or path == "/health"


# --- the live service against its document ---------------------------------------------------


def fuzz(schema: Any, base_url: str, negative: bool) -> None:
    """Run every operation of ``schema`` against ``base_url`` with the conformance checks."""
    mode = (
        schemathesis.GenerationMode.NEGATIVE if negative else schemathesis.GenerationMode.POSITIVE
    )
    checks = [*CONFORMANCE, negative_data_rejection] if negative else CONFORMANCE
    for result in schema.get_all_operations():
        operation = result.ok()
        if negative and operation.method.upper() != "POST":
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, headers=AUTH, checks=checks, timeout=10)

        call()


@pytest.mark.mysql
@pytest.mark.e2e
def test_the_live_service_keeps_to_its_document(
    start_server: Callable[..., Server], mysql_env: dict[str, str], mysql_db: Database
) -> None:
    server = start_server(**mysql_env, SERVICE_AUTH_TOKENS=TOKEN, BUFFER_FLUSH_INTERVAL="0.5")
    raw = requests.get(server.url + "/openapi.json", headers=AUTH, timeout=5).json()
    schema = schemathesis.openapi.from_dict(raw)
    fuzz(schema, server.url, negative=False)
    fuzz(schema, server.url, negative=True)
    assert "Traceback" not in server.output()
    assert server.stop() == 0
