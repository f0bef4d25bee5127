"""Fair queueing, measured: a quiet tenant's queue wait with and without a noisy tenant's backlog.

    python -m bench.fairness [--backlog 30] [--samples 5]

Starts its own stack on the machine's PostgreSQL and Redis (a fresh database, Redis db 12, a unique
queue), SeaweedFS, one worker running the tiny pipeline and the API; prints a table. Without fair
dispatch a quiet prediction would wait for the whole backlog ahead of it (backlog × image time).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from core import tenants
from core.db import make_sync_engine
from core.settings import Settings
from ops.embedded import SeaweedS3, start_api, start_worker
from ops.migrate import migrate

PG_ADMIN_URL = os.environ.get("KLEIN_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = "redis://127.0.0.1:6379/12"


def _key(settings: Settings, **limits: Any) -> str:
    tenant_id, create = tenants.create_tenant(f"bench-{secrets.token_hex(4)}", **limits)
    issued, issue = tenants.issue_key(tenant_id)
    engine = make_sync_engine(settings)
    with engine.begin() as conn:
        conn.execute(create)
        conn.execute(issue)
    engine.dispose()
    return issued.key


def _submit(api: str, key: str, prompt: str, sync: bool) -> dict[str, Any]:
    headers = {"apikey": key, "Model": "flux-klein-4b"} | ({"Try-Sync": "true"} if sync else {})
    body = {"input": {"prompt": prompt, "aspect_ratio": "1:1", "output_format": "jpg"}}
    answer = httpx.post(f"{api}/v1/predictions", headers=headers, json=body, timeout=300)
    answer.raise_for_status()
    return dict(answer.json())


def _quiet_waits(api: str, key: str, samples: int) -> tuple[list[float], list[float]]:
    """Queue waits and inference times (ms) of `samples` quiet predictions, one after another."""
    waits, inference = [], []
    for i in range(samples):
        done = _submit(api, key, f"quiet {i}", sync=True)
        assert done["status"] == "succeeded", done
        waits.append(done["timings"]["queue_ms"])
        inference.append(done["timings"]["inference_ms"])
    return waits, inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=30, help="noisy predictions queued (default 30)")
    parser.add_argument("--samples", type=int, default=5, help="quiet predictions per phase (default 5)")
    args = parser.parse_args()

    run = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix="klein-fairness-"))
    database = f"klein_fairness_{run}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    s3 = SeaweedS3(root / "s3").start()
    services = []
    try:
        from models.tiny import save_tiny_pipeline

        env = os.environ | {
            "KLEIN_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}",
            "KLEIN_REDIS_URL": REDIS_URL,
            "KLEIN_QUEUE_NAME": f"fairness-{run}",
            "KLEIN_S3_ENDPOINT_URL": s3.endpoint_url,
            "KLEIN_S3_BUCKET": "fairness",
            "KLEIN_S3_ACCESS_KEY_ID": s3.access_key,
            "KLEIN_S3_SECRET_ACCESS_KEY": s3.secret_key,
            "KLEIN_MODEL_PATH": str(save_tiny_pipeline(root / "tiny")),
            "KLEIN_DEVICE": "cpu",
            "KLEIN_TRY_SYNC_TIMEOUT_S": "300",
            "HF_HUB_OFFLINE": "1",
        }
        settings = Settings.model_validate({k[6:].lower(): v for k, v in env.items() if k.startswith("KLEIN_")})
        migrate(settings.sync_database_url)
        services.append(start_worker(env, root / "worker.log", "fairness"))
        api_service, api = start_api(env, root / "api.log")
        services.append(api_service)
        quiet, noisy = _key(settings), _key(settings, max_in_flight=10_000)

        idle_waits, inference = _quiet_waits(api, quiet, args.samples)
        backlog = [_submit(api, noisy, f"noisy {i}", sync=False)["id"] for i in range(args.backlog)]
        queue_depth = [redis.Redis.from_url(REDIS_URL).scard(f"{settings.queue_name}:queued")]
        busy_waits, _ = _quiet_waits(api, quiet, args.samples)
        queue_depth.append(redis.Redis.from_url(REDIS_URL).scard(f"{settings.queue_name}:queued"))
        for prediction_id in backlog:
            httpx.post(f"{api}/v1/predictions/{prediction_id}/cancel", headers={"apikey": noisy})

        image_ms = statistics.median(inference)
        rows = [
            ("quiet tenant's queue wait, no backlog (p50 / max)", idle_waits),
            (f"quiet tenant's queue wait, noisy backlog of {args.backlog} (p50 / max)", busy_waits),
        ]
        print("\n| figure | value |\n| --- | --- |")
        for label, waits in rows:
            print(f"| {label} | {statistics.median(waits):.0f} ms / {max(waits):.0f} ms |")
        print(f"| noisy predictions still queued before / after the quiet ones | {queue_depth[0]} / {queue_depth[1]} |")
        print(f"| one image's inference (p50) | {image_ms:.0f} ms |")
        fifo_ms = queue_depth[0] * image_ms
        print(f"| first-in-first-out wait for the quiet tenant (queued × image time) | ≈ {fifo_ms:.0f} ms |")
        return 0
    finally:
        for service in reversed(services):
            service.stop()
        s3.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    raise SystemExit(main())
