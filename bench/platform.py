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
import contextlib
import json
import os
import platform as host_platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis

from bench.loadgen import Loadgen, percentile, raise_nofile, start_python
from core.embedded import SeaweedS3, Service, free_port, start_api, start_worker, wait_until

ROOT = Path(__file__).resolve().parent.parent
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


def start_celery(app: str, env: dict[str, str], log_path: Path, name: str, queue: str) -> Service:
    """A Celery worker like core.embedded.start_worker, for another app module."""
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-n", f"{name}@%h"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
    worker = Service(args, env, log_path).start()

    def ready() -> bool:
        worker.ensure_alive(name)
        return log_path.exists() and " ready." in log_path.read_text()

    wait_until(ready, 300, name, log_path)
    return worker


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


def _start_api(env: dict[str, str], log_path: Path) -> tuple[Service, str]:
    """core.embedded.start_api, without leaving the API running when it never gets ready."""
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


@dataclass
class Stack:
    plan: Plan
    pg_admin_url: str
    redis_url: str
    workdir: Path
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    env: dict[str, str] = field(default_factory=dict)
    database: str = ""
    database_url: str = ""
    queue: str = ""
    api: Service | None = None
    api_url: str = ""
    floor: Service | None = None
    floor_url: str = ""
    s3: SeaweedS3 | None = None
    tenant_id: str = ""
    key_id: str = ""
    key: str = ""
    workers: list[Service] = field(default_factory=list)
    stubs: list[Service] = field(default_factory=list)  # the bench.stub_worker ones among the workers
    tiny_build: subprocess.Popen[bytes] | None = None
    tiny_dir: Path | None = None
    gate: str = ""
    noop_queue: str = ""
    floor_list: str = ""
    external_api_pid: int | None = None  # with external: a platform already running (its settings in KLEIN_*)
    external: bool = False
    _db: psycopg.Connection[Any] | None = None
    _db_backend: int | None = None

    @property
    def api_pid(self) -> int | None:
        if self.api is not None and self.api.process is not None:
            return self.api.process.pid
        return self.external_api_pid

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.queue = f"klein-bench-{self.run}"
        self.gate = f"bench:{self.run}:gate"
        self.noop_queue = f"bench-noop-{self.run}"
        self.floor_list = f"bench:{self.run}:floor-queue"

    def start(self) -> Stack:
        if self.external:
            return self._attach()
        self._check_services()
        if self.plan.sync_real_samples and 2 in self.plan.figures:
            self.tiny_dir = self.workdir / "tiny-klein"
            self.tiny_build = subprocess.Popen(
                [sys.executable, "-m", "core.cli", "build-tiny", str(self.tiny_dir)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=open(self.workdir / "build-tiny.log", "wb"),  # noqa: SIM115 - owned by the child
                env=os.environ | {"HF_HUB_OFFLINE": "1"},
            )
        self.create_database()
        self.s3 = SeaweedS3(self.workdir / "s3").start()
        self.env = os.environ | {
            "KLEIN_DATABASE_URL": self.database_url,
            "KLEIN_REDIS_URL": self.redis_url,
            "KLEIN_QUEUE_NAME": self.queue,
            "KLEIN_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "KLEIN_S3_BUCKET": "klein-bench",
            "KLEIN_S3_ACCESS_KEY_ID": self.s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "KLEIN_MODEL_PATH": str(self.tiny_dir or self.workdir / "no-model"),
            "KLEIN_DEVICE": "cpu",
            "KLEIN_TRY_SYNC_TIMEOUT_S": "120",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "BENCH_STUB_GATE": self.gate,
            "BENCH_NOOP_QUEUE": self.noop_queue,
            "BENCH_FLOOR_LIST": self.floor_list,
        }
        for name in ("KLEIN_PUBLIC_BASE_URL", "KLEIN_ADMIN_API_KEY"):
            self.env.pop(name, None)
        self._create_bucket()
        self.env["BENCH_FLOOR_TENANT_ID"] = self.tenant_id
        self.api, self.api_url = _start_api(self.env, self.workdir / "api.log")
        self.floor, self.floor_url = self._start_floor()
        return self

    def create_database(self) -> None:
        """A fresh database with the platform's schema, and the benchmark's tenant and key in it."""
        self.database = f"klein_bench_{self.run}"
        with psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        self.database_url = self.pg_admin_url.rsplit("/", 1)[0] + f"/{self.database}"
        self._migrate()
        self._create_tenant()

    def _attach(self) -> Stack:
        """Use the running platform that KLEIN_* describe (and that answers at api_url): only a tenant is added."""
        from core.settings import Settings

        settings = Settings()
        self.database, self.database_url = "", settings.database_url
        self.redis_url, self.queue = settings.redis_url, settings.queue_name
        with psycopg.connect(self.database_url, connect_timeout=5):
            pass
        self.env = os.environ | {
            "KLEIN_DATABASE_URL": self.database_url,
            "KLEIN_REDIS_URL": self.redis_url,
            "BENCH_NOOP_QUEUE": self.noop_queue,
            "BENCH_FLOOR_LIST": self.floor_list,
            "PYTHONUNBUFFERED": "1",
        }
        self._create_tenant()
        self.env["BENCH_FLOOR_TENANT_ID"] = self.tenant_id
        self.floor, self.floor_url = self._start_floor()
        return self

    def _detach(self) -> None:
        """Remove what the benchmark added to a running platform: its tenant (cascading) and its Redis keys.

        Predictions it submitted that workers have not taken yet are skipped by them (their row is gone).
        """
        with contextlib.suppress(Exception), psycopg.connect(self.database_url, autocommit=True) as conn:
            if self.tenant_id:
                conn.execute("DELETE FROM tenants WHERE id = %s", (self.tenant_id,))
        with contextlib.suppress(Exception):
            r = redis.Redis.from_url(self.redis_url)
            patterns = (f"bench:{self.run}:*", f"{self.noop_queue}*", f"_kombu.binding*.{self.noop_queue}")
            for pattern in (*patterns, f"{self.queue}:{{{self.tenant_id}}}:*"):
                keys = list(r.scan_iter(match=pattern, count=1000))
                if keys:
                    r.delete(*keys)
            r.close()

    def stop(self) -> None:
        if self.external:
            for service in [*self.workers, self.floor]:
                if service is not None:
                    with contextlib.suppress(Exception):
                        service.stop()
            self.workers.clear()
            self._detach()
            return
        for service in [*self.workers, self.api, self.floor]:
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        self.workers.clear()
        if self.tiny_build is not None and self.tiny_build.poll() is None:
            self.tiny_build.kill()
        if self.s3 is not None:
            self.s3.stop()
        if self._db is not None:
            self._db.close()
        if self.database:
            with contextlib.suppress(Exception), psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            r = redis.Redis.from_url(self.redis_url)
            for pattern in (
                f"{self.queue}*",
                f"bench:{self.run}:*",
                f"{self.noop_queue}*",
                f"_kombu.binding*.{self.queue}",
                f"_kombu.binding*.{self.noop_queue}",
            ):
                keys = list(r.scan_iter(match=pattern, count=1000))
                for i in range(0, len(keys), 1000):
                    r.delete(*keys[i : i + 1000])
            r.delete(f"_kombu.binding.{self.noop_queue}")
            r.close()

    def _check_services(self) -> None:
        try:
            with psycopg.connect(self.pg_admin_url, connect_timeout=5):
                pass
        except psycopg.Error as exc:
            raise SystemExit(f"PostgreSQL unreachable at {self.pg_admin_url}: {exc}") from exc
        try:
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=5).ping()
        except redis.RedisError as exc:
            raise SystemExit(f"Redis unreachable at {self.redis_url}: {exc}") from exc

    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        from core.settings import Settings

        config = Config(toml_file=str(ROOT / "pyproject.toml"))
        config.set_main_option("sqlalchemy.url", Settings(database_url=self.database_url).sync_database_url)
        command.upgrade(config, "head")

    def _create_tenant(self) -> None:
        from sqlalchemy import create_engine

        from core import tenants
        from core.settings import Settings

        tenant_id, create = tenants.create_tenant(f"bench-{self.run}", rate_limit_per_minute=HIGH, max_in_flight=HIGH)
        issued, issue = tenants.issue_key(tenant_id, "bench")
        engine = create_engine(Settings(database_url=self.database_url).sync_database_url)
        with engine.begin() as conn:
            conn.execute(create)
            conn.execute(issue)
        engine.dispose()
        self.tenant_id, self.key_id, self.key = tenant_id, issued.key_id, issued.key

    def _create_bucket(self) -> None:
        """The API's readiness probe wants the bucket, which workers create at start: we start the API first."""
        from core.settings import Settings
        from core.storage import ensure_bucket, make_s3_client

        settings = Settings.model_validate(
            {k[len("KLEIN_") :].lower(): v for k, v in self.env.items() if k.startswith("KLEIN_")}
        )
        ensure_bucket(make_s3_client(settings), settings.s3_bucket)

    def _start_floor(self) -> tuple[Service, str]:
        port = free_port()
        args = [sys.executable, "-m", "uvicorn", "bench.floors:create_app", "--factory"]
        args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        floor = Service(args, self.env, self.workdir / "floor.log").start()
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            floor.ensure_alive("floor")
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "floor", self.workdir / "floor.log")
        return floor, url

    def start_api(self, **env: str) -> tuple[Service, str]:
        """Another API process on this stack (figure 4 measures a fresh one)."""
        name = f"api-{secrets.token_hex(3)}.log"
        return _start_api(self.env | env, self.workdir / name)

    # -- workers -----------------------------------------------------------------------------------------------

    def start_real_worker(self) -> Service:
        if self.tiny_build is not None:
            if self.tiny_build.wait(600) != 0:
                raise RuntimeError(f"klein build-tiny failed: {(self.workdir / 'build-tiny.log').read_text()[-2000:]}")
            self.tiny_build = None
        worker = start_worker(self.env, self.workdir / "worker-real.log", f"bench-real-{self.run}")
        self.workers.append(worker)
        return worker

    def ensure_stubs(self, count: int, env: dict[str, str] | None = None) -> list[Service]:
        """At least `count` stub workers running (they are kept between figures: each start imports torch)."""
        while len(self.stubs) < count:
            name = f"bench-stub{len(self.stubs)}-{self.run}"
            log_path = self.workdir / f"{name}.log"
            stub = start_celery("bench.stub_worker", self.env | (env or {}), log_path, name, self.queue)
            self.stubs.append(stub)
            self.workers.append(stub)
        return self.stubs

    def open_gate(self) -> None:
        r = self.redis_client()
        r.set(self.gate, 1)
        r.close()

    def close_gate(self) -> None:
        r = self.redis_client()
        r.delete(self.gate)
        r.close()

    def stop_worker(self, worker: Service) -> None:
        if worker in self.stubs:
            self.open_gate()  # a stub holding a prediction finishes it and stops
            self.stubs.remove(worker)
        worker.stop()
        self.workers.remove(worker)

    def start_noop_worker(self) -> Service:
        name = f"bench-noop-{self.run}"
        worker = start_celery("bench.noop:noop_app", self.env, self.workdir / f"{name}.log", name, self.noop_queue)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in list(self.workers):
            self.stop_worker(worker)

    # -- state ---------------------------------------------------------------------------------------------------

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def queue_lists(self, r: redis.Redis) -> list[bytes]:
        keys = r.scan_iter(match=f"{self.queue}*", count=1000)
        return [k for k in keys if r.type(k) == b"list"]

    def queued(self) -> int:
        r = self.redis_client()
        try:
            return sum(int(r.llen(k)) for k in self.queue_lists(r))
        finally:
            r.close()

    @contextlib.contextmanager
    def no_sweep(self, timeout: float = 120.0) -> Iterator[None]:
        """Hold the sweeper's lock (core/sweeper.py), so no sweep is under way: one that read the rows before
        a reset would otherwise take every id it read for a lost message and enqueue it again."""
        r = self.redis_client()
        lock, token = f"{self.queue}:sweeper-lock", f"bench-{secrets.token_hex(4)}"
        deadline = time.monotonic() + timeout
        while not r.set(lock, token, nx=True, px=int(timeout * 1000)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a sweep held its lock for longer than {timeout} s")
            time.sleep(0.05)
        try:
            yield
        finally:
            if r.get(lock) == token.encode():
                r.delete(lock)
            r.close()

    def reset(self) -> None:
        """Empty the queue: no predictions, no queued messages (lists) or ids (sets), no slots held."""
        with self.no_sweep():
            self._reset()

    def db(self) -> psycopg.Connection[Any]:
        """The benchmark's own connection to its database: one, kept open (PostgreSQL is shared and its
        connection slots can run out), left out of the platform's costs."""
        if self._db is None or self._db.closed:
            self._db = connect_retrying(self.database_url)
            self._db_backend = self._db.info.backend_pid
        return self._db

    def _reset(self) -> None:
        self.db().execute("TRUNCATE predictions CASCADE")
        r = self.redis_client()
        try:
            sets = [k for k in r.scan_iter(match=f"{self.queue}*", count=1000) if r.type(k) == b"set"]
            doomed = self.queue_lists(r) + sets + list(r.scan_iter(match=f"{self.queue}:*in-flight*", count=1000))
            doomed.append(self.floor_list.encode())
            for i in range(0, len(doomed), 500):
                r.delete(*doomed[i : i + 500])
        finally:
            r.close()

    def counters(self) -> dict[str, int]:
        """Sessions opened and transactions run on the benchmark's database (PostgreSQL ≥ 14; its statistics
        lag by up to a second) and commands the Redis server ran (all clients: approximate on a shared server)."""
        time.sleep(1.1)
        row = (
            self.db()
            .execute(
                "SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
            .fetchone()
        )
        r = self.redis_client()
        commands = int(r.info("stats")["total_commands_processed"])
        r.close()
        return {"db_sessions": int(row[0] or 0) if row else 0, "db_transactions": int(row[1] or 0) if row else 0,
                "redis_commands": commands}  # fmt: skip

    def sql(self, query: str, *params: Any) -> Any:
        row = self.db().execute(query, params).fetchone()
        return None if row is None else row[0]

    def fill(self, count: int, tenant_ids: list[str], age_s: float = 3600) -> dict[str, float]:
        """Queue `count` predictions of other tenants as the API would: rows (created `age_s` ago: a backlog that
        has waited), their ids in the sweeper's set of handed-over predictions, the API's own messages."""
        from core.queue import queued_key, task_message
        from core.quota import in_flight_key, queue_priority
        from core.settings import Settings
        from models.klein import KleinInput

        params = json.dumps(KleinInput(prompt="backlog").to_params(1).model_dump(mode="json"))
        request_input = json.dumps(KleinInput(prompt="backlog").model_dump(mode="json"))
        ids = [f"q{self.run}{uuid.uuid4().hex[:16]}" for _ in range(count)]
        owners = [tenant_ids[i % len(tenant_ids)] for i in range(count)]
        created_at = datetime.now(UTC) - timedelta(seconds=age_s)
        settings = Settings(redis_url=self.redis_url, queue_name=self.queue)
        r = self.redis_client()
        started = time.perf_counter()
        # The ids go into the sweeper's "handed to the broker" set first, as the API adds each before it
        # enqueues: backdated rows outside it would be taken for lost messages and enqueued again.
        for i in range(0, count, 10_000):
            r.sadd(queued_key(settings), *ids[i : i + 10_000])
        conn = self.db()
        with conn.cursor().copy(
            "COPY predictions (id, tenant_id, model, input, params, status, created_at) FROM STDIN"
        ) as copy:
            for pid, owner in zip(ids, owners, strict=True):
                copy.write_row((pid, owner, MODEL, request_input, params, "created", created_at))
        conn.execute("ANALYZE predictions")
        rows_s = time.perf_counter() - started

        # Messages exactly as the API pushes them (core.queue.task_message, checked against Celery's own
        # producer by tests/test_queue.py), in the list of the priority a deep backlog gets.
        started = time.perf_counter()
        priority = queue_priority(16)
        pipe = r.pipeline(transaction=False)
        for n, pid in enumerate(ids, 1):
            pipe.lpush(*task_message(self.queue, pid, priority))
            if n % 5000 == 0:
                pipe.execute()
        pipe.execute()
        for owner, held in Counter(owners).items():
            r.incrby(in_flight_key(self.queue, owner), held)
        r.close()
        return {"rows_s": rows_s, "messages_s": time.perf_counter() - started}

    def create_tenants(self, count: int) -> list[str]:
        from sqlalchemy import create_engine

        from core import tenants
        from core.settings import Settings

        engine = create_engine(Settings(database_url=self.database_url).sync_database_url)
        ids = []
        with engine.begin() as conn:
            for _ in range(count):
                tenant_id, create = tenants.create_tenant(f"backlog-{secrets.token_hex(5)}")
                conn.execute(create)
                ids.append(tenant_id)
        engine.dispose()
        return ids

    @property
    def floor_pid(self) -> int | None:
        return self.floor.process.pid if self.floor is not None and self.floor.process is not None else None

    def cpu_seconds(self, server_pid: int | None) -> dict[str, float]:
        """CPU used so far by a server process, by the sessions on the benchmark's database, and by the Redis
        server (all its clients: approximate on a shared server). Sessions that close in between are lost."""
        r = self.redis_client()
        info = r.info("cpu")
        r.close()
        return {
            "server": process_cpu([server_pid]) if server_pid is not None else float("nan"),
            "postgres": process_cpu(self.stack_pids()["postgres"]),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        }

    def stack_pids(self) -> dict[str, list[int]]:
        """Processes whose idle CPU counts as platform cost: the API, workers, and their database sessions."""
        api = [self.api.process.pid] if self.api is not None and self.api.process is not None else []
        workers = [w.process.pid for w in self.workers if w.process is not None]
        backends = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            # Client sessions only ("postgres: user db host(port) state"); autovacuum is PostgreSQL's own.
            ours = cmd.startswith("postgres:") and f" {self.database} " in cmd and "autovacuum" not in cmd
            if ours and proc.pid != self._db_backend:  # not the benchmark's own session
                backends.append(proc.pid)
        return {"api": api, "workers": workers, "postgres": backends}


# ---------------------------------------------------------------------------------------------------------------
# Figures


@dataclass
class Bench:
    plan: Plan
    stack: Stack
    loadgen: Loadgen
    profile_dir: Path | None
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, str]] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"apikey": self.stack.key, "Model": MODEL, "Content-Type": "application/json"}

    def submit_spec(self, url: str, duration: float, body: str = SUBMIT_BODY) -> dict[str, Any]:
        return {
            "url": url,
            "method": "POST",
            "headers": self.headers(),
            "body": body,
            "connections": self.plan.connections,
            "duration_s": duration,
        }

    def status_spec(self, base: str, paths: list[str], duration: float, auth: bool) -> dict[str, Any]:
        headers = {"apikey": self.stack.key} if auth else {}
        return {
            "url": base + paths[0],
            "paths": paths,
            "headers": headers,
            "connections": self.plan.connections,
            "duration_s": duration,
        }

    def load(self, spec: dict[str, Any]) -> dict[str, Any]:
        warm = dict(spec, duration_s=self.plan.warmup_s)
        self.loadgen.run(warm)
        return self.loadgen.run(spec)

    def side_by_side(self, ours: dict[str, Any], floor: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Alternate ours and the floor, `rounds` times each (order swapped every round)."""
        ours_runs: list[dict[str, Any]] = []
        floor_runs: list[dict[str, Any]] = []
        for round_no in range(self.plan.rounds):
            order = [("ours", ours), ("floor", floor)]
            if round_no % 2:
                order.reverse()
            for which, spec in order:
                self.loadgen.run(dict(spec, duration_s=self.plan.warmup_s))
                count = not self.plan.short  # the statistics lag: 2 s a run, not worth it in short mode
                before = self.stack.counters() if count else {}
                server = self.stack.api_pid if which == "ours" else self.stack.floor_pid
                cpu_before = self.stack.cpu_seconds(server)
                result = self.loadgen.run(spec)
                n = max(result["requests"], 1)
                result["cpu_us_per_request"] = {
                    k: (v - cpu_before[k]) / n * 1e6 for k, v in self.stack.cpu_seconds(server).items()
                }
                cpu = result["cpu_us_per_request"]
                sessions_text = (
                    f"; CPU per request: server {cpu['server']:.0f} µs, its PostgreSQL sessions "
                    f"{cpu['postgres']:.0f} µs, Redis {cpu['redis']:.0f} µs"
                )
                if count:
                    after = self.stack.counters()
                    result["db_sessions_opened"] = after["db_sessions"] - before["db_sessions"]
                    result["db_transactions_per_request"] = (after["db_transactions"] - before["db_transactions"]) / n
                    result["redis_commands_per_request"] = (after["redis_commands"] - before["redis_commands"]) / n
                    sessions_text += (
                        f"; ≈{result['db_sessions_opened']} database sessions opened, "
                        f"{result['db_transactions_per_request']:.1f} transactions and "
                        f"{result['redis_commands_per_request']:.1f} Redis commands per request"
                    )
                (ours_runs if which == "ours" else floor_runs).append(result)
                log(
                    f"  {which}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms, non-2xx {result['non_2xx']}, "
                    f"socket errors {result['socket_errors']}{sessions_text}"
                )
        return combine(ours_runs), combine(floor_runs)

    def row(self, figure: str, ours: str, floor: str, ratio: str, goal: str, result: str) -> None:
        self.rows.append(
            {"figure": figure, "ours": ours, "floor": floor, "ratio": ratio, "goal": goal, "result": result}
        )

    @staticmethod
    def verdict(ok: bool, valid: bool = True) -> str:
        if not valid:
            return "invalid"
        return "pass" if ok else "FAIL"

    def profile(self, name: str, spec: dict[str, Any], floor_spec: dict[str, Any]) -> None:
        """py-spy records of the API and of its floor under these loads (after the measurement, so they never
        skew it): what the API spends that the floor does not is what there is to remove."""
        if self.profile_dir is None:
            return
        if self.stack.api_pid is None:
            log("no API process id (pass --api-pid with --api-url): no profile")
            return
        self._profile(name, spec, self.stack.api_pid)
        floor = self.stack.floor
        if floor is not None and floor.process is not None:
            self._profile(f"{name}-floor", floor_spec, floor.process.pid)

    def _profile(self, name: str, spec: dict[str, Any], process_id: int) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            log("py-spy not found (pip install py-spy): no profile")
            return
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        pid = str(process_id)
        seconds = str(int(self.plan.profile_s))
        raw = self.profile_dir / f"{name}.txt"
        load = dict(spec, duration_s=2 * self.plan.profile_s + 5)
        with tempfile.TemporaryDirectory() as tmp:
            generator, _ = start_python(load, Path(tmp)) if self.loadgen.kind == "python" else (None, None)
            wrk = None
            if generator is None:
                from bench.loadgen import wrk_script

                script = Path(tmp) / "wrk.lua"
                script.write_text(wrk_script(load))
                wrk = subprocess.Popen(
                    [
                        "wrk",
                        "-t1",
                        "-c",
                        str(load["connections"]),
                        "-d",
                        f"{int(load['duration_s'])}s",
                        "-s",
                        str(script),
                        load["url"],
                    ],
                    stdout=subprocess.DEVNULL,
                )
            time.sleep(1.0)
            subprocess.run(
                [spy, "record", "--gil", "--pid", pid, "--duration", seconds, "--format", "raw", "-o", str(raw)],
                check=False,
                capture_output=True,
            )
            subprocess.run(
                [spy, "record", "--pid", pid, "--duration", seconds, "-o", str(self.profile_dir / f"{name}.svg")],
                check=False,
                capture_output=True,
            )
            for proc in (generator, wrk):
                if proc is not None:
                    proc.wait(60)
        if raw.exists():
            summary = summarize_profile(raw)
            (self.profile_dir / f"{name}-top.txt").write_text(summary)
            log(f"profile {name}: {raw} (+ .svg, -top.txt)\n{summary}")

    # -- 1 ---------------------------------------------------------------------------------------------------------

    def figure_submit(self) -> None:
        log("1. submit throughput: POST /v1/predictions vs floor (parse, asyncpg INSERT, Redis LPUSH)")
        s = self.stack
        ours_spec = self.submit_spec(f"{s.api_url}/v1/predictions", self.plan.duration_s)
        floor_spec = self.submit_spec(f"{s.floor_url}/floor/predictions", self.plan.duration_s)
        rows_before = s.sql("SELECT count(*) FROM predictions WHERE api_key_id = %s", s.key_id)
        queued_before = s.queued()
        ours, floor = self.side_by_side(ours_spec, floor_spec)
        inserted = s.sql("SELECT count(*) FROM predictions WHERE api_key_id = %s", s.key_id) - rows_before
        enqueued = s.queued() - queued_before
        ours["rows_inserted"], ours["messages_enqueued"] = inserted, enqueued
        log(f"  ours stored {inserted} predictions and queued {enqueued} messages (incl. warm-up)")
        ratio = ours["rps"] / floor["rps"]
        # With a running platform its workers drain the queue: the enqueued count is not ours to check.
        valid = ours["non_2xx"] == 0 and floor["non_2xx"] == 0 and (s.external or inserted == enqueued)
        self.results["1_submit"] = {"ours": ours, "floor": floor, "ratio": ratio}
        self.row(
            "1. Submit throughput (req/s)",
            f"{fmt(ours['rps'], 0)} (p50 {fmt(ours['p50_ms'])} / p99 {fmt(ours['p99_ms'])} ms)",
            f"{fmt(floor['rps'], 0)} (p50 {fmt(floor['p50_ms'])} / p99 {fmt(floor['p99_ms'])} ms)",
            f"{ratio:.2f}",
            "≥ 0.8",
            self.verdict(ratio >= 0.8, valid),
        )
        self.profile("submit", ours_spec, floor_spec)

    # -- 3 ---------------------------------------------------------------------------------------------------------

    def figure_status(self) -> None:
        log("3. status reads: GET /v1/predictions/status/{id} vs floor (raw asyncpg primary-key read)")
        s = self.stack
        ids = [
            r[0]
            for r in s.db().execute(
                "SELECT id FROM predictions WHERE api_key_id = %s LIMIT %s", (s.key_id, self.plan.status_ids)
            )
        ]
        if len(ids) < self.plan.status_ids:
            with httpx.Client(base_url=s.api_url, headers=self.headers(), timeout=30) as http:
                for _ in range(self.plan.status_ids - len(ids)):
                    ids.append(http.post("/v1/predictions", content=SUBMIT_BODY).raise_for_status().json()["id"])
        ours_spec = self.status_spec(
            s.api_url, [f"/v1/predictions/status/{i}" for i in ids], self.plan.duration_s, True
        )
        floor_spec = self.status_spec(s.floor_url, [f"/floor/status/{i}" for i in ids], self.plan.duration_s, False)
        ours, floor = self.side_by_side(ours_spec, floor_spec)
        ratio = ours["rps"] / floor["rps"]
        self.results["3_status"] = {"ours": ours, "floor": floor, "ratio": ratio, "ids": len(ids)}
        self.row(
            "3. Status reads (req/s)",
            f"{fmt(ours['rps'], 0)} (p50 {fmt(ours['p50_ms'])} / p99 {fmt(ours['p99_ms'])} ms)",
            f"{fmt(floor['rps'], 0)} (p50 {fmt(floor['p50_ms'])} / p99 {fmt(floor['p99_ms'])} ms)",
            f"{ratio:.2f}",
            "≥ 0.8",
            self.verdict(ratio >= 0.8, ours["non_2xx"] == 0 and floor["non_2xx"] == 0),
        )
        self.profile("status", ours_spec, floor_spec)

    # -- 5 ---------------------------------------------------------------------------------------------------------

    def idle_cpu(self, seconds: float) -> dict[str, float]:
        """Cores used by the platform's processes (and, separately, the shared Redis server) while nothing is sent."""
        r = self.stack.redis_client()
        pids = self.stack.stack_pids()
        redis_before = r.info("cpu")
        before = {k: process_cpu(v) for k, v in pids.items()}
        time.sleep(seconds)
        after = {k: process_cpu(v) for k, v in self.stack.stack_pids().items() if k in pids}
        redis_after = r.info("cpu")
        r.close()

        def redis_cpu(info: dict[str, Any]) -> float:
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

        out = {f"{k}_cores": (after[k] - before[k]) / seconds for k in pids}
        out["redis_server_cores"] = (redis_cpu(redis_after) - redis_cpu(redis_before)) / seconds
        out["platform_and_db_cores"] = out["api_cores"] + out["workers_cores"] + out["postgres_cores"]
        return out

    def figure_deep_queue(self) -> None:
        plan, s = self.plan, self.stack
        log(f"5. deep queue: submit p99 with {plan.deep:,} queued vs empty; idle CPU as the queue grows")
        spec = self.submit_spec(f"{s.api_url}/v1/predictions", plan.duration_s)
        backlog = s.create_tenants(plan.deep_tenants)
        ladder = [0, plan.deep] if plan.short else [0, plan.deep // 100, plan.deep // 10, plan.deep]
        empty_runs: list[dict[str, Any]] = []
        deep_runs: list[dict[str, Any]] = []
        idle: dict[int, dict[str, float]] = {}
        fills: list[dict[str, float]] = []
        # One worker busy with a render that never ends (gate closed): it drains nothing, but its background
        # threads (lease renewal, the sweeper) run as they do beside a real render. Short mode sweeps every
        # second so its 2-second windows see sweeps; full mode keeps the platform's settings.
        s.reset()
        s.close_gate()
        for extra in s.stubs[1:]:
            s.stop_worker(extra)
        s.ensure_stubs(1, {"KLEIN_SWEEP_INTERVAL_S": "1"} if plan.short else {})
        # A p99 of one 10-second run moves fourfold when the machine stalls once in it; with three rounds or
        # more, one stalled run is not the median (with two, their mean would carry it).
        rounds = plan.rounds if plan.short else max(plan.rounds, 3)
        for round_no in range(rounds):
            s.reset()
            if round_no == 0:
                idle[0] = self.idle_cpu(plan.idle_s)
            empty_runs.append(self.load(spec))
            log(f"  empty queue: p99 {empty_runs[-1]['p99_ms']:.1f} ms, {empty_runs[-1]['rps']:.0f} req/s")
            s.reset()
            depth = 0
            for target in ladder[1:] if round_no == 0 else [plan.deep]:
                fills.append(s.fill(target - depth, backlog) | {"count": target - depth})
                depth = target
                log(f"  queued {depth:,} (rows {fills[-1]['rows_s']:.1f} s, messages {fills[-1]['messages_s']:.1f} s)")
                if round_no == 0:
                    idle[depth] = self.idle_cpu(plan.idle_s)
            queued = s.queued()
            deep_runs.append(self.load(spec))
            log(f"  {queued:,} queued: p99 {deep_runs[-1]['p99_ms']:.1f} ms, {deep_runs[-1]['rps']:.0f} req/s")
        s.reset()
        s.open_gate()  # the held prediction is gone with the reset: the worker finishes it (dropped) and idles
        empty, deep = combine(empty_runs), combine(deep_runs)
        ratio = deep["p99_ms"] / empty["p99_ms"]
        self.results["5_deep_queue"] = {
            "empty": empty,
            "deep": deep,
            "p99_ratio": ratio,
            "depth": plan.deep,
            "backlog_tenants": plan.deep_tenants,
            "idle_cpu_by_depth": {str(k): v for k, v in idle.items()},
            "fills": fills,
        }
        valid = empty["non_2xx"] == 0 and deep["non_2xx"] == 0
        self.row(
            f"5. Submit p99, {plan.deep:,} queued vs empty (ms)",
            f"{fmt(deep['p99_ms'])} ({fmt(deep['rps'], 0)} req/s)",
            f"{fmt(empty['p99_ms'])} ({fmt(empty['rps'], 0)} req/s)",
            f"{ratio:.2f}",
            "≤ 1.2",
            self.verdict(ratio <= 1.2, valid),
        )
        top, bottom = idle[max(idle)], idle[0]
        ladder_text = ", ".join(
            f"{k:,}: {v['platform_and_db_cores'] * 100:.1f}% + Redis {v['redis_server_cores'] * 100:.1f}%"
            for k, v in sorted(idle.items())
        )
        self.row(
            f"5. Idle CPU of API + a busy worker (sweeper) + their DB sessions, {plan.deep:,} queued vs empty "
            "(% of a core)",
            f"{top['platform_and_db_cores'] * 100:.2f}% (by depth: {ladder_text})",
            f"{bottom['platform_and_db_cores'] * 100:.2f}%",
            f"+{(top['platform_and_db_cores'] - bottom['platform_and_db_cores']) * 100:.2f} pt",
            "flat (report)",
            "info",
        )

    # -- 2 ---------------------------------------------------------------------------------------------------------

    def try_sync_alternating(self, samples: int, warmup: int) -> dict[str, Any]:
        """Ours and the Celery no-op in alternating blocks, the no-op first and last, so that the machine's
        drift moves both sides alike; each side's samples pooled."""
        blocks = max(1, min(2 * self.plan.rounds, samples // 10))
        per_noop = max(20, self.plan.noop_samples // (blocks + 1))
        noop = self.noop_latencies(per_noop)
        records: list[dict[str, Any]] = []
        for block in range(blocks):
            records += self.try_sync_records(samples // blocks + (block < samples % blocks), warmup)
            noop += self.noop_latencies(per_noop)
        return self.try_sync_summary(records) | {"noop": summarize(noop), "blocks": blocks}

    def try_sync_records(self, samples: int, warmup: int) -> list[dict[str, Any]]:
        spec = {
            "url": f"{self.stack.api_url}/v1/predictions",
            "method": "POST",
            "headers": self.headers() | {"Try-Sync": "true"},
            "body": SYNC_BODY,
            "connections": 1,
            "requests": samples + warmup,
            "record": True,
        }
        records: list[dict[str, Any]] = self.loadgen.run(spec, timeout=samples * 60 + 120)["records"][warmup:]
        return records

    @staticmethod
    def try_sync_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
        overhead: list[float] = []
        overhead_inf: list[float] = []
        client: list[float] = []
        parts: dict[str, list[float]] = {"api_ms": [], "queue_ms": [], "worker_bookkeeping_ms": []}
        work: dict[str, list[float]] = {"inference_ms": [], "encode_ms": [], "upload_ms": []}
        bad = 0
        for rec in records:
            body = rec.get("body")
            if rec.get("status") != 200 or not isinstance(body, dict) or body.get("status") != "succeeded":
                bad += 1
                continue
            t = body["timings"]
            pipeline = t.get("inference_ms", 0) + t.get("encode_ms", 0) + t.get("upload_ms", 0)
            client.append(rec["latency_ms"])
            overhead.append(rec["latency_ms"] - pipeline)
            overhead_inf.append(rec["latency_ms"] - t.get("inference_ms", 0))
            parts["api_ms"].append(rec["latency_ms"] - t.get("total_ms", 0))
            parts["queue_ms"].append(t.get("queue_ms", 0))
            parts["worker_bookkeeping_ms"].append(t.get("total_ms", 0) - t.get("queue_ms", 0) - pipeline)
            for k in work:
                work[k].append(t.get(k, 0))
        return {
            "samples": len(records),
            "failed": bad,
            "client": summarize(client),
            "overhead": summarize(overhead),
            "overhead_minus_inference_only": summarize(overhead_inf),
            "parts_p50_ms": {k: percentile(v, 50) for k, v in parts.items()},
            "work_p50_ms": {k: percentile(v, 50) for k, v in work.items()},
        }

    def noop_latencies(self, samples: int) -> list[float]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "noop.json"
            args = [sys.executable, "-m", "bench.noop", "--samples", str(samples), "--warmup", "20", "--out", str(out)]
            proc = subprocess.run(args, cwd=ROOT, env=self.stack.env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"noop client failed: {proc.stderr[-2000:]}")
            latencies: list[float] = json.loads(out.read_text())["latencies_ms"]
            return latencies

    def figure_try_sync(self) -> None:
        plan, s = self.plan, self.stack
        log("2. Try-Sync overhead: client latency − (inference + encode + upload) vs a bare Celery no-op round trip")
        log("  each variant in alternating blocks with the no-op, which runs first and last")
        if not s.external:
            s.reset()
            s.open_gate()  # stub workers run freely here
        noop_worker = s.start_noop_worker()
        variants: dict[str, dict[str, Any]] = {}
        if s.external:
            variants["the running platform's workers"] = self.try_sync_alternating(plan.sync_stub_samples, 2)
        elif plan.sync_real_samples:
            for stub in list(s.stubs):
                s.stop_worker(stub)
            worker = s.start_real_worker()
            variants["tiny pipeline 1 MP, real worker"] = self.try_sync_alternating(plan.sync_real_samples, 2)
            s.stop_worker(worker)
        if not s.external:
            s.ensure_stubs(1)
            variants["stub pipeline, real worker task"] = self.try_sync_alternating(plan.sync_stub_samples, 5)
        s.stop_worker(noop_worker)
        self.results["2_try_sync"] = {"variants": variants}
        for name, v in variants.items():
            o, floor = v["overhead"], v["noop"]
            log(
                f"  {name}: overhead p50 {o['p50_ms']:.1f} ms p99 {o['p99_ms']:.1f} ms in {v['blocks']} block(s); "
                f"no-op p50 {floor['p50_ms']:.2f} ms p99 {floor['p99_ms']:.2f} ms (n={floor['n']}); "
                f"parts p50 {v['parts_p50_ms']}; work p50 {v['work_p50_ms']}; failed {v['failed']}"
            )
            ratio = o["p50_ms"] / floor["p50_ms"]
            self.row(
                f"2. Try-Sync overhead, {name} (ms, n={v['samples']})",
                f"p50 {fmt(o['p50_ms'])} / p99 {fmt(o['p99_ms'])}",
                f"p50 {fmt(floor['p50_ms'], 2)} / p99 {fmt(floor['p99_ms'], 2)} (Celery no-op, n={floor['n']})",
                f"{ratio:.1f}",
                "p50 ≤ 2",
                self.verdict(ratio <= 2, v["failed"] == 0),
            )

    # -- 4 ---------------------------------------------------------------------------------------------------------

    def figure_waiters(self) -> None:
        plan = self.plan
        log(f"4. waiting clients: {plan.waiters_small} and {plan.waiters} Try-Sync requests held by a fresh API")
        runs = {n: self.hold_and_drain(n) for n in (plan.waiters_small, plan.waiters)}
        self.results["4_waiters"] = {str(n): v for n, v in runs.items()}
        big, small = runs[plan.waiters], runs[plan.waiters_small]
        refused = {k: v for k, v in big["outcomes"].items() if k != "200 succeeded"}
        self.row(
            f"4. Waiting clients answered correctly (of {plan.waiters:,})",
            f"{big['answered_ok']:,} in {fmt(big['drain_s'])} s after release ({plan.drain_workers} stub workers)"
            + (f"; others: {', '.join(f'{n} × {k}' for k, n in refused.items())}" if refused else ""),
            "—",
            f"{big['answered_ok'] / plan.waiters:.3f}",
            "all",
            self.verdict(big["answered_ok"] == plan.waiters),
        )

        def held(run: dict[str, Any]) -> str:
            n, wanted = run["client_connections_held"], run["waiters"]
            return "" if n >= wanted else f"; only {n:,} held"

        # Per client actually held; with fewer than half held the figure says little.
        enough = big["client_connections_held"] >= plan.waiters / 2
        per_waiter = big["rss_growth_kb_per_held_waiter"]
        self.row(
            "4. API memory per waiting client (KB)",
            f"{fmt(per_waiter)} (RSS {fmt(big['rss_mb']['base'])} → {fmt(big['rss_mb']['held'])} MB held, "
            f"{fmt(big['rss_mb']['after'])} MB after{held(big)})",
            f"{fmt(small['rss_growth_kb_per_held_waiter'])} at {plan.waiters_small:,} waiters{held(small)}",
            "—",
            "< 100",
            self.verdict(per_waiter < 100, enough),
        )
        held_big, held_small = big["redis_connections"]["held"], small["redis_connections"]["held"]
        self.row(
            "4. API Redis connections while holding waiters",
            f"{held_big} at {plan.waiters:,} (idle {big['redis_connections']['base']}, "
            f"peak {big['redis_connections']['peak']}{held(big)})",
            f"{held_small} at {plan.waiters_small:,} (peak {small['redis_connections']['peak']}{held(small)})",
            f"{held_big / max(held_small, 1):.1f}",
            "independent of waiters",
            # Independent: under one more connection per 100 more waiters, and never one per waiter.
            self.verdict(
                held_big - held_small <= 0.01 * (plan.waiters - plan.waiters_small) and held_big < plan.waiters_small,
                enough and small["client_connections_held"] >= plan.waiters_small / 2,
            ),
        )

    def hold_and_drain(self, waiters: int) -> dict[str, Any]:
        s, plan = self.stack, self.plan
        s.reset()
        r = s.redis_client()
        r.set(s.gate, 1)
        # The per-tenant cap on Try-Sync waits (a fairness policy) would answer most of one tenant's W at
        # once: lifted here, as the figure measures what one API process can hold.
        api, url = s.start_api(KLEIN_TRY_SYNC_TIMEOUT_S="600", KLEIN_MAX_SYNC_WAITS_PER_TENANT=str(2 * waiters))
        assert api.process is not None
        pid = api.process.pid
        redis_port = int(s.redis_url.rsplit(":", 1)[1].split("/")[0])
        client: subprocess.Popen[bytes] | None = None
        try:
            workers = s.ensure_stubs(plan.drain_workers)
            with httpx.Client(base_url=url, headers=self.headers() | {"Try-Sync": "true"}, timeout=60) as http:
                for _ in range(5):  # warm: every code path of a Try-Sync once
                    http.post("/v1/predictions", content=SYNC_BODY).raise_for_status()
            r.delete(s.gate)  # from now on workers hold whatever they take
            time.sleep(1.0)
            proc = psutil.Process(pid)

            def redis_conns() -> tuple[int, int]:
                ports = set(tcp_peers(pid, redis_port))
                listed = sum(1 for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports)
                return len(ports), listed

            base_rss = proc.memory_info().rss
            base_redis, base_listed = redis_conns()
            base_pg = len(tcp_peers(pid, 5432))
            spec = {
                "url": f"{url}/v1/predictions",
                "method": "POST",
                "headers": self.headers() | {"Try-Sync": "true"},
                "body": SYNC_BODY,
                "connections": waiters,
                "requests": waiters,
                "record": True,
            }
            tmp = Path(tempfile.mkdtemp(prefix="klein-waiters-"))
            client, out = start_python(spec, tmp)
            peak_redis, peak_rss = base_redis, base_rss
            warm = int(s.sql("SELECT count(*) FROM predictions"))
            started, progress_at, stored, submitted = time.monotonic(), time.monotonic(), 0, 0
            while time.monotonic() - started < 300:
                peak_redis = max(peak_redis, len(tcp_peers(pid, redis_port)))
                peak_rss = max(peak_rss, proc.memory_info().rss)
                now_stored = int(s.sql("SELECT count(*) FROM predictions")) - warm
                submitted = s.sql("SELECT count(*) FROM predictions WHERE status IN ('created', 'processing')")
                if now_stored != stored:
                    stored, progress_at = now_stored, time.monotonic()
                if stored >= waiters or client.poll() is not None:
                    break
                if time.monotonic() - progress_at > 15:  # some requests were refused: measure what is held
                    log(f"  {waiters}: no new prediction stored for 15 s ({stored} of {waiters}); measuring as is")
                    break
                time.sleep(0.1)
            submit_s = time.monotonic() - started
            time.sleep(1.0)
            held_rss = proc.memory_info().rss
            held_redis, held_listed = redis_conns()
            peak_redis = max(peak_redis, held_redis)
            held_pg = len(tcp_peers(pid, 5432))
            client_conns = sum(
                1
                for c in proc.net_connections(kind="tcp")
                if c.status == "ESTABLISHED" and c.laddr.port == int(url.rsplit(":", 1)[1])
            )
            log(
                f"  {waiters}: {submitted} stored in {submit_s:.1f} s; {client_conns} client connections open; "
                f"RSS {base_rss / 2**20:.1f} → {held_rss / 2**20:.1f} MB; Redis connections {base_redis} → "
                f"{held_redis} (CLIENT LIST {held_listed}, peak {peak_redis}); PostgreSQL {base_pg} → {held_pg}"
            )
            released = time.time()
            r.set(s.gate, 1)
            client.wait(900)
            after_rss = proc.memory_info().rss
            after_redis, _ = redis_conns()
            result = json.loads(out.read_text()) if out.exists() else {"records": []}
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if client is not None and client.poll() is None:
                client.kill()
            r.set(s.gate, 1)
            r.close()
            api.stop()
        records = result.get("records", [])
        ok = [
            rec
            for rec in records
            if rec.get("status") == 200
            and isinstance(rec.get("body"), dict)
            and rec["body"].get("status") == "succeeded"
            and rec["body"].get("generation_url")
        ]
        ids = {rec["body"]["id"] for rec in ok}
        ends = [rec["end"] for rec in records if "end" in rec]
        drain_s = max(ends) - released if ends else float("nan")
        outcome = Counter(_outcome(rec) for rec in records)
        log(f"  {waiters}: answered {dict(outcome)}; drained in {drain_s:.1f} s by {len(workers)} stub workers")
        return {
            "waiters": waiters,
            "stored": submitted,
            "submit_s": submit_s,
            "client_connections_held": client_conns,
            "answered_ok": len(ids),
            "outcomes": dict(outcome),
            "drain_s": drain_s,
            "drain_per_s": len(ids) / drain_s if drain_s and drain_s == drain_s else float("nan"),
            "rss_mb": {
                "base": base_rss / 2**20,
                "held": held_rss / 2**20,
                "peak": peak_rss / 2**20,
                "after": after_rss / 2**20,
            },
            "rss_growth_kb_per_held_waiter": (held_rss - base_rss) / 1024 / max(client_conns, 1),
            "redis_connections": {
                "base": base_redis,
                "held": held_redis,
                "held_client_list": held_listed,
                "peak": peak_redis,
                "after": after_redis,
                "base_client_list": base_listed,
            },
            "postgres_connections": {"base": base_pg, "held": held_pg},
        }


def _outcome(rec: dict[str, Any]) -> str:
    body = rec.get("body")
    return f"{rec.get('status')} {body.get('status') if isinstance(body, dict) else rec.get('error')}"


# ---------------------------------------------------------------------------------------------------------------
# Profiles


COMPONENTS = (
    ("api/", "api/ (ours)"),
    ("core/", "core/ (ours)"),
    ("models/", "models/ (ours)"),
    ("bench/", "bench/"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("redis/", "redis-py"),
    ("celery/", "Celery"),
    ("kombu/", "kombu"),
    ("fastapi/", "FastAPI"),
    ("starlette/", "Starlette"),
    ("pydantic", "pydantic"),
    ("uvicorn/", "uvicorn"),
    ("json/", "json (stdlib)"),
    ("asyncio/", "asyncio"),
    ("concurrent/", "thread pool"),
    ("threading.py", "threading"),
)


# Frames that only carry the process (entry point, server loop, thread bootstrap): left out of inclusive lists.
WRAPPERS = (
    "<frozen runpy>",
    "click/",
    "uvicorn/main.py",
    "uvicorn/__main__.py",
    "uvicorn/_compat.py",
    "uvicorn/server.py",
    "asyncio/runners.py",
    "threading.py",
    "concurrent/futures/thread.py",
    "anyio/",
)


def _component(frame: str) -> str:
    where = frame.partition(" (")[2]
    for marker, name in COMPONENTS:
        if where.startswith(marker) or f"/{marker}" in where:
            return name
    if where.startswith("asyncio/runners.py"):
        return "event loop (uvloop, httptools: native)"
    return where.split("/", 1)[0].split(".py", 1)[0] or "?"


def summarize_profile(raw: Path, top: int = 25) -> str:
    """py-spy's collapsed stacks (`--gil`: the thread running Python) → where the API's CPU goes.

    Self time by component (the package of the innermost frame; 'event loop' is uvloop and httptools
    working below Python), our own functions by inclusive time, and the library functions by inclusive
    time leaving out the frames every sample shares.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    components: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        components[_component(frames[-1])] += count
        threads["worker threads (asyncio.to_thread)" if "threading.py" in stack else "event loop thread"] += count
    if not total:
        return "no samples\n"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    ours = [(f, n) for f, n in inclusive.most_common() if _component(f).endswith("(ours)")][:top]
    libraries = [
        (f, n)
        for f, n in inclusive.most_common()
        if not _component(f).endswith("(ours)") and not any(w in f for w in WRAPPERS)
    ]
    lines = [f"{total} samples of the API process holding the GIL (py-spy --gil)", ""]
    lines += ["by thread:"] + [f"  {pct(n)}  {name}" for name, n in threads.most_common()]
    lines += ["", "self time by component:"] + [f"  {pct(n)}  {name}" for name, n in components.most_common(15)]
    lines += ["", "our functions, inclusive:"] + [f"  {pct(n)}  {f}" for f, n in ours]
    lines += ["", "library functions, inclusive:"] + [f"  {pct(n)}  {f}" for f, n in libraries[:top]]
    lines += ["", "self time by function:"] + [f"  {pct(n)}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def _frame(frame: str) -> str:
    """'fn (path/to/site-packages/pkg/mod.py:123)' → 'fn (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


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
    p.add_argument(
        "--pg-admin-url",
        default=os.environ.get("KLEIN_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    p.add_argument("--redis-url", default=os.environ.get("KLEIN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument(
        "--api-url", help="measure a running platform (figures 1-3; its KLEIN_* settings in the environment)"
    )
    p.add_argument("--api-pid", type=int, help="with --api-url: the API's process id, for --profile")
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
    if args.api_url:
        stack.external, stack.api_url, stack.external_api_pid = True, args.api_url.rstrip("/"), args.api_pid
        skipped = sorted(plan.figures - {1, 2, 3})
        plan.figures &= {1, 2, 3}
        if skipped:
            log(
                f"figures {skipped} need a stack of the benchmark's own (they stop workers and fill the queue): skipped"
            )
        log("the predictions it submits are real: the platform's workers will render those they reach first")
    bench = Bench(plan, stack, loadgen, args.profile)
    timings: dict[str, float] = {}
    failures: list[str] = []
    try:
        stack.start()
        log(
            f"{'attached to the running' if stack.external else 'stack up:'} API {stack.api_url}, floor "
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
