"""Goals, the printed table, results.json and the plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

KIB = 1024

INTAKE_GOAL = 0.8
# p99 of intake at this many clients, against the floor's p99 at the same configuration.
INTAKE_P99_CLIENTS, INTAKE_P99_GOAL = 8, 1.5
# Flush against raw executemany on one connection, by database.flush_connections.
FLUSH_GOALS = {1: 0.9, 2: 1.3}
PHASE_LABELS = {"insert": "new", "update": "updates", "update_old": "updates of old rows"}
COALESCING_GOAL = 0.34
LATENCY_GOAL = 2.0
MEMORY_GOAL = 1.0 * KIB


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal the run could judge, with the measured value and pass or fail."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, target: str, passed: bool | None, **extra: Any):
        out.append({"goal": name, "measured": measured, "target": target, "pass": passed, **extra})

    for run in results.get("intake", {}).get("runs", []):
        ratio = run.get("ratio_to_floor")
        add(
            f"intake {run['batch']} tasks x {run['clients']} clients / parse-only floor",
            ratio,
            f">= {INTAKE_GOAL}",
            None if ratio is None else ratio >= INTAKE_GOAL,
        )
    for run in results.get("intake", {}).get("runs", []):
        if run["clients"] != INTAKE_P99_CLIENTS:
            continue
        ratio = p99_ratio(run)
        add(
            f"intake p99 {run['batch']} tasks x {run['clients']} clients / floor p99",
            ratio,
            f"<= {INTAKE_P99_GOAL}",
            _at_most(ratio, INTAKE_P99_GOAL),
        )
    for run in results.get("flush", {}).get("runs", []):
        goal = FLUSH_GOALS[run["connections"]]
        for phase in ("insert", "update"):
            ratio = run[phase]["ratio"]
            add(
                f"flush over {run['connections']} conn, "
                f"{'new rows' if phase == 'insert' else 'updates'} / raw executemany 1 conn",
                ratio,
                f">= {goal}",
                ratio >= goal,
            )
    coalescing = results.get("coalescing")
    if coalescing:
        value = coalescing["one_window"]["rows_per_record"]
        add(
            "database rows per record, 3 updates in one flush window",
            value,
            f"<= {COALESCING_GOAL}",
            value <= COALESCING_GOAL,
        )
    latency = results.get("latency")
    if latency:
        ratio = latency["p99_ratio"]
        add(
            "intake p99 during a flush / idle p99",
            ratio,
            f"<= {LATENCY_GOAL}",
            None if ratio is None else ratio <= LATENCY_GOAL,
        )
    memory = results.get("memory")
    if memory:
        value = memory["bytes_per_task"]
        add(
            "worker RSS per buffered task (bytes)",
            value,
            f"<= {MEMORY_GOAL:.0f} (1.0 KiB)",
            value <= MEMORY_GOAL,
        )
    return out


def p99_ratio(run: dict[str, Any]) -> float | None:
    """An intake run's p99 over the parse-only floor's p99 at the same configuration."""
    if run.get("p99_ms") is None or not run.get("floor_p99_ms"):
        return None
    return round(run["p99_ms"] / run["floor_p99_ms"], 3)


def landing_vs_raw(results: dict[str, Any]) -> float | None:
    """The end-to-end landing rate over raw executemany of new rows on one connection."""
    e2e, floor = results.get("e2e"), results.get("db_floor")
    if not e2e or not floor:
        return None
    return round(e2e["landing_rate_rows_per_s"] / floor["one_connection"]["insert_rows_per_s"], 3)


# -- the table ------------------------------------------------------------------------------


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _spread(values: list[float] | None) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def _rows(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        indent
        + "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append(indent + "  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            indent
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return lines


def table(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    lines = [
        "",
        "Persistence Service benchmark"
        + (" (--quick: tiny sizes, numbers not meaningful)" if meta.get("quick") else ""),
        f"  {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), "
        f"{machine.get('memory_gib')} GiB, {meta.get('database', {}).get('version')}, "
        f"Python {machine.get('python')}; run took {_n(meta.get('duration_s'), 1)} s",
    ]
    floor = results.get("http_floor")
    if floor:
        lines += ["", "Parse-only HTTP floor (gunicorn 1 worker, gthread, 8 threads)"]
        extra = [r for r in floor["client_check"]["runs"] if r not in floor["runs"]]
        lines += _rows(
            ["batch x clients", "tasks/s", "p50 ms", "p99 ms", "client cores", "server cores"],
            [
                [
                    f"{r['batch']} x {r['clients']}" + (" (client check)" if r in extra else ""),
                    _n(r["tasks_per_s"]),
                    _n(r["p50_ms"], 2),
                    _n(r["p99_ms"], 2),
                    _n(r["client_cpu_cores"], 2),
                    _n(r["server_cpu_cores"], 2),
                ]
                for r in floor["runs"] + extra
            ],
        )
        log = floor["access_log"]
        lines.append(
            f"  access log ({log['batch']} x {log['clients']}, back to back): on "
            f"{_n(log['with_access_log_tasks_per_s'])}, off "
            f"{_n(log['without_access_log_tasks_per_s'])} tasks/s ({log['gain']:.2f}x)"
        )
    db = results.get("db_floor")
    if db:
        lines += [
            "",
            f"Database floor: raw executemany of the service's upsert, {db['rows']:,} rows",
        ]
        lines += _rows(
            ["connections", "new rows/s", "updates/s"],
            [
                [
                    "1",
                    _n(db["one_connection"]["insert_rows_per_s"]),
                    _n(db["one_connection"]["update_rows_per_s"]),
                ],
                [
                    "2 in parallel",
                    _n(db["two_connections"]["insert_rows_per_s"]),
                    _n(db["two_connections"]["update_rows_per_s"]),
                ],
            ],
        )
    if db and db.get("python_cpu_share"):
        share = db["python_cpu_share"]
        lines.append(
            f"  1 connection: Python (PyMySQL) on the CPU for {share.get('insert', 0):.0%} "
            f"(new rows) and {share.get('update', 0):.0%} (updates) of the write's wall time"
        )
    intake = results.get("intake")
    if intake:
        lines += ["", "Intake, validation on (the service, no flush during the window)"]
        lines += _rows(
            [
                "batch x clients",
                "tasks/s",
                "p50 ms",
                "p99 ms",
                "floor tasks/s",
                "ratio",
                "goal",
                "pass",
                "p99 / floor p99",
                "server cores",
                "CPU us/task",
                "floor CPU us/task",
            ],
            [
                [
                    f"{r['batch']} x {r['clients']}",
                    _n(r["tasks_per_s"]),
                    _n(r["p50_ms"], 2),
                    _n(r["p99_ms"], 2),
                    _n(r.get("floor_tasks_per_s")),
                    _n(r.get("ratio_to_floor"), 3),
                    f">= {INTAKE_GOAL}",
                    _verdict(
                        None
                        if r.get("ratio_to_floor") is None
                        else r["ratio_to_floor"] >= INTAKE_GOAL
                    ),
                    _n(p99_ratio(r), 2),
                    _n(r["server_cpu_cores"], 2),
                    _n(r.get("server_cpu_us_per_task"), 2),
                    _n(r.get("floor_cpu_us_per_task"), 2),
                ]
                for r in intake["runs"]
            ]
            + [
                [
                    f"{r['batch']} x {r['clients']} journal",
                    _n(r["tasks_per_s"]),
                    _n(r["p50_ms"], 2),
                    _n(r["p99_ms"], 2),
                    _n(r.get("floor_tasks_per_s")),
                    _n(r.get("ratio_to_floor"), 3),
                    "-",
                    "-",
                    _n(p99_ratio(r), 2),
                    _n(r["server_cpu_cores"], 2),
                    _n(r.get("server_cpu_us_per_task"), 2),
                    "-",
                ]
                for r in intake.get("journal_runs", [])
            ],
        )
    flush = results.get("flush")
    if flush:
        lines += ["", f"Flush: the service's flusher vs raw executemany, {flush['rows']:,} rows"]
        lines += _flush_rows(flush)
    big = results.get("bigtable")
    if big:
        before = big["table_before"]
        lines += [
            "",
            f"Big table: {before['rows']:,} rows already in translation_tasks "
            f"({before['data_mib']:,.0f} MiB data + {before['index_mib']:,.0f} MiB indexes; "
            f"filled in {big['fill_seconds']:.0f} s), {big['flush']['rows']:,} rows per write",
        ]
        lines += _rows(
            ["connections", "raw new rows/s", "raw updates/s", "raw updates of old rows/s"],
            [
                [
                    label,
                    _n(big["floor"][key]["insert_rows_per_s"]),
                    _n(big["floor"][key]["update_rows_per_s"]),
                    _n(big["floor"][key].get("update_old_rows_per_s")),
                ]
                for label, key in (("1", "one_connection"), ("2", "two_connections"))
            ],
        )
        lines += _flush_rows(big["flush"])
    e2e = results.get("e2e")
    if e2e:
        st = e2e["settings"]
        lines += [
            "",
            f"End to end: {st['duration_s']:g} s, {st['clients']} clients x {st['batch']} tasks, "
            f"flush_interval {st['flush_interval']:g} s, max_buffer_size {st['max_buffer_size']}",
            f"  accepted {_n(e2e['accepted_tasks_per_s'])} tasks/s "
            f"(p50 {_n(e2e['intake_p50_ms'], 1)} ms, p99 {_n(e2e['intake_p99_ms'], 1)} ms, "
            f"{e2e['refused_requests']} batches refused with 503)",
            f"  landed {_n(e2e['landing_rate_rows_per_s'])} rows/s over the run, "
            f"{_n(e2e['steady_landing_rate_rows_per_s'])} rows/s steady; "
            f"max buffer depth {_n(e2e['max_buffer_depth'])} tasks "
            f"(held incl. in flight {_n(e2e['max_held'])})",
            f"  landing rate / raw executemany of new rows on 1 connection: "
            f"{_n(landing_vs_raw(results), 3)}",
            f"  {e2e['flushes']} flushes, average {_n(e2e['average_flush_ms'])} ms and "
            f"{_n(e2e['average_batch_size'])} records; everything accepted landed: "
            f"{_n(e2e['all_accepted_landed'])}"
            + (
                f", {e2e['drained_after_s']:.1f} s after the load stopped"
                if e2e["drained_after_s"] is not None
                else ""
            ),
        ]
    coalescing = results.get("coalescing")
    if coalescing:
        one, default = coalescing["one_window"], coalescing["default_triggers"]
        lines += [
            "",
            "Coalescing: each task posted pending -> processing -> completed",
            f"  in one flush window: {one['rows_written']:,} rows for {one['records_received']:,} "
            f"records = {one['rows_per_record']:.3f} rows/record "
            f"(goal <= {COALESCING_GOAL}: {_verdict(one['rows_per_record'] <= COALESCING_GOAL)})",
            f"  with max_buffer_size {default['settings']['max_buffer_size']}: "
            f"{default['rows_per_record']:.3f} rows/record over {default['flushes']} flushes",
        ]
    latency = results.get("latency")
    if latency:
        idle, during = latency["idle"], latency["during_flush"]
        lines += [
            "",
            f"Latency: {latency['clients']} clients x {latency['batch']} tasks, "
            f"flush of {latency['flush']['tasks_written']:,} tasks taking "
            f"{latency['flush']['seconds']:.1f} s",
            f"  idle p50 {_n(idle['p50_ms'], 1)} ms p99 {_n(idle['p99_ms'], 1)} ms "
            f"({idle['latency_samples']} requests); during the flush p50 "
            f"{_n(during['p50_ms'], 1)} ms p99 {_n(during['p99_ms'], 1)} ms "
            f"({during['latency_samples']} requests, {_n(during['tasks_per_s'])} tasks/s)",
            f"  p99 ratio {_n(latency['p99_ratio'], 2)} "
            f"(goal <= {LATENCY_GOAL}: "
            f"{_verdict(_at_most(latency['p99_ratio'], LATENCY_GOAL))})",
        ]
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            f"Memory: worker RSS over {memory['tasks_buffered']:,} buffered tasks: "
            f"{memory['bytes_per_task']:,.0f} bytes/task (slope; "
            f"{memory['rss_per_json_byte']:.1f}x the {memory['json_bytes_per_task']:.0f} bytes "
            f"of JSON; goal <= {MEMORY_GOAL:.0f}: "
            f"{_verdict(memory['bytes_per_task'] <= MEMORY_GOAL)})",
            f"  RSS +{memory['rss_growth_bytes'] / 2**20:,.1f} MiB from the warmed-up baseline "
            f"= {memory['growth_per_task']:,.0f} bytes/task",
        ]
    cpu = results.get("cpu")
    if cpu:
        lines += ["", "CPU per task of each intake step, one thread, no HTTP (best of 5), µs"]
        steps = [
            ("parse JSON (orjson; the floor)", "parse_json"),
            ("typed decode alone (msgspec)", "typed_decode"),
            ("typed decode and post-pass checks", "typed_decode_and_checks"),
            ("stamp and encode (msgspec)", "stamp_and_encode"),
            ("DurableBuffer.add (stamp, encode, merge)", "buffer_add"),
            ("service.accept in all", "service_accept"),
            ("marshmallow path (orjson + schema), for comparison", "marshmallow_path"),
        ]
        runs = cpu["runs"]
        lines += _rows(
            ["step", *(f"{run['batch']}-task bodies" for run in runs)],
            [[label, *(_n(run[f"{key}_us_per_task"], 2) for run in runs)] for label, key in steps],
        )
    tuning = results.get("tuning")
    if tuning:
        lines += ["", "Tuning: intake with other thread and worker counts (no flush in the window)"]
        lines += _rows(
            ["settings", "batch x clients", "tasks/s", "p50 ms", "p99 ms", "server cores"],
            [
                [
                    r["variant"],
                    f"{r['batch']} x {r['clients']}",
                    _n(r["tasks_per_s"]),
                    _n(r["p50_ms"], 2),
                    _n(r["p99_ms"], 2),
                    _n(r["server_cpu_cores"], 2),
                ]
                for r in tuning["intake"]
            ],
        )
        lines += ["", "Tuning: end to end with 1 and 2 workers"]
        lines += _rows(
            ["settings", "accepted tasks/s", "landed rows/s", "steady rows/s", "503s", "p99 ms"],
            [
                [
                    label,
                    _n(r["accepted_tasks_per_s"]),
                    _n(r["landing_rate_rows_per_s"]),
                    _n(r["steady_landing_rate_rows_per_s"]),
                    _n(r["refused_requests"]),
                    _n(r["intake_p99_ms"], 1),
                ]
                for label, r in tuning["e2e"].items()
            ],
        )
    if tuning and tuning.get("flush"):
        sweep = tuning["flush"]
        raw = sweep["raw_one_connection_rows_per_s"]
        lines += [
            "",
            f"Tuning: the flusher by connections and chunk size, {sweep['rows']:,} rows "
            f"(raw executemany 1 conn: {_n(raw['insert'])} new rows/s, "
            f"{_n(raw['update'])} updates/s)",
        ]
        lines += _rows(
            ["connections", "chunk rows", "new rows/s", "ratio", "updates/s", "ratio"],
            [
                [
                    str(r["connections"]),
                    _n(r["max_rows_per_transaction"]),
                    _n(r["insert"]["flusher_rows_per_s"]),
                    _n(r["insert"]["ratio"], 3),
                    _n(r["update"]["flusher_rows_per_s"]),
                    _n(r["update"]["ratio"], 3),
                ]
                for r in sweep["runs"]
            ],
        )
    judged = results.get("goals", [])
    if judged:
        lines += ["", "Goals"]
        lines += _rows(
            ["goal", "measured", "target", "result"],
            [
                [
                    g["goal"],
                    _n(g["measured"], 3),
                    g["target"],
                    _verdict(g["pass"]),
                ]
                for g in judged
            ],
        )
        passed = sum(1 for g in judged if g["pass"])
        lines.append(f"  {passed} of {len(judged)} goals met")
    return "\n".join(lines) + "\n"


def _flush_rows(flush: dict[str, Any]) -> list[str]:
    """The flusher's rows of a flush table: one per number of connections and phase."""
    return _rows(
        [
            "flush connections",
            "rows",
            "flusher rows/s",
            "raw 1 conn rows/s",
            "ratio",
            "per repetition",
            "vs raw 2 conns",
            "goal",
            "pass",
        ],
        [
            [
                str(run["connections"]),
                PHASE_LABELS[phase],
                _n(run[phase]["flusher_rows_per_s"]),
                _n(run[phase]["raw_one_connection_rows_per_s"]),
                _n(run[phase]["ratio"], 3),
                _spread(run[phase].get("ratio_per_repetition")),
                _n(run[phase].get("ratio_to_raw_two_connections"), 3),
                f">= {FLUSH_GOALS[run['connections']]}",
                _verdict(run[phase]["ratio"] >= FLUSH_GOALS[run["connections"]]),
            ]
            for run in flush["runs"]
            for phase in PHASE_LABELS
            if phase in run
        ],
    )


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


