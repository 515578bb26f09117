"""Where the worker's CPU goes under load: py-spy on the service's gunicorn worker.

``python -m bench.profile_http [--batch 1000] [--clients 8] [--seconds 10]``
starts the service under gunicorn (as the ``intake`` section does: nothing
flushed while it runs), loads it with the bench's load generator, and
samples the worker with ``py-spy record --gil`` (only the thread holding the
GIL: Python's CPU, not threads waiting for it). Each sample is put in a
category (:func:`category_of`); the printout is the share of samples per
category, next to the rate and the worker's CPU per task, and the raw stacks
are kept for flame graphs. Time in the kernel (page faults, system calls) is
not sampled: it shows in the worker's CPU per task only.

Needs py-spy (``pip install -r requirements-bench.txt``) and the right to
trace the worker (root, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.context import Context, Sizes
from bench.databases import BenchDatabases, DbServer
from bench.measure_http import NO_FLUSH, timed_load
from bench.servers import Servers

# Whole subtrees: a sample under one of these frames belongs to it, whatever runs below.
SUBTREES = (
    ("reading the body (Werkzeug, gunicorn)", ("get_data (werkzeug",)),
    ("access log", ("access (gunicorn/glogging.py",)),
    ("sending the response", ("write (gunicorn/http/wsgi.py", "close (gunicorn/http/wsgi.py")),
)
# Otherwise the deepest frame that one of these marks (substrings of py-spy's
# "function (file:line)") names decides.
LEAVES = (
    ("stamp and encode (msgspec)", ("encode_stamped (persistence/typed.py",)),
    ("typed decode (msgspec) and post-pass checks", ("(persistence/typed.py", "/schemas.py")),
    ("buffer: admit and merge", ("(persistence/buffer.py", "(persistence/durable.py")),
    ("rest of service.accept", ("(persistence/receiver.py", "(persistence/service.py")),
    ("request id", ("(persistence/api/hooks.py", "(persistence/logs.py")),
    ("route and JSON answer", ("(persistence/api/", "(persistence/flusher.py")),
    ("Flask and Werkzeug: context, routing, response", ("(flask/", "(werkzeug/", "(blinker/")),
    ("gunicorn: parsing the request", ("(gunicorn/http/",)),
    (
        "worker main loop: polling, reading ahead, handing over",
        ("(persistence/http_", "(gunicorn/", "(selectors.py", "(concurrent/futures/"),
    ),
)


def category_of(frames: list[str]) -> str:
    """The category of one sample, its frames from the outermost to the innermost."""
    for category, marks in SUBTREES:
        if any(mark in frame for frame in frames for mark in marks):
            return category
    for frame in reversed(frames):
        for category, marks in LEAVES:
            if any(mark in frame for mark in marks):
                return category
    return "other"


def categorize(raw: Path) -> tuple[int, Counter[str]]:
    """Samples in all, and per category, of a py-spy ``--format raw`` file."""
    shares: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        shares[category_of(stack.split(";"))] += int(count)
    return total, shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_http", description=__doc__)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--db-host", default="127.0.0.1")
    parser.add_argument("--db-port", type=int, default=3306)
    parser.add_argument("--db-user", default="root")
    parser.add_argument("--db-password", default="")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install -r requirements-bench.txt)", file=sys.stderr)
        return 2
    db = DbServer(args.db_host, args.db_port, args.db_user, args.db_password)
    workdir = Path(tempfile.mkdtemp(prefix="persistence-profile-"))
    ctx = Context(db, BenchDatabases(db), Servers(workdir), workdir, Sizes(), 1, False)
    raw = args.out / f"profile-{args.batch}x{args.clients}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        name = ctx.databases.create("profile")
        server = ctx.servers.service("profile", db.env(name), **NO_FLUSH)
        sessions = ctx.new_sessions(server, args.clients)
        command = [spy, "record", "--pid", str(server.worker_pid()), "--gil", "--nonblocking"]
        command += ["--rate", "997", "--duration", str(round(args.seconds)), "--format", "raw"]
        record = subprocess.Popen(
            [*command, "--output", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        run = timed_load(ctx, server, args.batch, args.clients, 0.5, args.seconds, sessions)
        _, errors = record.communicate(timeout=60)
        if record.returncode != 0:
            print(f"py-spy failed: {errors.decode(errors='replace')}", file=sys.stderr)
            return 1
    finally:
        ctx.servers.stop_all()
        ctx.databases.drop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    total, shares = categorize(raw)
    print(
        f"{args.batch} tasks x {args.clients} clients: {run['tasks_per_s']:,.0f} tasks/s, "
        f"worker {run['server_cpu_cores']:.2f} cores, "
        f"{run['server_cpu_us_per_task']:.2f} us of CPU per task; {total} samples (GIL held)"
    )
    for category, count in shares.most_common():
        print(f"  {100 * count / total:5.1f} %  {category}")
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
