"""Options, the order of the sections, and the clean-up of everything a run creates."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import (
    measure_cpu,
    measure_db,
    measure_http,
    measure_service,
    measure_tuning,
    report,
    workload,
)
from bench.context import QUICK, Context, Sizes
from bench.databases import BenchDatabases, DbServer
from bench.servers import REPO, Servers

SECTIONS = (
    "http-floor",
    "db-floor",
    "intake",
    "flush",
    "e2e",
    "coalescing",
    "latency",
    "memory",
    "cpu",
    "tuning",
    "bigtable",
)
# Run when --only is not given; "tuning" (settings compared, about 3 minutes) and
# "bigtable" (a million rows written first, about 4 minutes) are opt-in.
OPT_IN = ("tuning", "bigtable")
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name not in OPT_IN)
# A section whose ratio needs another: asking for it runs the other too.
NEEDS = {"intake": ("http-floor",)}
DEFAULT_OUT = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Measure the Persistence Service against floors measured in the same run "
            "(parse-only HTTP, raw executemany) on a local MariaDB/MySQL."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, a few seconds per section (for tests)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="N",
        help="seconds of sustained load in the end-to-end section (default 60, --quick 3)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAME,NAME",
        help=(
            f"run only these sections: {', '.join(SECTIONS)}, or all (intake brings "
            "http-floor; tuning and bigtable run only when named or with all)"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="where results.json and plot.png go (default bench/results)",
    )
    parser.add_argument("--db-host", default=os.environ.get("BENCH_DB_HOST", "127.0.0.1"))
    parser.add_argument("--db-port", type=int, default=int(os.environ.get("BENCH_DB_PORT", "3306")))
    parser.add_argument("--db-user", default=os.environ.get("BENCH_DB_USER", "root"))
    parser.add_argument("--db-password", default=os.environ.get("BENCH_DB_PASSWORD", ""))
    parser.add_argument("--seed", type=int, default=20260302, help="seed of the generated data")
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be > 0")
    chosen = list(DEFAULT_SECTIONS)
    if args.only:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        if "all" in chosen:
            chosen = list(SECTIONS)
        unknown = [name for name in chosen if name not in SECTIONS]
        if unknown:
            parser.error(f"unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        for name in list(chosen):
            chosen += [need for need in NEEDS.get(name, ()) if need not in chosen]
    args.sections = [name for name in SECTIONS if name in chosen]
    return args


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in (
        "gunicorn",
        "Flask",
        "Werkzeug",
        "marshmallow",
        "msgspec",
        "PyMySQL",
        "DBUtils",
        "orjson",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def revision() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "persistence", "schedules", "gunicorn.conf.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+local changes" if dirty else "")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.duration is not None:
        sizes = dataclasses.replace(sizes, e2e_duration=args.duration)
    db = DbServer(args.db_host, args.db_port, args.db_user, args.db_password)
    try:
        database = db.describe()
    except Exception as exc:
        print(
            f"bench: cannot reach MariaDB/MySQL at {db.host}:{db.port} as {db.user}: {exc}",
            file=sys.stderr,
        )
        return 2

    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="persistence-bench-"))
    ctx = Context(
        db=db,
        databases=BenchDatabases(db),
        servers=Servers(workdir),
        workdir=workdir,
        sizes=sizes,
        seed=args.seed,
        quick=args.quick,
    )
    started_at = datetime.now(UTC)
    results: dict[str, Any] = {
        "meta": {
            "started_at": started_at.isoformat(timespec="seconds"),
            "quick": args.quick,
            "sections": args.sections,
            "revision": revision(),
            "load_average_at_start": list(os.getloadavg()),
            "databases_prefix": ctx.databases.prefix,
            "machine": machine(),
            "database": database,
            "versions": versions(),
            "sizes": dataclasses.asdict(sizes),
            "record_json_bytes": round(workload.mean_record_bytes(), 1),
            "gunicorn": {"workers": 1, "worker_class": "gthread", "threads": 8},
        }
    }
    ctx.progress(
        f"bench: sections {', '.join(args.sections)}; databases {ctx.databases.prefix}_*; "
        f"scratch {workdir}"
    )
    failed = False
    try:
        run_sections(ctx, args.sections, results)
    except BaseException as exc:
        failed = True
        traceback.print_exc()
        for server in ctx.servers.running:
            print(f"--- last lines of {server.name} ({server.log}) ---", file=sys.stderr)
            print(server.tail(), file=sys.stderr)
        if not isinstance(exc, Exception):
            print("bench: interrupted", file=sys.stderr)
    finally:
        ctx.servers.stop_all()
        try:
            ctx.databases.drop_all()
        except Exception as exc:
            print(f"bench: could not drop the bench databases: {exc}", file=sys.stderr)
        if failed:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1

    results["meta"]["duration_s"] = round(time.monotonic() - ctx.started, 1)
    results["meta"]["load_average_at_end"] = list(os.getloadavg())
    results["goals"] = report.goals(results)
    out: Path = args.out
    report.write_json(results, out / "results.json")
    plotted = report.plot(results, out / "plot.png")
    print(report.table(results))
    print(f"results: {out / 'results.json'}")
    if plotted:
        print(f"plot:    {out / 'plot.png'}")
    else:
        print(
            "plot:    not written: matplotlib is not installed "
            "(pip install -r requirements-bench.txt)"
        )
    return 0


def run_sections(ctx: Context, sections: list[str], results: dict[str, Any]) -> None:
    if "http-floor" in sections:  # intake brings http-floor (NEEDS): they run interleaved
        results.update(measure_http.measure(ctx, want_intake="intake" in sections))
    if "db-floor" in sections or "flush" in sections:
        results.update(
            measure_db.measure(
                ctx, want_floor="db-floor" in sections, want_flush="flush" in sections
            )
        )
    if "coalescing" in sections:
        results["coalescing"] = measure_service.measure_coalescing(ctx)
    if "latency" in sections:
        results["latency"] = measure_service.measure_latency(ctx)
    if "memory" in sections:
        results["memory"] = measure_service.measure_memory(ctx)
    if "cpu" in sections:
        results["cpu"] = measure_cpu.measure_cpu(ctx)
    if "e2e" in sections:
        results["e2e"] = measure_service.measure_e2e(ctx)
    if "tuning" in sections:
        results["tuning"] = measure_tuning.measure_tuning(ctx)
    if "bigtable" in sections:
        results["bigtable"] = measure_db.measure_bigtable(ctx)
