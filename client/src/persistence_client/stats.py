"""What a client reports about its deliveries: immutable snapshots, safe to keep and compare."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """A batch the service refused for good (a 4xx other than 408 and 429).

    ``detail`` is the service's own sentence (its JSON ``detail``), ``errors``
    its ``errors`` list when it sent one (a 422 names each failing record by
    ``index`` in the batch, its id and the field), and ``request_id`` the
    ``X-Request-ID`` the client sent with the batch, which the service logs.
    """

    kind: str
    status: int
    detail: str
    errors: tuple[Mapping[str, Any], ...]
    records: int
    request_id: str
    time: float


@dataclass(frozen=True)
class ClientStats:
    """Counters since the client was built; every record is counted exactly once.

    ``submitted == sent + refused + given_up + pending`` holds in every
    snapshot: a record handed to ``persist_*`` is delivered (``sent``),
    refused by the service (``refused``), dropped by the client
    (``given_up``, by reason in ``given_up_by_reason``), or still queued or
    being sent (``pending``).
    """

    submitted: int
    sent: int
    refused: int
    given_up: int
    pending: int
    requests: int
    batches_sent: int
    retries: int
    failures_by_cause: Mapping[str, int]
    refused_by_status: Mapping[int, int]
    given_up_by_reason: Mapping[str, int]
    last_refusal: Refusal | None
    last_error: str | None
