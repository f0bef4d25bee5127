"""What the benchmarks share: where PostgreSQL and Redis are, settings and tenants of a benchmark stack, the
platform benchmark's plan, figures' arithmetic, processes and their CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import psutil
import psycopg

from bench.loadgen import percentile
from ops.embedded import Service, start_api

if TYPE_CHECKING:
    from core.settings import Settings
    from core.tenants import IssuedKey

ROOT = Path(__file__).resolve().parent.parent
# The machine's PostgreSQL (each benchmark makes a fresh database on it) and Redis (each a queue of its own).
PG_ADMIN_URL = os.environ.get("KLEIN_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("KLEIN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
MODEL = "flux-klein-4b"
SUBMIT_BODY = json.dumps({"input": {"prompt": "A serene mountain landscape at dawn", "aspect_ratio": "16:9"}})
SYNC_BODY = json.dumps({"input": {"prompt": "a red fox in snow", "output_format": "jpg"}})
HIGH = 1_000_000_000  # rate limit and in-flight cap of the benchmark tenant: never the bottleneck


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Plan:
    short: bool
    figures: set[int]
    connections: int
    duration_s: float
    warmup_s: float
    rounds: int
    status_ids: int
    sync_real_samples: int  # Try-Sync through the real worker and the tiny pipeline at 1 MP (≈ 3 s each on 2 cores)
    sync_stub_samples: int  # Try-Sync through bench.stub_worker
    noop_samples: int
    waiters: int
    waiters_small: int
    drain_workers: int
    deep: int
    deep_tenants: int
    idle_s: float
    profile_s: float

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.short:
            plan = cls(True, set(), 16, 2.0, 0.5, 1, 200, 0, 20, 50, 100, 20, 1, 1000, 10, 2.0, 3.0)
        else:
            plan = cls(False, set(), 32, 10.0, 3.0, 2, 1000, 30, 300, 500, 2000, 200, 2, 100_000, 100, 20.0, 10.0)
        plan.figures = {int(f) for f in args.figures.split(",")} if args.figures else {1, 2, 3, 4, 5}
        for name in ("connections", "duration_s", "rounds", "waiters", "deep", "sync_real_samples"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(plan, name, value)
        plan.waiters_small = max(1, plan.waiters // 10)
        return plan


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values, default=float("nan")),
        "mean_ms": statistics.fmean(values) if values else float("nan"),
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one load: the median of each figure (for two rounds, their mean), counts summed."""
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "rounds": runs,
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def settings_of(env: dict[str, str]) -> Settings:
    """The platform's settings as a process started with `env` reads them (its KLEIN_* variables)."""
    from core.settings import Settings

    with mock.patch.dict(os.environ, env, clear=True):  # parsed by pydantic-settings, JSON values included
        return Settings()


def create_database(name: str, admin_url: str = PG_ADMIN_URL) -> str:
    """A fresh database `name` beside the admin URL's, with the platform's schema (ops.migrate); its URL."""
    from core.settings import Settings
    from ops.migrate import migrate

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    migrate(Settings(database_url=url).sync_database_url)
    return url


def drop_database(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_tenant_key(database_url: str, name: str, **limits: Any) -> IssuedKey:
    """A new tenant (limits as in core.tenants.create_tenant) and an API key of it."""
    from core import tenants
    from core.db import make_sync_engine
    from core.settings import Settings

    tenant_id, create = tenants.create_tenant(name, **limits)
    issued, issue = tenants.issue_key(tenant_id, "bench")
    engine = make_sync_engine(Settings(database_url=database_url))
    with engine.begin() as conn:
        conn.execute(create)
        conn.execute(issue)
    engine.dispose()
    return issued


def connect_retrying(url: str, timeout: float = 120.0) -> psycopg.Connection[Any]:
    """An autocommit connection, waiting while the shared server has no connection slot free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            log("PostgreSQL has no free connection slot (shared server); waiting")
            time.sleep(1.0)


def start_api_logged(env: dict[str, str], log_path: Path) -> tuple[Service, str]:
    """ops.embedded.start_api, without leaving the API running when it never gets ready."""
    before = {p.pid for p in psutil.Process().children()}
    try:
        return start_api(env, log_path)
    except BaseException:
        for child in psutil.Process().children():
            if child.pid not in before and "api.app:create_app" in " ".join(child.cmdline()):
                child.kill()
        raise


def process_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def tcp_peers(pid: int, remote_port: int) -> list[int]:
    """Local ports of the process's established TCP connections to 127.0.0.1:remote_port."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [c.laddr.port for c in conns if c.raddr and c.raddr.port == remote_port and c.status == "ESTABLISHED"]


def busy_processes(seconds: float = 1.0, exclude: set[int] | None = None) -> list[str]:
    """What else uses the CPU right now (name and % of one core), for the report's load conditions."""
    exclude = exclude or set()
    procs = [p for p in psutil.process_iter(["name"]) if p.pid not in exclude]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(seconds)
    usage = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pct = p.cpu_percent(None)
            if pct >= 5:
                usage.append((pct, p.info["name"]))
    return [f"{name} {pct:.0f}%" for pct, name in sorted(usage, reverse=True)[:8]]


# ---------------------------------------------------------------------------------------------------------------
# The stack
