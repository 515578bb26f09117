"""What the async and the sync client have in common: options, core, statistics."""

from __future__ import annotations

from abc import ABC, abstractmethod

import httpx

from persistence_client.core import ClientCore
from persistence_client.options import ClientOptions
from persistence_client.stats import ClientStats

# One connection: a single sender makes every request, one at a time. Idle connections are
# dropped before gunicorn's default keep-alive of 2 s, so that a request never goes out on
# a connection the server is closing.
CONNECTION_LIMITS = httpx.Limits(
    max_connections=1, max_keepalive_connections=1, keepalive_expiry=1.5
)


class BaseClient(ABC):
    """The constructor and statistics shared by ``PersistenceClient`` and ``SyncPersistenceClient``.

    Subclasses set up their transport and sender in ``_open`` and provide
    ``_wake_sender``, which ``ClientCore`` calls when the sender should look
    at the queue again.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8001",
        timeout: float = 2.0,
        *,
        batch_size: int = 500,
        linger: float = 0.5,
        max_queue: int = 50_000,
        max_batch_bytes: int = 1_048_576,
        max_retries: int | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        close_timeout: float = 5.0,
        token: str | None = None,
        gzip: bool = False,
    ) -> None:
        """Build a client; nothing is sent until the first record. See docs/CLIENT.md.

        Raises ``ValueError`` naming the option when a value cannot work.
        """
        self.options = ClientOptions(
            base_url=base_url,
            timeout=timeout,
            batch_size=batch_size,
            linger=linger,
            max_queue=max_queue,
            max_batch_bytes=max_batch_bytes,
            max_retries=max_retries,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            close_timeout=close_timeout,
            token=token,
            gzip=gzip,
        )
        self._core = ClientCore(self.options, self._wake_sender)
        self._open()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the delivery counters (see ``ClientStats``)."""
        return self._core.stats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.options.base_url!r})"

    @abstractmethod
    def _open(self) -> None:
        """Start the flavour's sender (a task of the event loop, or a thread)."""

    @abstractmethod
    def _wake_sender(self) -> None:
        """Tell the sender that records are queued (called by the core, any thread)."""

    def _transport_options(self) -> dict[str, object]:
        """Keyword arguments of the httpx client, the same for both flavours."""
        return {
            "base_url": self.options.base_url,
            "headers": self._core.default_headers(),
            "timeout": httpx.Timeout(self.options.timeout),
            "limits": CONNECTION_LIMITS,
        }
