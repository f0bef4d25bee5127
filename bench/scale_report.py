"""`bench.scale`'s arithmetic and tables: each phase's cost per unit (idle costs taken off pro rata), one
prediction's, and the ceiling they put on one PostgreSQL primary and one Redis."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from bench.common import fmt
from bench.scale_probes import Window

# Figures of a window, as (key, the Reading's or Window's attribute).
FIGURES = (
    ("pg_statements", "statements"),
    ("pg_commits", "commits"),
    ("pg_rows_written", "rows"),
    ("wal_bytes", "wal_bytes"),
    ("redis_cmds", "redis_cmds"),
    ("s3_requests", "s3_requests"),
    ("s3_puts", "s3_puts"),
    ("s3_gets", "s3_gets"),
    ("s3_bytes", "s3_bytes"),
    ("pg_exec_ms", "pg_exec_ms"),
    ("redis_usec", "redis_usec"),
)
COLUMNS = (
    ("PG statements", "pg_statements", 2),
    ("commits", "pg_commits", 2),
    ("rows written", "pg_rows_written", 2),
    ("WAL bytes", "wal_bytes", 0),
    ("PG exec ms", "pg_exec_ms", 3),
    ("Redis cmds", "redis_cmds", 1),
    ("Redis µs", "redis_usec", 0),
    ("S3 requests", "s3_requests", 2),
    ("S3 bytes", "s3_bytes", 0),
)
# One prediction as docs/scaling.md sizes it: a submit, its worker's run, its webhook, two polls, one download. Its
# progress: 2 reports, the first and the last step's (KLEIN_PROGRESS_INTERVAL_S, 0.25 s, drops the steps between when
# 4 steps take a GPU about 0.25 s).
MIX: tuple[tuple[str, int], ...] = (
    ("submit", 1),
    ("claim", 1),
    ("progress, per step", 2),
    ("finish", 1),
    ("webhook", 1),
    ("status, queued", 1),
    ("status, done", 1),
    ("download", 1),
)


def totals(window: Window) -> dict[str, float]:
    out = {}
    for key, attr in FIGURES:
        value = getattr(window, attr) if hasattr(window, attr) else getattr(window.delta, attr)
        out[key] = value
    out["seconds"] = window.delta.at
    return out


@dataclass
class Phase:
    name: str
    per: int  # units the windows hold: predictions, steps or reads
    windows: list[Window] = field(default_factory=list)

    def sums(self) -> dict[str, float]:
        summed: dict[str, float] = {}
        for window in self.windows:
            for key, value in totals(window).items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    def commands(self) -> dict[str, tuple[float, float]]:
        summed: dict[str, tuple[float, float]] = {}
        for window in self.windows:
            for name, (calls, usec) in window.delta.commands.items():
                before = summed.get(name, (0.0, 0.0))
                summed[name] = (before[0] + calls, before[1] + usec)
        return summed

    def queries(self) -> dict[str, tuple[float, float, float]]:
        summed: dict[str, tuple[float, float, float]] = {}
        for window in self.windows:
            for query, values in window.delta.queries.items():
                before = summed.get(query, (0.0, 0.0, 0.0))
                summed[query] = (before[0] + values[0], before[1] + values[1], before[2] + values[2])
        return summed

    def per_unit(self, idle: Phase) -> dict[str, float]:
        """Each figure per unit. Redis's idle commands (the workers' heartbeats, the broker's housekeeping) at
        their idle rate over the windows' time are taken off, each command at most down to 0; not BRPOP, whose
        idle polls stop while a worker works. PostgreSQL, S3 and the WAL have no idle traffic here."""
        summed = self.sums()
        seconds = summed.get("seconds", 0.0)
        idle_s = idle.sums()["seconds"]
        idle_commands = idle.commands()
        calls = usec = 0.0
        for name, (n, us) in self.commands().items():
            rate_n, rate_us = (0.0, 0.0) if name == "brpop" else idle_commands.get(name, (0.0, 0.0))
            share = min(rate_n / idle_s * seconds, n)
            calls += n - share
            usec += us - (share * rate_us / rate_n if rate_n else 0.0)
        summed["redis_cmds"], summed["redis_usec"] = calls, usec
        return {key: summed.get(key, 0.0) / self.per for key, _ in (*FIGURES, ("seconds", ""))}

    def top_queries(self, count: int = 6) -> list[dict[str, Any]]:
        ranked = sorted(self.queries().items(), key=lambda item: -item[1][0])[:count]
        return [
            {"query": q[:300], "calls": c / self.per, "rows": r / self.per, "ms": ms / self.per}
            for q, (c, r, ms) in ranked
        ]

    def top_commands(self) -> dict[str, float]:
        return {name: calls / self.per for name, (calls, _) in sorted(self.commands().items(), key=lambda i: -i[1][0])}


def report(phases: dict[str, Phase], saturation: dict[str, Any], args: argparse.Namespace, redis_version: str) -> dict:
    idle = phases["background"]
    background = idle.sums()
    idle_per_s = {k: v / background["seconds"] for k, v in background.items() if k != "seconds"}
    rows = {name: phase.per_unit(idle) for name, phase in phases.items() if name != "background"}
    one = {key: sum(rows[name][key] * times for name, times in MIX) for key, _ in FIGURES}
    cores = os.cpu_count() or 1

    print(f"\nPer prediction, what the shared parts pay ({args.predictions} predictions; PostgreSQL 18 with")
    print(f"pg_stat_statements and pg_walinspect, Redis {redis_version}, SeaweedFS behind a counting proxy; idle")
    print("costs taken off; per unit of the first column):\n")
    print("| phase | per | " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    print("| --- | --- |" + " --- |" * len(COLUMNS))
    for name, values in rows.items():
        unit = (
            "step" if "step" in name else ("read" if name in ("list", "download") or "status" in name else "prediction")
        )
        print(f"| {name} | {unit} | " + " | ".join(fmt(values[key], d) for _, key, d in COLUMNS) + " |")
    mix = ", ".join(f"{times} × {name}" if times > 1 else name for name, times in MIX)
    print(f"| **one prediction** | {mix} | " + " | ".join(f"**{fmt(one[key], d)}**" for _, key, d in COLUMNS) + " |")
    print(
        "| idle, per second | the API and two workers | "
        + " | ".join(fmt(idle_per_s.get(key, 0.0), d) for _, key, d in COLUMNS)
        + " |"
    )

    sat = totals(saturation["window"])
    ok = saturation["ok"]
    result = saturation["result"]
    submit_rate = ok / result["duration_s"]
    print(
        f"\nSubmit path, one API process, {args.connections} connections for {result['duration_s']:.1f} s "
        f"({saturation['loadgen']}):"
    )
    print(
        f"  {submit_rate:,.0f} submits/s (p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"{result['non_2xx']} not 2xx); per submit under load: {sat['pg_statements'] / ok:.2f} PG statements, "
        f"{sat['pg_commits'] / ok:.2f} commits, {sat['redis_cmds'] / ok:.1f} Redis commands"
    )
    reads, commits = saturation["pg_reads_per_s"], saturation["pg_commits_per_s"]
    rates = saturation["redis_rates"]
    redis_rate = len(rates) / sum(1 / r for r in rates.values())  # harmonic mean: a mix of equal counts
    print(
        f"pgbench, {args.connections} clients: {reads:,.0f} primary-key reads/s, {commits:,.0f} single-row INSERT "
        f"commits/s; redis-benchmark, {args.connections} clients: {redis_rate:,.0f} commands/s "
        f"({', '.join(f'{k} {v:,.0f}' for k, v in rates.items())})"
    )

    bounds = {
        "PostgreSQL, statements": (
            reads / one["pg_statements"],
            f"{reads:,.0f} reads/s / {one['pg_statements']:.1f} statements",
        ),
        "PostgreSQL, commits": (
            commits / one["pg_commits"],
            f"{commits:,.0f} commits/s / {one['pg_commits']:.1f} commits",
        ),
        "Redis": (redis_rate / one["redis_cmds"], f"{redis_rate:,.0f} commands/s / {one['redis_cmds']:.1f} commands"),
    }
    pg_limit = min(bounds["PostgreSQL, statements"][0], bounds["PostgreSQL, commits"][0])
    redis_limit = bounds["Redis"][0]
    first = min(bounds, key=lambda name: bounds[name][0])
    limit = bounds[first][0]
    print(
        f"\nThe ceiling: one prediction's costs against each part's measured rate (this machine, {cores} cores "
        "shared by the load and the server):\n"
    )
    print(f"| shared part | predictions/s | from | GPUs at {args.gpu_rate:g} images/s each |")
    print("| --- | --- | --- | --- |")
    for name, (value, how) in bounds.items():
        print(f"| {name} | {value:,.0f} | {how} per prediction | {value / args.gpu_rate:,.0f} |")
    print(
        f"\nFirst to give out: {first}, at about {limit:,.0f} predictions/s "
        f"({limit / args.gpu_rate:,.0f} GPUs at {args.gpu_rate:g} images/s each)."
    )
    return {
        "phases": rows,
        "one_prediction": one,
        "idle_per_s": idle_per_s,
        "idle_commands_per_s": {k: v[0] / background["seconds"] for k, v in idle.commands().items()},
        "statements": {name: phase.top_queries() for name, phase in phases.items()},
        "commands": {name: phase.top_commands() for name, phase in phases.items()},
        "saturation": {
            "submits_per_s": submit_rate,
            "per_submit": {k: v / ok for k, v in sat.items() if k != "seconds"},
            "non_2xx": result["non_2xx"],
            "pg_reads_per_s": reads,
            "pg_commits_per_s": commits,
            "redis_commands_per_s": redis_rate,
        },
        "ceiling": {
            "postgres": pg_limit,
            "redis": redis_limit,
            "first": first,
            "predictions_per_s": limit,
            "gpus": limit / args.gpu_rate,
            "gpu_rate": args.gpu_rate,
        },
    }
