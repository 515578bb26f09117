"""Python client of the Persistence Service.

``PersistenceClient`` (asyncio) and ``SyncPersistenceClient`` (threads) queue
session and task records, send them in batches over one pooled connection,
retry with backoff, and count in ``stats`` whatever they could not deliver.
See docs/CLIENT.md of the service's repository.
"""

from persistence_client.aio import PersistenceClient
from persistence_client.options import ClientOptions
from persistence_client.stats import ClientStats, Refusal
from persistence_client.sync import SyncPersistenceClient
from persistence_client.version import __version__

__all__ = [
    "ClientOptions",
    "ClientStats",
    "PersistenceClient",
    "Refusal",
    "SyncPersistenceClient",
    "__version__",
]
