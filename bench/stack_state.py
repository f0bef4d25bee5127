"""The benchmark stack's Redis and database state: queue depth, counters, bulk fills, process CPU."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from bench.common import (
    MODEL,
    Plan,
    connect_retrying,
    process_cpu,
)
from ops.embedded import SeaweedS3, Service


@dataclass
class StackFields:
    """What a running benchmark stack is made of."""

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
    _db: psycopg.Connection[Any] | None = None
    _db_backend: int | None = None

    @property
    def api_pid(self) -> int | None:
        return self.api.process.pid if self.api is not None and self.api.process is not None else None


class StackState(StackFields):
    """Reading and preparing the stack's Redis and PostgreSQL between measured runs."""

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
        # producer by tests/integration/test_queue.py), in the list of the priority a deep backlog gets.
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
