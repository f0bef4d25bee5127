"""Platform benchmark: `python -m bench.platform [--short] [--json PATH] [--profile DIR]`.

Starts the stack (a fresh database on the machine's PostgreSQL, Redis db 14 with a unique queue, SeaweedFS,
the API, workers when a figure needs them) and floor services of its own, drives both over loopback from
separate load-generator processes (wrk when installed, else bench.loadgen) and prints one markdown table.
Every figure is measured side by side with its floor in the same run, alternating between them, so the
ratio holds on a noisy machine:

1. Submit throughput: POST /v1/predictions (auth, rate limit, validation, insert, enqueue) vs a floor that
   parses the JSON, inserts one row with raw asyncpg and pushes one Redis message. No worker drains.
2. Try-Sync overhead: client latency minus the worker's own pipeline time (inference + encode + upload,
   from the prediction's timings) vs a bare Celery no-op round trip on the same broker, in alternating blocks.
3. Status reads: GET /v1/predictions/status/{id} vs the same primary-key read with raw asyncpg.
4. Waiting clients: W concurrent Try-Sync requests held by one fresh API process while workers are held
   back, then drained: every answer checked; the API's RSS and its Redis connections, at W and at W/10.
5. Deep queue: submit p99 with N predictions queued vs an empty queue, and the idle CPU of the platform's
   processes as the queue grows (the cost of any sweeper or dispatcher).

`--short` runs every figure for a few seconds (CI: it asserts nothing about speed). Full mode takes
about ten minutes on 2 cores. Nothing here changes the platform's code: it runs the real API and worker;
only figure 4 (and 2 in short mode) drains with bench.stub_worker, the real worker task with the
pipeline call replaced by a 64×64 image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import PG_ADMIN_URL, REDIS_URL, ROOT, Plan, busy_processes, log
from bench.figures import ThroughputFigures
from bench.figures_sync import WaitingFigures
from bench.loadgen import Loadgen, raise_nofile
from bench.stack import Stack


@dataclass
class Bench(ThroughputFigures, WaitingFigures):
    """Every figure of the platform benchmark."""


# ---------------------------------------------------------------------------------------------------------------
# Main


def render(rows: list[dict[str, str]]) -> str:
    head = "| figure | ours | floor | ratio | goal | result |\n| --- | --- | --- | --- | --- | --- |\n"
    return head + "".join(
        f"| {r['figure']} | {r['ours']} | {r['floor']} | {r['ratio']} | {r['goal']} | {r['result']} |\n" for r in rows
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": host_platform.python_version(),
        "system": f"{host_platform.system()} {host_platform.release()}",
        "loadavg_start": os.getloadavg(),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The commit measured, and whether the working tree differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    changed = len([line for line in dirty.stdout.splitlines() if line.strip()])
    return f"{head.stdout.strip() or 'unknown'}" + (f" + {changed} changed files" if changed else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.platform", description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="a few seconds per figure (CI); asserts nothing")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the API under submit and status load")
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="HTTP load generator for figures 1, 3, 5 (auto: wrk when installed)",
    )
    p.add_argument("--figures", help="comma-separated subset of 1,2,3,4,5")
    p.add_argument("--connections", type=int, help="concurrent connections for the throughput figures")
    p.add_argument("--duration", dest="duration_s", type=float, help="seconds per measured run")
    p.add_argument("--rounds", type=int, help="alternating rounds of ours and the floor")
    p.add_argument("--waiters", type=int, help="Try-Sync clients held at once in figure 4")
    p.add_argument("--deep", type=int, help="predictions queued in figure 5")
    p.add_argument(
        "--sync-real-samples",
        dest="sync_real_samples",
        type=int,
        help="Try-Sync samples through the real tiny pipeline at 1 MP (0 skips)",
    )
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="default: $KLEIN_BENCH_PG_ADMIN_URL or local")
    p.add_argument("--redis-url", default=REDIS_URL, help="default: $KLEIN_BENCH_REDIS_URL or local db 14")
    p.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the services' logs here")
    return p.parse_args(argv)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # Background shells start us with SIGINT ignored, and SIGTERM would skip the clean-up: both raise here.
    signal.signal(signal.SIGINT, _exit_on_signal)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    args = parse_args(argv)
    plan = Plan.make(args)
    loadgen = Loadgen.choose(args.loadgen)
    if args.loadgen == "auto" and not plan.short and loadgen.kind != "wrk":
        log(
            "WARNING: wrk is not installed (apt-get install wrk): measuring with the Python generator, "
            "whose numbers are not comparable with wrk's (--loadgen wrk makes this an error)"
        )
    raise_nofile(max(4096, plan.waiters * 2 + 1024))  # the API (a child) inherits it: W sockets and more
    host = machine()
    host["busy_at_start"] = busy_processes(1.0, {os.getpid()})
    log(f"mode {'short' if plan.short else 'full'}; generator: {loadgen.describe()}; machine {host}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="klein-bench-"))
    stack = Stack(plan, args.pg_admin_url, args.redis_url, workdir)
    bench = Bench(plan, stack, loadgen, args.profile)
    timings: dict[str, float] = {}
    failures: list[str] = []
    try:
        stack.start()
        log(
            f"stack up: API {stack.api_url}, floor "
            f"{stack.floor_url}, database {stack.database_url.rsplit('/', 1)[-1]}, queue {stack.queue} on "
            f"{stack.redis_url}, logs {workdir}"
        )
        steps: list[tuple[int, Callable[[], None]]] = [
            (1, bench.figure_submit),
            (3, bench.figure_status),
            (5, bench.figure_deep_queue),
            (2, bench.figure_try_sync),
            (4, bench.figure_waiters),
        ]
        for number, step in steps:
            if number not in plan.figures:
                continue
            t0 = time.monotonic()
            try:
                step()
            except Exception as exc:  # report and go on: one broken figure must not hide the others
                failures.append(f"figure {number}: {type(exc).__name__}: {exc}")
                log(f"figure {number} failed: {exc!r}")
                bench.row(f"{number}. (failed)", f"error: {type(exc).__name__}", "—", "—", "—", "error")
                stack.stop_workers()
            timings[str(number)] = time.monotonic() - t0
    finally:
        if args.keep_logs:
            shutil.copytree(workdir, args.keep_logs, dirs_exist_ok=True, ignore=shutil.ignore_patterns("s3", "tiny-*"))
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    host["loadavg_end"] = os.getloadavg()
    order = {str(n): i for i, n in enumerate((1, 2, 3, 4, 5))}
    bench.rows.sort(key=lambda r: order.get(r["figure"].split(".")[0], 9))
    table = render(bench.rows)
    print(
        f"\nklein-serve platform benchmark ({'short' if plan.short else 'full'} mode, "
        f"{time.monotonic() - started:.0f} s)\n"
    )
    print(
        f"- generator: {loadgen.describe()}; {plan.connections} connections, {plan.duration_s:g} s per run, "
        f"{plan.rounds} alternating round(s)"
    )
    print(
        f"- machine: {host['cpus']} CPUs, {host['memory_gib']} GiB, load average {host['loadavg_start'][0]:.2f} "
        f"at start, {host['loadavg_end'][0]:.2f} at end; busy at start: {', '.join(host['busy_at_start']) or 'nothing'}"
    )
    print(f"- code: {host['code']}")
    print()
    print(table)
    for failure in failures:
        print(f"ERROR {failure}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mode": "short" if plan.short else "full",
                    "generator": loadgen.describe(),
                    "plan": plan.__dict__ | {"figures": sorted(plan.figures)},
                    "machine": host,
                    "seconds_per_figure": timings,
                    "rows": bench.rows,
                    "results": bench.results,
                    "failures": failures,
                },
                indent=2,
                default=str,
            )
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