# -- the plot -------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> bool:
    """Write the four-panel figure; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    _plot_e2e(axes[0][0], results.get("e2e"))
    _plot_intake(axes[0][1], results.get("intake"), results.get("http_floor"))
    _plot_flush(axes[0][2], results.get("db_floor"), results.get("flush"))
    _plot_latency(axes[1][0], results.get("latency"))
    _plot_memory(axes[1][1], results.get("memory"))
    _plot_client(axes[1][2], results.get("http_floor"), results.get("intake"))
    meta = results.get("meta", {})
    fig.suptitle(
        "Persistence Service benchmark"
        + (" (--quick)" if meta.get("quick") else "")
        + f" - {meta.get('machine', {}).get('cpus')} CPUs, "
        + f"{meta.get('database', {}).get('version', '')}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _empty(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _plot_e2e(ax: Any, e2e: dict[str, Any] | None) -> None:
    title = "End to end: rows in MySQL and buffer depth"
    if not e2e or not e2e["samples"]:
        _empty(ax, title)
        return
    samples = e2e["samples"]
    t = [p["t"] for p in samples]
    ax.plot(t, [p["rows"] for p in samples], color="tab:blue", label="rows in translation_tasks")
    ax.set_xlabel("seconds")
    ax.set_ylabel("rows in MySQL", color="tab:blue")
    ax.axvline(e2e["settings"]["duration_s"], color="grey", linestyle=":", label="load stops")
    twin = ax.twinx()
    twin.plot(t, [p["buffered"] for p in samples], color="tab:orange", label="buffered tasks", lw=1)
    twin.plot(
        t,
        [p["buffered"] + p["in_flight"] for p in samples],
        color="tab:red",
        label="held (buffered + in flight)",
        lw=0.8,
        alpha=0.6,
    )
    twin.set_ylabel("tasks in the buffer", color="tab:orange")
    st = e2e["settings"]
    ax.set_title(
        f"{title}\n{st['clients']} clients x {st['batch']} tasks, flush_interval "
        f"{st['flush_interval']:g} s, max_buffer_size {st['max_buffer_size']}; "
        f"landed {e2e['landing_rate_rows_per_s']:,.0f} rows/s",
        fontsize=9,
    )
    handles = ax.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    ax.legend(
        handles[0] + twin_handles[0],
        handles[1] + twin_handles[1],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=2,
    )


def _plot_intake(ax: Any, intake: dict[str, Any] | None, floor: dict[str, Any] | None) -> None:
    title = "Intake vs parse-only floor (tasks/s, log scale)"
    runs = (intake or {}).get("runs") or (floor or {}).get("runs")
    if not runs:
        _empty(ax, title)
        return
    labels = [f"{r['batch']}x{r['clients']}" for r in runs]
    x = range(len(labels))
    width = 0.4
    floors = {(r["batch"], r["clients"]): r["tasks_per_s"] for r in (floor or {}).get("runs", [])}
    if floors:
        ax.bar(
            [i - width / 2 for i in x],
            [floors.get((r["batch"], r["clients"]), 0) for r in runs],
            width,
            label="parse-only floor",
            color="tab:grey",
        )
    if intake:
        bars = ax.bar(
            [i + width / 2 for i in x],
            [r["tasks_per_s"] for r in intake["runs"]],
            width,
            label="service intake",
            color="tab:green",
        )
        for bar, r in zip(bars, intake["runs"], strict=True):
            if r.get("ratio_to_floor") is not None:
                ax.annotate(
                    f"{r['ratio_to_floor']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("batch size x concurrent clients")
    ax.set_ylabel("tasks/s")
    ax.set_title(title + f"; goal >= {INTAKE_GOAL}x", fontsize=10)
    ax.legend(fontsize=8)


def _plot_flush(ax: Any, db: dict[str, Any] | None, flush: dict[str, Any] | None) -> None:
    title = "Writing to MariaDB (rows/s)"
    if not db and not flush:
        _empty(ax, title)
        return
    series: dict[str, list[float]] = {}
    phases = ("insert", "update")
    if db:
        series["raw executemany, 1 conn"] = [
            db["one_connection"][f"{p}_rows_per_s"] for p in phases
        ]
        series["raw executemany, 2 conns"] = [
            db["two_connections"][f"{p}_rows_per_s"] for p in phases
        ]
    elif flush:
        series["raw executemany, 1 conn"] = [
            flush["runs"][0][p]["raw_one_connection_rows_per_s"] for p in phases
        ]
    for run in (flush or {}).get("runs", []):
        series[f"service flusher, {run['connections']} conn"] = [
            run[p]["flusher_rows_per_s"] for p in phases
        ]
    width = 0.8 / len(series)
    colors = ["tab:grey", "tab:purple", "tab:olive", "tab:green"]
    for k, (label, values) in enumerate(series.items()):
        ax.bar(
            [i + (k - (len(series) - 1) / 2) * width for i in range(len(phases))],
            values,
            width,
            label=label,
            color=colors[k % len(colors)],
        )
    ax.set_xticks(range(len(phases)), ["new rows", "updates"])
    ax.set_ylabel("rows/s")
    ax.set_ylim(0, max(v for values in series.values() for v in values) * 1.4)
    goal = f"; goal 2 conns >= {FLUSH_GOALS[2]}x raw 1 conn" if flush else ""
    ax.set_title(title + goal, fontsize=10)
    ax.legend(fontsize=8, loc="upper right", ncol=2)


def _plot_latency(ax: Any, latency: dict[str, Any] | None) -> None:
    title = "Intake latency, idle vs during a large flush"
    if not latency:
        _empty(ax, title)
        return
    idle, during = latency["idle"], latency["during_flush"]
    labels = ["p50", "p99"]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [idle["p50_ms"] or 0, idle["p99_ms"] or 0], 0.4, label="idle")
    ax.bar(
        [i + 0.2 for i in x],
        [during["p50_ms"] or 0, during["p99_ms"] or 0],
        0.4,
        label=f"during a flush of {latency['flush']['tasks_written']:,} tasks",
        color="tab:red",
    )
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms")
    ratio = latency["p99_ratio"]
    text = f"p99 ratio {ratio:.2f} (goal <= {LATENCY_GOAL})" if ratio is not None else ""
    ax.set_title(f"{title}\n{latency['clients']} clients x {latency['batch']} tasks", fontsize=10)
    ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    if any(v and math.isfinite(v) for v in (idle["p99_ms"], during["p99_ms"])):
        ax.set_ylim(0, max(idle["p99_ms"] or 0, during["p99_ms"] or 0) * 1.35)


def _plot_memory(ax: Any, memory: dict[str, Any] | None) -> None:
    title = "Worker RSS while the buffer fills (nothing flushed)"
    if not memory or not memory.get("points"):
        _empty(ax, title)
        return
    points = memory["points"]
    x = [p["tasks"] for p in points]
    y = [p["rss_bytes"] / 2**20 for p in points]
    ax.plot(x, y, marker="o", color="tab:brown", label="worker VmRSS")
    goal = [y[0] + (t - x[0]) * MEMORY_GOAL / 2**20 for t in x]
    ax.plot(
        x, goal, linestyle="--", color="grey", label=f"goal slope: {MEMORY_GOAL:.0f} bytes/task"
    )
    ax.set_xlabel("tasks buffered")
    ax.set_ylabel("MiB")
    ax.set_title(
        f"{title}\n{memory['bytes_per_task']:,.0f} bytes per buffered task "
        f"({memory['json_bytes_per_task']:.0f} bytes of JSON each)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")


def _plot_client(ax: Any, floor: dict[str, Any] | None, intake: dict[str, Any] | None) -> None:
    title = "Load generator check: parse-only floor vs client processes"
    if not floor:
        _empty(ax, title)
        return
    runs = sorted(floor["client_check"]["runs"], key=lambda r: r["clients"])
    x = [r["clients"] for r in runs]
    ax.plot(
        x, [r["tasks_per_s"] for r in runs], marker="o", color="tab:grey", label="floor tasks/s"
    )
    if intake:
        ax.axhline(
            intake["max_tasks_per_s"],
            color="tab:green",
            linestyle="--",
            label=f"service intake, best ({intake['max_tasks_per_s']:,.0f} tasks/s)",
        )
    ax.set_xlabel(f"client processes ({floor['client_check']['batch']}-task batches)")
    ax.set_ylabel("tasks/s")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(x, [r["client_cpu_cores"] for r in runs], marker="s", color="tab:blue", lw=1)
    twin.plot(x, [r["server_cpu_cores"] for r in runs], marker="^", color="tab:red", lw=1)
    twin.set_ylabel("CPU cores used (client blue, server worker red)")
    twin.set_ylim(0, max(2.0, *(r["client_cpu_cores"] + r["server_cpu_cores"] for r in runs)))
    ax.set_title(
        title + "\n(right axis: CPU cores used by all clients and by the worker)", fontsize=10
    )
    ax.legend(fontsize=8, loc="lower right")
