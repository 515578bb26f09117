"""What every section of a run shares: the database server, the run's databases, the
gunicorn instances, the scratch directory, the sizes of this run and progress output."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import workload
from bench.databases import BenchDatabases, DbServer
from bench.servers import SESSIONS_PATH, Gunicorn, Servers

# (batch size, concurrent clients) of the intake and parse-only runs.
CONFIGS = ((100, 1), (100, 8), (100, 16), (1000, 1), (1000, 8), (1000, 16))
QUICK_CONFIGS = ((100, 1), (1000, 8))
# Intake with buffer.durability: journal (fsync before each 200), next to its floor.
JOURNAL_CONFIGS = ((100, 16), (1000, 16))


@dataclass(frozen=True)
class Sizes:
    """How long and how much each section measures (``--quick`` shrinks all of it)."""

    configs: tuple[tuple[int, int], ...] = CONFIGS
    journal_configs: tuple[tuple[int, int], ...] = JOURNAL_CONFIGS
    floor_warmup: float = 0.5
    floor_window: float = 3.0
    client_check_clients: tuple[int, ...] = (32, 48)
    intake_warmup: float = 0.5
    intake_window: float = 4.0
    db_rows: int = 20_000
    db_reps: int = 5
    e2e_duration: float = 60.0
    e2e_flush_interval: float = 5.0
    e2e_max_buffer_size: int = 1000
    e2e_clients: int = 8
    e2e_batch: int = 100
    coalesce_tasks: int = 3000
    coalesce_default_tasks: int = 3000
    latency_clients: int = 4
    latency_batch: int = 100
    latency_buffered: int = 50_000
    latency_idle_window: float = 5.0
    latency_warmup: float = 0.5
    memory_tasks: int = 100_000
    memory_warmup: int = 16_000
    tuning_e2e_duration: float = 20.0
    tuning_flush_reps: int = 2
    bigtable_rows: int = 1_000_000
    bigtable_write_rows: int = 20_000
    bigtable_reps: int = 3


QUICK = Sizes(
    configs=QUICK_CONFIGS,
    journal_configs=((100, 1),),
    floor_warmup=0.2,
    floor_window=0.5,
    client_check_clients=(12,),
    intake_warmup=0.2,
    intake_window=0.5,
    db_rows=500,
    db_reps=1,
    e2e_duration=2.0,
    e2e_flush_interval=1.0,
    coalesce_tasks=300,
    coalesce_default_tasks=1200,
    latency_buffered=3000,
    latency_idle_window=0.5,
    latency_warmup=0.2,
    memory_tasks=10_000,
    memory_warmup=2_000,
    tuning_e2e_duration=2.0,
    tuning_flush_reps=1,
    bigtable_rows=20_000,
    bigtable_write_rows=500,
    bigtable_reps=1,
)


@dataclass
class Context:
    db: DbServer
    databases: BenchDatabases
    servers: Servers
    workdir: Path
    sizes: Sizes
    seed: int
    quick: bool
    started: float = field(default_factory=time.monotonic)
    _rng: random.Random | None = None

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        return self._rng

    def progress(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)

    def new_sessions(self, server: Gunicorn | None, clients: int) -> tuple[tuple[str, ...], ...]:
        """One new session per client; posted to ``server`` (a service) when given."""
        ids = tuple((workload.new_session_id(self.rng),) for _ in range(clients))
        if server is not None:
            records = [workload.session_record(sid[0], self.rng) for sid in ids]
            server.post_ok(SESSIONS_PATH, {"sessions": records})
        return ids
