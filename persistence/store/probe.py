"""What a health probe learns about one server: whether it takes writes, and its clock.

A probe connects to one server outside the pool and asks

1. ``read_only``, ``wsrep_on`` and ``wsrep_sst_method`` (``SHOW GLOBAL VARIABLES``);
2. the server's clock, ``UTC_TIMESTAMP(6)`` as microseconds since the epoch, with
   the local clock read before and after the round trip;
3. on a Galera node (``wsrep_on``), its state (``SHOW GLOBAL STATUS``).

A Galera node answers ``SELECT 1`` even when it has lost quorum and refuses
every write (error 1047), so a node counts as writable only when
:func:`galera_refusal` finds nothing against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

VARIABLES_QUERY = (
    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('read_only', 'wsrep_on', 'wsrep_sst_method')"
)
# UTC_TIMESTAMP(6) is the time the statement started, on the server's clock; the
# difference to the epoch is plain arithmetic, whatever the session's time zone.
CLOCK_QUERY = "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))"
GALERA_QUERY = (
    "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state', "
    "'wsrep_local_state_comment', 'wsrep_cluster_status', 'wsrep_cluster_size')"
)

# wsrep_local_state values.
GALERA_DONOR = 2
GALERA_SYNCED = 4
# SST methods that lock the donor (FLUSH TABLES WITH READ LOCK) while they copy: writes
# to a donor of these would wait until the copy ends.
BLOCKING_SST_METHODS = ("rsync", "rsync_wan")


@dataclass(frozen=True)
class ClockSample:
    """One reading of the server's clock against this host's.

    ``skew`` is this host's clock minus the server's, in seconds (positive: this
    host runs ahead); the true value lies within ``skew ± uncertainty``, half
    the round trip of the query (the server read its clock somewhere inside it).
    """

    skew: float
    uncertainty: float


@dataclass(frozen=True)
class GaleraState:
    """The wsrep status of a Galera node."""

    ready: bool
    local_state: int
    local_state_comment: str
    cluster_status: str
    cluster_size: int
    sst_method: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "local_state": self.local_state,
            "local_state_comment": self.local_state_comment,
            "cluster_status": self.cluster_status,
            "cluster_size": self.cluster_size,
        }


@dataclass(frozen=True)
class ServerState:
    """What one probe found on one server."""

    server: str
    refusal: str | None = None
    clock: ClockSample | None = None
    galera: GaleraState | None = None

    @property
    def writable(self) -> bool:
        return self.refusal is None


def galera_state(status: dict[str, str], sst_method: str) -> GaleraState:
    """A :class:`GaleraState` from ``SHOW GLOBAL STATUS`` rows."""

    def number(name: str) -> int:
        value = status.get(name, "")
        return int(value) if value.isdigit() else -1

    return GaleraState(
        ready=status.get("wsrep_ready", "OFF").upper() == "ON",
        local_state=number("wsrep_local_state"),
        local_state_comment=status.get("wsrep_local_state_comment", ""),
        cluster_status=status.get("wsrep_cluster_status", ""),
        cluster_size=number("wsrep_cluster_size"),
        sst_method=sst_method,
    )


def galera_refusal(state: GaleraState) -> str | None:
    """Why a Galera node does not accept writes now, or None when it does.

    Writable: in the primary component, ``wsrep_ready`` ON, and Synced (4), or
    Donor (2) with an SST method that does not lock the donor. A Donor with
    rsync is refused even when it only serves an incremental transfer (IST),
    since the status does not tell the two apart; that lasts seconds, and the
    store uses another node meanwhile.
    """
    described = f"state {state.local_state} {state.local_state_comment}".rstrip()
    if state.cluster_status != "Primary":
        return (
            f"Galera node is not in the primary component (cluster status "
            f"{state.cluster_status or 'unknown'}: quorum lost or not joined)"
        )
    if not state.ready:
        return f"Galera node is not ready (wsrep_ready OFF, {described})"
    if state.local_state == GALERA_SYNCED:
        return None
    if state.local_state == GALERA_DONOR and state.sst_method not in BLOCKING_SST_METHODS:
        return None
    if state.local_state == GALERA_DONOR:
        return f"Galera node is a donor locked by {state.sst_method} state transfer ({described})"
    return f"Galera node is not synced with the cluster ({described})"


def read_server_state(conn: Any, server: str) -> ServerState:
    """Probe ``server`` over ``conn`` (a PyMySQL connection); the driver's errors propagate."""
    cur = conn.cursor()
    cur.execute(VARIABLES_QUERY)
    variables = {str(name).lower(): str(value) for name, value in cur.fetchall()}
    wall_before = time.time()
    started = time.perf_counter()
    cur.execute(CLOCK_QUERY)
    (server_us,) = cur.fetchone()
    round_trip = time.perf_counter() - started
    local_mid = wall_before + round_trip / 2
    clock = ClockSample(skew=local_mid - int(server_us) / 1e6, uncertainty=round_trip / 2)
    galera = None
    refusal = None
    if variables.get("wsrep_on", "OFF").upper() == "ON":
        cur.execute(GALERA_QUERY)
        status = {str(name).lower(): str(value) for name, value in cur.fetchall()}
        galera = galera_state(status, variables.get("wsrep_sst_method", ""))
        refusal = galera_refusal(galera)
    if refusal is None and variables.get("read_only", "OFF").upper() in ("ON", "1"):
        refusal = "the server is read-only (read_only = ON)"
    return ServerState(server, refusal, clock, galera)
