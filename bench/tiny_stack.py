"""A throwaway stack for the benchmarks that run the real worker on the tiny pipeline (fairness, batching, events).

The machine's PostgreSQL (a fresh database) and Redis (a queue of its own), SeaweedFS for storage; the API and
workers are started by the caller with `env`. Everything is removed on exit.
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

from bench.common import REDIS_URL, create_database, create_tenant_key, drop_database, settings_of
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client
from ops.embedded import SeaweedS3, Service, start_api, start_webhook_worker, start_worker


@dataclass
class TinyStack:
    root: Path
    env: dict[str, str]
    settings: Settings
    services: list[Service] = field(default_factory=list)
    api_pid: int | None = None

    def worker(self, name: str, **env: str) -> Service:
        service = start_worker(self.env | env, self.root / f"{name}.log", name)
        self.services.append(service)
        return service

    def webhook_worker(self) -> Service:
        service = start_webhook_worker(self.env, self.root / "webhooks.log")
        self.services.append(service)
        return service

    def api(self) -> str:
        service, url = start_api(self.env, self.root / "api.log")
        self.services.append(service)
        self.api_pid = service.process.pid if service.process is not None else None
        return url

    def key(self, **limits: Any) -> str:
        """A new tenant's key; limits as in core.tenants."""
        return create_tenant_key(self.settings.database_url, f"bench-{secrets.token_hex(4)}", **limits).key


@contextlib.contextmanager
def tiny_stack(name: str, **env: str) -> Iterator[TinyStack]:
    """The stack, its processes started with the platform's KLEIN_* settings for it and `env` on top."""
    from models.tiny import save_tiny_pipeline

    run = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix=f"klein-{name}-"))
    database = f"klein_{name}_{run}"
    database_url = create_database(database)
    s3 = SeaweedS3(root / "s3").start()
    stack: TinyStack | None = None
    try:
        full_env = (
            os.environ
            | {
                "KLEIN_DATABASE_URL": database_url,
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
                "KLEIN_WEBHOOK_METRICS_PORT": "0",
                "HF_HUB_OFFLINE": "1",
            }
            | env
        )
        settings = settings_of(full_env)
        ensure_bucket(make_s3_client(settings), settings.s3_bucket)  # the API is ready once it exists
        stack = TinyStack(root, full_env, settings)
        yield stack
    finally:
        for service in reversed(stack.services if stack else []):
            service.stop()
        s3.stop()
        drop_database(database)
