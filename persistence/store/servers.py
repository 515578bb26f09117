"""Which of the servers of ``database.host`` the store uses, and moving on when it fails.

``DB_HOST=h1:3306,h2:3306,h3:3306`` lists servers that can each take the
writes (the nodes of a Galera cluster, the members of a multi-primary group,
or the endpoints of a managed cluster). The store uses one at a time, the
*current* server, for its pool and its probes. It moves to the next in the
list (after the last: back to the first) when

- a statement or a connection fails with an error that says the server itself
  cannot serve now (:data:`~persistence.store.errors.SERVER_UNAVAILABLE`:
  connection refused or lost, shutting down, a Galera node not ready, read-only),
  or
- the health probe finds it not writable and another server writable.

It never moves back by itself: a server that returns is used again only when
the one in use fails in turn. With one server in the list nothing moves.

Threading contract: every method may be called from any thread; one lock
guards the current index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from persistence.config import DatabaseServer

log = logging.getLogger(__name__)


class ServerList:
    """The servers in failover order and the one in use (see the module docstring)."""

    def __init__(self, servers: Sequence[DatabaseServer]) -> None:
        if not servers:
            raise ValueError("a server list needs at least one server")
        self.servers = tuple(servers)
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> DatabaseServer:
        with self._lock:
            return self.servers[self._current]

    def in_probe_order(self) -> list[DatabaseServer]:
        """Every server, the current one first, then the others in failover order."""
        with self._lock:
            start = self._current
        return [self.servers[(start + i) % len(self.servers)] for i in range(len(self.servers))]

    def failed(self, server: DatabaseServer, reason: str) -> DatabaseServer:
        """``server`` cannot serve: move to the next one if it is still the current one.

        Several threads may see the same server fail; only the first moves on, so a
        burst of errors from one server never skips a healthy one. Returns the
        server in use afterwards.
        """
        with self._lock:
            if len(self.servers) == 1 or self.servers[self._current] != server:
                return self.servers[self._current]
            self._current = (self._current + 1) % len(self.servers)
            chosen = self.servers[self._current]
        log.warning("database server %s failed (%s); moving to %s", server, reason, chosen)
        return chosen

    def use(self, server: DatabaseServer, reason: str) -> bool:
        """Make ``server`` (one of the list) the current one; whether it changed."""
        index = self.servers.index(server)
        with self._lock:
            previous = self.servers[self._current]
            if index == self._current:
                return False
            self._current = index
        log.warning("database server %s %s; moving to %s", previous, reason, server)
        return True
