"""The parse-only floor: a Flask app that parses a batch body with orjson and answers 200.

Served by gunicorn with the service's settings (1 worker, gthread, 8 threads),
it does what no intake can skip: read the HTTP request, read the body, parse
the JSON, answer. Whatever the service does on top (validation, buffering,
its response) shows as the distance to this floor.
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

app = Flask(__name__)


@app.get("/health")
def health() -> Response:
    return Response(b'{"status": "healthy"}', mimetype="application/json")


@app.post("/api/v1/persistence/tasks/batch")
@app.post("/api/v1/persistence/sessions/batch")
def batch() -> Response:
    body = orjson.loads(request.get_data(cache=False))
    count = len(next(iter(body.values()))) if isinstance(body, dict) and body else 0
    return Response(
        orjson.dumps({"status": "accepted", "count": count}), mimetype="application/json"
    )
