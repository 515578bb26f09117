"""CPU of each intake step, in one thread and without HTTP: where a task's time goes.

The parse-only floor spends a few microseconds per task in all; the intake
goal (0.8x the floor) leaves about a quarter of that for everything the
service adds. This section measures each added step, and the least any
Python code can do per task: read each of its fields once.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench import workload
from bench.context import Context
from persistence.buffer import Buffer
from persistence.config import load_settings
from persistence.durable import DurableBuffer
from persistence.records import TASKS
from persistence.service import PersistenceService

BATCHES = 20
BATCH = 1000


def _best_ms_per_1000(step: Callable[[], Any], tasks: int, repeat: int = 5) -> float:
    """The fastest of ``repeat`` runs of ``step``, in ms per 1000 tasks."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000 / tasks * 1000, 3)


def measure_cpu(ctx: Context) -> dict[str, Any]:
    rng = random.Random(ctx.seed)
    sids = [workload.new_session_id(rng) for _ in range(3)]
    bodies = [workload.stamp(workload.body_template(sids, BATCH, rng), n) for n in range(BATCHES)]
    tasks = BATCHES * BATCH
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch, "empty.yaml")
        empty.write_text("{}\n")
        settings = load_settings(path=empty, environ={}, overrides={"logging": {"file": ""}})
        service = PersistenceService(settings)
        receiver = service.receiver
        schema, loader = receiver.schemas[TASKS.name], receiver.loaders[TASKS.name]
        items = [orjson.loads(body)["tasks"] for body in bodies]
        fields = tuple(schema.load_fields)

        def touch_every_field() -> None:
            for batch in items:
                for item in batch:
                    get = item.get
                    for name in fields:
                        get(name)

        loaded = [loader(batch) for batch in items]

        def buffer_add() -> None:
            durable = DurableBuffer(Buffer(10 * tasks, 1 << 40))
            for batch in loaded:
                durable.add(TASKS, batch)

        steps = {
            "parse_json": lambda: [orjson.loads(body) for body in bodies],
            "validate_compiled": lambda: [loader(b) for b in items],
            "validate_marshmallow": lambda: [schema.load(b) for b in items[:4]],
            "buffer_add": buffer_add,
            "touch_every_field": touch_every_field,
        }
        result: dict[str, Any] = {"tasks": tasks, "fields_per_task": len(fields)}
        for name, step in steps.items():
            counted = 4 * BATCH if name == "validate_marshmallow" else tasks
            result[f"{name}_ms_per_1000"] = _best_ms_per_1000(step, counted)
    return result
