"""Taking in one batch: validate it, hand it to the durable buffer, count every refusal.

Threading contract: :meth:`Receiver.accept` and :meth:`Receiver.count_refused`
are called by request threads concurrently; the refusal counters have a lock
of their own, the decoders and schemas are immutable once built, and
everything else is delegated to thread-safe objects.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from persistence.buffer import BufferFull
from persistence.config import Settings
from persistence.durable import DurableBuffer
from persistence.errors import ApiError, ServiceUnavailable
from persistence.intake import decode_json, validate_batch
from persistence.journal import JournalError
from persistence.records import SESSIONS, TASKS, DictBatch, EncodableBatch, Record, RecordType
from persistence.schemas import build_session_schema, build_task_schema
from persistence.typed import TypedDecoder

if TYPE_CHECKING:
    from persistence.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# Why records were refused, as counted in /stats "refused".
REFUSAL_REASONS = (
    "malformed",
    "unsupported_media_type",
    "too_large",
    "invalid",
    "buffer_full",
    "journal_error",
    "unauthorized",
)


class Receiver:
    """The intake of one worker: ``accept`` a request body, or refuse it whole."""

    def __init__(
        self,
        settings: Settings,
        durable: DurableBuffer,
        wake_flusher: Callable[[], None],
        retry_after: Callable[[], int],
        max_record_bytes: Callable[[], int | None] = lambda: None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self.durable = durable
        self._max_record_bytes = max_record_bytes
        self._wake_flusher = wake_flusher
        self._retry_after = retry_after
        self.schemas = {
            SESSIONS.name: build_session_schema(settings.validation.session_statuses),
            TASKS.name: build_task_schema(settings.validation.task_statuses),
        }
        self.decoders = {
            kind.name: TypedDecoder(kind, self.schemas[kind.name]) for kind in (SESSIONS, TASKS)
        }
        self._refused: Counter[str] = Counter()
        self._refused_records: Counter[str] = Counter()
        self._lock = threading.Lock()

    def accept(self, kind: RecordType, raw: bytes) -> int:
        """Validate a raw JSON batch body and buffer its records, all or none; return the count.

        The typed path (:mod:`persistence.typed`) decodes and checks a valid
        body in one pass; when it cannot vouch for the body, orjson and the
        marshmallow schema decide, and name every error of a refused one.
        """
        max_record_bytes = self._max_record_bytes()
        batch: EncodableBatch | None = self.decoders[kind.name].decode(
            raw, self.settings.buffer.max_batch_size, max_record_bytes
        )
        if batch is None:
            batch = DictBatch(kind, self._validate(kind, raw, max_record_bytes))
        try:
            ready = self.durable.add(kind, batch)
        except BufferFull as exc:
            self._count("buffer_full", len(batch))
            raise ServiceUnavailable(
                f"The buffer is full: {exc}; nothing of this batch was kept. Retry later.",
                retry_after=self._retry_after(),
            ) from None
        except JournalError as exc:
            self._count("journal_error", len(batch))
            log.error("batch refused: %s", exc)
            raise ServiceUnavailable(
                f"The batch could not be made durable ({exc}); nothing of it was kept, "
                "and it may be sent again safely.",
                retry_after=self._retry_after(),
            ) from None
        if self._metrics is not None:
            self._metrics.received(kind.name, len(batch))
        if ready >= self.settings.buffer.max_buffer_size:
            self._wake_flusher()
        return len(batch)

    def _validate(self, kind: RecordType, raw: bytes, max_record_bytes: int | None) -> list[Record]:
        """The records of ``raw`` loaded by marshmallow, or the 400/422 that refuses it."""
        try:
            body = decode_json(raw)
        except ApiError:
            self.count_refused("malformed")
            raise
        try:
            return validate_batch(
                kind,
                body,
                self.schemas[kind.name],
                self.settings.buffer.max_batch_size,
                max_record_bytes=max_record_bytes,
            )
        except ApiError as exc:
            self.count_refused("invalid" if exc.status == 422 else "malformed", body, kind)
            raise

    def count_refused(self, reason: str, body: Any = None, kind: RecordType | None = None) -> None:
        """Count a refused batch, and its records when the decoded body could be read."""
        items = body.get(kind.plural) if kind and isinstance(body, dict) else None
        self._count(reason, len(items) if isinstance(items, list) else 0)

    def _count(self, reason: str, records: int) -> None:
        with self._lock:
            self._refused[reason] += 1
            self._refused_records[reason] += records
        if self._metrics is not None:
            self._metrics.refused(reason, records)

    def refusals(self) -> dict[str, dict[str, int]]:
        """Refused batches and records by reason, every reason listed."""
        with self._lock:
            return {
                reason: {"batches": self._refused[reason], "records": self._refused_records[reason]}
                for reason in REFUSAL_REASONS
            }
