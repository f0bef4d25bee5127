"""A throwaway stack for the benchmarks that run the real worker on the tiny pipeline (fairness, batching).

The machine's PostgreSQL (a fresh database) and Redis (db 12, a unique queue), SeaweedFS for storage; the
API and workers are started by the caller with `env`. Everything is removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from core import tenants
from core.db import make_sync_engine
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client
from ops.embedded import SeaweedS3, Service, start_api, start_worker
from ops.migrate import migrate

PG_ADMIN_URL = os.environ.get("KLEIN_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = "redis://127.0.0.1:6379/12"


@dataclass
class TinyStack:
    root: Path
    env: dict[str, str]
    settings: Settings
    services: list[Service] = field(default_factory=list)

    def worker(self, name: str, **env: str) -> Service:
        service = start_worker(self.env | env, self.root / f"{name}.log", name)
        self.services.append(service)
        return service

    def api(self) -> str:
        service, url = start_api(self.env, self.root / "api.log")
        self.services.append(service)
        return url

    def key(self, **limits: Any) -> str:
        """A new tenant's key; limits as in core.tenants."""
        tenant_id, create = tenants.create_tenant(f"bench-{secrets.token_hex(4)}", **limits)
        issued, issue = tenants.issue_key(tenant_id)
        engine = make_sync_engine(self.settings)
        with engine.begin() as conn:
            conn.execute(create)
            conn.execute(issue)
        engine.dispose()
        return issued.key


@contextlib.contextmanager
def tiny_stack(name: str) -> Iterator[TinyStack]:
    from models.tiny import save_tiny_pipeline

    run = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix=f"klein-{name}-"))
    database = f"klein_{name}_{run}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    s3 = SeaweedS3(root / "s3").start()
    stack: TinyStack | None = None
    try:
        env = os.environ | {
            "KLEIN_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
            "KLEIN_REDIS_URL": REDIS_URL,
            "KLEIN_QUEUE_NAME": f"{name}-{run}",
            "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
            "KLEIN_S3_BUCKET": name,
            "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
            "KLEIN_MODEL_PATH": str(save_tiny_pipeline(root / "tiny")),
            "KLEIN_DEVICE": "cpu",
            "KLEIN_TRY_SYNC_TIMEOUT_S": "300",
            "KLEIN_WORKER_METRICS_PORT": "0",
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings.model_validate({k[6:].lower(): v for k, v in env.items() if k.startswith("KLEIN_")})
        migrate(settings.sync_database_url)
        ensure_bucket(make_s3_client(settings), settings.s3_bucket)  # the API is ready once it exists
        stack = TinyStack(root, env, settings)
        yield stack
    finally:
        for service in reversed(stack.services if stack else []):
            service.stop()
        s3.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
