"""The multi-process HTTP load generator.

Each client is a process of its own (no GIL shared with the others or with the
harness) holding one keep-alive ``http.client`` connection and sending one
request at a time (closed loop: ``clients`` is the concurrency). Bodies are
serialised before the clock starts; in the loop a client only stamps a
request number into the task ids (:func:`bench.workload.stamp`), sends, and
reads the answer. Every client measures its own CPU time, so the report can
show how much of the machine the load generator itself took.

A run has a warm-up and a measured window (``warmup`` + ``duration``
seconds after all clients are connected and released together), or ends when
the caller sets the stop event, or after ``max_requests`` per client.
Times are ``time.monotonic()``, which is one clock for every process on Linux.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import multiprocessing
import os
import queue
import random
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from bench import workload

_CONTEXT: Any = None


def _context() -> Any:
    """A forkserver context: clients never inherit the harness's threads or connections."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["bench.loadgen"])
    return _CONTEXT


@dataclass(frozen=True)
class LoadPlan:
    host: str
    port: int
    path: str
    clients: int
    batch: int
    session_ids: tuple[tuple[str, ...], ...]  # one tuple per client
    seed: int
    warmup: float = 0.5
    duration: float | None = 3.0  # measured window; None: until stopped or max_requests
    max_requests: int | None = None  # per client
    templates: int = 2  # distinct bodies per client


@dataclass
class ClientResult:
    go: float
    end: float
    cpu_seconds: float
    starts: array  # monotonic start of each request
    latencies: array  # seconds
    statuses: array  # HTTP status (0: connection error)
    tasks: int  # tasks per request


@dataclass
class LoadResult:
    plan: LoadPlan
    go: float
    clients: list[ClientResult] = field(default_factory=list)

    # -- derived figures --------------------------------------------------------------------

    @property
    def window(self) -> tuple[float, float]:
        start = self.go + self.plan.warmup
        end = start + self.plan.duration if self.plan.duration else max(c.end for c in self.clients)
        return start, end

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Throughput of requests that ended in the window, latency of those that began in it."""
        start, end = window or self.window
        wall = max(end - start, 1e-9)
        done_tasks = done_requests = refused = errors = 0
        latencies: list[float] = []
        for client in self.clients:
            for t0, lat, status in zip(
                client.starts, client.latencies, client.statuses, strict=True
            ):
                t1 = t0 + lat
                if start <= t1 <= end:
                    if status == 200:
                        done_tasks += client.tasks
                        done_requests += 1
                    elif status == 0:
                        errors += 1
                    else:
                        refused += 1
                if start <= t0 <= end and status == 200:
                    latencies.append(lat)
        client_cpu = sum(c.cpu_seconds for c in self.clients)
        client_wall = max(c.end for c in self.clients) - min(c.go for c in self.clients)
        return {
            "clients": self.plan.clients,
            "batch": self.plan.batch,
            "window_s": round(wall, 3),
            "requests": done_requests,
            "tasks_per_s": round(done_tasks / wall, 1),
            "requests_per_s": round(done_requests / wall, 2),
            "p50_ms": _percentile_ms(latencies, 50),
            "p99_ms": _percentile_ms(latencies, 99),
            "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
            "latency_samples": len(latencies),
            "refused": refused,
            "errors": errors,
            "client_cpu_s": round(client_cpu, 3),
            "client_wall_s": round(client_wall, 3),
            "client_cpu_cores": round(client_cpu / max(client_wall, 1e-9), 3),
        }

    def accepted_tasks(self) -> int:
        return sum(
            client.tasks * sum(1 for s in client.statuses if s == 200) for client in self.clients
        )


def _percentile_ms(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile in milliseconds (None without samples)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1] * 1000, 2)


class LoadRun:
    """One run: :meth:`start` connects the clients, :meth:`go` releases them, :meth:`wait`."""

    def __init__(self, plan: LoadPlan) -> None:
        if len(plan.session_ids) != plan.clients:
            raise ValueError("one tuple of session ids per client is needed")
        self.plan = plan
        ctx = _context()
        self.stop_event = ctx.Event()
        self._barrier = ctx.Barrier(plan.clients + 1)
        self._queue = ctx.Queue()
        self._processes = [
            ctx.Process(
                target=_client_main,
                args=(plan, index, self._barrier, self.stop_event, self._queue),
                daemon=True,
            )
            for index in range(plan.clients)
        ]
        self.go_time = 0.0

    def start(self) -> LoadRun:
        for process in self._processes:
            process.start()
        return self

    def go(self) -> float:
        """Release the clients (they are connected, bodies built); returns the start time."""
        try:
            self._barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            try:
                detail = self._queue.get(timeout=5)
            except queue.Empty:
                detail = "no client reported in time"
            self.terminate()
            raise RuntimeError(f"a load client failed to start: {detail}") from None
        self.go_time = time.monotonic()
        return self.go_time

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, timeout: float = 900) -> LoadResult:
        result = LoadResult(self.plan, self.go_time)
        deadline = time.monotonic() + timeout
        for _ in self._processes:
            remaining = max(1.0, deadline - time.monotonic())
            item = self._queue.get(timeout=remaining)
            if isinstance(item, str):
                self.terminate()
                raise RuntimeError(f"a load client failed: {item}")
            result.clients.append(item)
        for process in self._processes:
            process.join(timeout=10)
        return result

    def terminate(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()


def run(plan: LoadPlan) -> LoadResult:
    """Start, release and collect a run in one call."""
    load = LoadRun(plan).start()
    load.go()
    return load.wait()


def _client_main(plan: LoadPlan, index: int, barrier: Any, stop_event: Any, queue: Any) -> None:
    try:
        queue.put(_client(plan, index, barrier, stop_event))
    except BaseException as exc:  # reported to the harness, which stops the run
        queue.put(f"client {index}: {type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            barrier.abort()


def _client(plan: LoadPlan, index: int, barrier: Any, stop_event: Any) -> ClientResult:
    rng = random.Random(plan.seed * 1000 + index)
    sessions = list(plan.session_ids[index])
    templates = [workload.body_template(sessions, plan.batch, rng) for _ in range(plan.templates)]
    headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
    conn = http.client.HTTPConnection(plan.host, plan.port, timeout=300)
    conn.connect()
    starts, latencies, statuses = array("d"), array("d"), array("i")
    barrier.wait(timeout=120)
    go = time.monotonic()
    cpu_before = os.times()
    end_at = go + plan.warmup + plan.duration if plan.duration is not None else math.inf
    limit = plan.max_requests if plan.max_requests is not None else math.inf
    seq = 0
    monotonic = time.monotonic
    while seq < limit and not stop_event.is_set():
        t0 = monotonic()
        if t0 >= end_at:
            break
        body = workload.stamp(templates[seq % len(templates)], seq)
        seq += 1
        try:
            conn.request("POST", plan.path, body, headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
            conn = http.client.HTTPConnection(plan.host, plan.port, timeout=300)
        starts.append(t0)
        latencies.append(monotonic() - t0)
        statuses.append(status)
        if status == 503:
            time.sleep(0.1)  # the service asked to back off; a real client would wait too
    end = monotonic()
    cpu_after = os.times()
    conn.close()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return ClientResult(go, end, cpu, starts, latencies, statuses, plan.batch)
