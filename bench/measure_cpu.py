"""CPU of each intake step, in one thread and without HTTP: where a task's time goes.

Single-thread CPU measurements of the path a request body takes in
``PersistenceService.accept`` (memory mode), for 100- and 1000-task bodies,
each step timed alone (best of five) in microseconds per task, next to the
parse-only floor (``orjson.loads`` of the same body) and the marshmallow path
that decides bodies the typed path does not vouch for.

``python -m bench.measure_cpu`` prints the same figures and a cProfile of
``service.accept`` for both body sizes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import orjson

from bench import workload
from bench.context import Context
from persistence.buffer import Buffer
from persistence.config import load_settings
from persistence.durable import DurableBuffer
from persistence.intake import decode_json, validate_batch
from persistence.records import TASKS
from persistence.service import PersistenceService

# Body sizes, and how many different bodies of each are timed per repetition.
BODIES = {100: 200, 1000: 20}
# The marshmallow path is timed on fewer bodies: it is ten times slower.
MARSHMALLOW_SHARE = 10


def _best_us_per_task(step: Callable[[], Any], tasks: int, repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs of ``step``, in µs per task."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return round(best / tasks * 1e6, 3)


@contextmanager
def _service() -> Iterator[PersistenceService]:
    """A memory-mode service with the default rules, room for every timed batch, no threads."""
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch, "empty.yaml")
        empty.write_text("{}\n")
        settings = load_settings(
            path=empty,
            environ={},
            overrides={
                "logging": {"file": ""},
                "buffer": {"max_buffer_size": 1_000_000, "hard_limit": 2_000_000},
            },
        )
        yield PersistenceService(settings)


def _bodies(seed: int, batch: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    sids = [workload.new_session_id(rng) for _ in range(3)]
    template = workload.body_template(sids, batch, rng)
    return [workload.stamp(template, n) for n in range(count)]


def measure_steps(service: PersistenceService, bodies: list[bytes], batch: int) -> dict[str, Any]:
    """Each step of ``service.accept`` on ``bodies`` (all valid), in µs per task."""
    tasks = batch * len(bodies)
    receiver = service.receiver
    decoder = receiver.decoders[TASKS.name]
    schema = receiver.schemas[TASKS.name]
    limit = 1 << 24  # a MariaDB-like max_record_bytes, so that the size rule runs
    body_decoder = msgspec.json.Decoder(decoder.body_type)
    decoded = [one for raw in bodies if (one := decoder.decode(raw, batch, limit)) is not None]
    assert len(decoded) == len(bodies), "every bench body takes the typed path"
    stamps = range(1, batch + 1)

    def buffer_add() -> None:
        durable = DurableBuffer(Buffer(10 * tasks, 1 << 40))
        for one in decoded:
            durable.add(TASKS, one)

    def accept() -> None:
        for raw in bodies:
            service.accept(TASKS, raw)
        service.durable.finish(service.durable.drain(), resolved=True)

    few = bodies[: max(1, len(bodies) // MARSHMALLOW_SHARE)]
    steps = {
        "parse_json": lambda: [orjson.loads(raw) for raw in bodies],
        "typed_decode": lambda: [body_decoder.decode(raw) for raw in bodies],
        "typed_decode_and_checks": lambda: [decoder.decode(raw, batch, limit) for raw in bodies],
        "stamp_and_encode": lambda: [one.encode_stamped(stamps) for one in decoded],
        "buffer_add": buffer_add,
        "service_accept": accept,
    }
    result: dict[str, Any] = {"batch": batch, "bodies": len(bodies)}
    for name, step in steps.items():
        result[f"{name}_us_per_task"] = _best_us_per_task(step, tasks)
    result["marshmallow_path_us_per_task"] = _best_us_per_task(
        lambda: [validate_batch(TASKS, decode_json(raw), schema, batch) for raw in few],
        batch * len(few),
    )
    return result


def measure_cpu(ctx: Context) -> dict[str, Any]:
    with _service() as service:
        runs = [
            measure_steps(service, _bodies(ctx.seed, batch, count), batch)
            for batch, count in BODIES.items()
        ]
    return {"runs": runs}


def profile_accept(service: PersistenceService, bodies: list[bytes], lines: int = 15) -> str:
    """cProfile of ``service.accept`` on ``bodies``, the costliest functions first."""
    profile = cProfile.Profile()
    profile.enable()
    for raw in bodies:
        service.accept(TASKS, raw)
    profile.disable()
    service.durable.finish(service.durable.drain(), resolved=True)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def main() -> None:
    with _service() as service:
        for batch, count in BODIES.items():
            bodies = _bodies(1, batch, count)
            print(f"--- {count} bodies of {batch} tasks, µs per task (best of 5)")
            for name, value in measure_steps(service, bodies, batch).items():
                print(f"{name:40} {value}")
            print(profile_accept(service, bodies))


if __name__ == "__main__":
    main()
