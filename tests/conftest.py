from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import redis
from sqlalchemy import Engine

from core import tenants
from core.db import make_sync_engine
from core.settings import Settings
from core.tenants import IssuedKey
from ops.embedded import SeaweedS3, Service, free_port, start_api, start_worker
from ops.migrate import migrate
from tests.pgbouncer import THROUGH_PGBOUNCER, PgBouncer
from tests.stack import PG_ADMIN_URL, REDIS_URL, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ADMIN_KEY = "test-admin-" + secrets.token_hex(8)  # nothing in the tests may reach a model hub


TIERS = ("unit", "integration", "e2e", "faults", "fuzz", "deploy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, the folder it lives in (tests/<tier>/…)."""
    for item in items:
        tier = item.path.relative_to(ROOT / "tests").parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@dataclass
class Stack:
    env: dict[str, str]
    settings: Settings
    engine: Engine
    api_url: str
    worker: Service
    logs: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-klein"))


@pytest.fixture(scope="session")
def settings_env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, str]]:
    """Environment naming a fresh database, a dedicated Redis db, a unique queue and a live S3 server; with
    KLEIN_TEST_PGBOUNCER=1 the database is reached through PgBouncer in transaction mode (tests/pgbouncer.py)."""
    run = secrets.token_hex(4)
    database = f"klein_test_{run}"
    database_url = create_database(database)
    redis.Redis.from_url(REDIS_URL).flushdb()
    s3 = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    bouncer = PgBouncer(tmp_path_factory.mktemp("pgbouncer"), PG_ADMIN_URL).start() if THROUGH_PGBOUNCER else None
    env = os.environ | {
        "KLEIN_DATABASE_URL": bouncer.url(database) if bouncer else database_url,
        "KLEIN_REDIS_URL": REDIS_URL,
        "KLEIN_QUEUE_NAME": f"klein-test-{run}",
        "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
        "KLEIN_S3_BUCKET": "klein-test",
        "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
        "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "KLEIN_MODEL_PATH": str(tiny_model),
        "KLEIN_DEVICE": "cpu",
        "KLEIN_TRY_SYNC_TIMEOUT_S": "120",  # long enough for a busy machine; tests of the fallback set their own
        "KLEIN_DEFAULT_RATE_LIMIT_PER_MINUTE": "100000",  # tests poll fast; rate-limit tests set their own
        "KLEIN_ADMIN_API_KEY": ADMIN_KEY,
        "KLEIN_URL_SIGNING_KEY": secrets.token_hex(16),
        # Test image servers listen on 127.0.0.2; every other private address stays refused.
        "KLEIN_FETCH_ALLOWLIST": '["127.0.0.2/32"]',
        "KLEIN_FETCH_TIMEOUT_S": "3",
        "KLEIN_LORA_CACHE_DIR": str(tmp_path_factory.mktemp("loras")),
        "KLEIN_PROGRESS_INTERVAL_S": "0",  # every denoising step reported (tests/e2e/test_events.py)
        "KLEIN_ENHANCER_MAX_TOKENS": "8",  # the tiny Qwen3's rewrites (docs/enhancer.md): short, the worker is shared
        # The session's GPU worker serves its metrics here (tests/e2e/test_operations.py); workers started by
        # single tests pass their own port or 0.
        "KLEIN_WORKER_METRICS_PORT": str(free_port()),
        "KLEIN_WEBHOOK_METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if bouncer:  # KLEIN_DB_PREPARED_STATEMENTS=true here shows what goes wrong without the setting
        env["KLEIN_DB_PREPARED_STATEMENTS"] = os.environ.get("KLEIN_DB_PREPARED_STATEMENTS", "false")
    migrate(Settings(database_url=database_url).sync_database_url)  # direct
    try:
        yield env
    finally:
        s3.stop()
        if bouncer:
            bouncer.stop()
        drop_database(database)


@pytest.fixture(scope="session")
def settings(settings_env: dict[str, str]) -> Settings:
    with mock.patch.dict(os.environ, settings_env):  # parsed exactly as the subprocesses parse it
        return Settings()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_sync_engine(settings)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def stack(
    settings_env: dict[str, str], settings: Settings, engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("logs")
    worker = start_worker(settings_env, logs / "worker.log", "test-worker")
    api, api_url = start_api(settings_env, logs / "api.log")
    try:
        yield Stack(settings_env, settings, engine, api_url, worker, logs)
    finally:
        api.stop()
        worker.stop()


def make_tenant(engine: Engine, **limits: Any) -> IssuedKey:
    """A new tenant with one key; limits as in core.tenants (None: the platform default)."""
    tenant_id, create = tenants.create_tenant(f"tenant-{secrets.token_hex(4)}", **limits)
    issued, issue = tenants.issue_key(tenant_id, "test")
    with engine.begin() as conn:
        conn.execute(create)
        conn.execute(issue)
    return issued


@pytest.fixture
def tenant(engine: Engine) -> IssuedKey:
    return make_tenant(engine)


@pytest.fixture
def client(stack: Stack, tenant: IssuedKey) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers={"apikey": tenant.key}, timeout=180) as http:
        yield http
