"""The real services the tests run against, each started or provisioned for one test session.

PostgreSQL and Redis are the machine's servers (a fresh database, a dedicated Redis db and a
unique queue name per session); S3 is a SeaweedFS process on free loopback ports; the API
(uvicorn) and the worker (Celery, solo pool, tiny Klein pipeline) are real subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from core.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("KLEIN_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("KLEIN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def create_database(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout} s\n{tail}")


@dataclass
class Service:
    """A subprocess with its log file."""

    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Service:
        handle = open(self.log, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_api(env: dict[str, str], log: Path) -> tuple[Service, str]:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1"]
    api = Service([*args, "--port", str(port), "--log-level", "warning"], env, log).start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not api.alive():
            raise RuntimeError(f"API exited\n{log.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, "API", log)
    return api, url


def start_worker(env: dict[str, str], log: Path, name: str) -> Service:
    args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", env["KLEIN_QUEUE_NAME"]]
    args += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
    worker = Service(args, env, log).start()

    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"worker exited\n{log.read_text()[-4000:]}")
        return log.exists() and " ready." in log.read_text()

    wait_until(ready, 120, "worker", log)
    return worker
