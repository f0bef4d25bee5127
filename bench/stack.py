"""The platform benchmark's stack: a fresh database, Redis, SeaweedFS, the API, workers and the floor services."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass

import httpx
import psycopg
import redis

from bench.common import (
    HIGH,
    ROOT,
    create_database,
    create_tenant_key,
    drop_database,
    settings_of,
    start_api_logged,
)
from bench.stack_state import StackState
from ops.embedded import SeaweedS3, Service, free_port, start_worker, wait_until


@dataclass
class Stack(StackState):
    """Starts and stops the services; the state it reads is StackState's."""

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.queue = f"klein-bench-{self.run}"
        self.gate = f"bench:{self.run}:gate"
        self.noop_queue = f"bench-noop-{self.run}"
        self.floor_list = f"bench:{self.run}:floor-queue"

    def start(self) -> Stack:
        self._check_services()
        if self.plan.sync_real_samples and 2 in self.plan.figures:
            self.tiny_dir = self.workdir / "tiny-klein"
            self.tiny_build = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "build-tiny", str(self.tiny_dir)],
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
            "KLEIN_WORKER_METRICS_PORT": "0",  # benchmark workers: no metrics port to collide on
            "KLEIN_WEBHOOK_METRICS_PORT": "0",
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
        self.api, self.api_url = start_api_logged(self.env, self.workdir / "api.log")
        self.floor, self.floor_url = self._start_floor()
        return self

    def create_database(self) -> None:
        """A fresh database with the platform's schema, and the benchmark's tenant and key in it."""
        self.database = f"klein_bench_{self.run}"
        self.database_url = create_database(self.database, self.pg_admin_url)
        self._create_tenant()

    def stop(self) -> None:
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
            with contextlib.suppress(Exception):
                drop_database(self.database, self.pg_admin_url)
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

    def _create_tenant(self) -> None:
        issued = create_tenant_key(
            self.database_url, f"bench-{self.run}", rate_limit_per_minute=HIGH, max_in_flight=HIGH
        )
        self.tenant_id, self.key_id, self.key = issued.tenant_id, issued.key_id, issued.key

    def _create_bucket(self) -> None:
        """The API's readiness probe wants the bucket, which workers create at start: we start the API first."""
        from core.storage import ensure_bucket, make_s3_client

        settings = settings_of(self.env)
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
        return start_api_logged(self.env | env, self.workdir / name)

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
            stub = start_worker(self.env | (env or {}), log_path, name, app="bench.stub_worker", queue=self.queue)
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
        log_path = self.workdir / f"{name}.log"
        worker = start_worker(self.env, log_path, name, app="bench.noop:noop_app", queue=self.noop_queue)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        for worker in list(self.workers):
            self.stop_worker(worker)

    # -- state ---------------------------------------------------------------------------------------------------
