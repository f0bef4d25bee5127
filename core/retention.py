"""Data retention: a finished prediction's objects and expired uploads are deleted (docs/retention.md).

A prediction expires `retention_s` after it finished: its tenant's, else `default_retention_s`, read when the
reaper runs, so a changed retention applies to what the tenant already has. The reaper (run by the sweeper,
core/sweeper.py) deletes everything stored under `<tenant>/<prediction>/` (outputs and references), then
marks the row `expired_at`; the row and its usage record stay. Uploads past `expires_at` go, object then row.
A tenant's stored LoRA goes `lora_retention_s` after a request last named it, unless one of its queued or
running predictions still does, object then row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Engine, delete, exists, func, select, true, tuple_

from core import lora, result_cache
from core.lifecycle import TERMINAL
from core.settings import Settings
from core.tables import files, loras, tenants
from core.tables import predictions as p

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BATCH = 500  # rows locked and reaped per transaction
BUDGET_S = 20.0  # a pass starts no new batch after this long; the next pass carries on
# Nothing is reaped sooner after it finished, whatever the retention: a Try-Sync answer may still be reading it.
SETTLE_S = 5
DELETE_PAGE = 1000  # keys per DeleteObjects request, S3's maximum


@dataclass
class ReapReport:
    predictions: int = 0
    files: int = 0
    loras: int = 0
    objects: int = 0


def prediction_prefix(tenant_id: str, prediction_id: str) -> str:
    return f"{tenant_id}/{prediction_id}/"  # as core.storage.output_key names its objects


def listed(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def delete_prefix(s3: S3Client, bucket: str, prefix: str) -> int:
    """Delete every object under `prefix`; how many there were."""
    keys = listed(s3, bucket, prefix)
    delete_keys(s3, bucket, keys)
    return len(keys)


def delete_keys(s3: S3Client, bucket: str, keys: list[str]) -> None:
    """Raises if any key could not be deleted (a key already absent counts as deleted)."""
    for start in range(0, len(keys), DELETE_PAGE):
        page = keys[start : start + DELETE_PAGE]
        done = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in page], "Quiet": True})
        if errors := done.get("Errors"):
            raise RuntimeError(f"could not delete {len(errors)} objects, e.g. {errors[0]}")


def retention_s(settings: Settings) -> ColumnElement[Any]:
    """A tenant's retention in seconds, as SQL over `tenants`."""
    return func.coalesce(tenants.c.retention_s, settings.default_retention_s)


def reap(settings: Settings, engine: Engine, s3: S3Client, batch: int = BATCH) -> ReapReport:
    """One pass: batches of expired predictions, then of expired uploads, until none is left or BUDGET_S."""
    report = ReapReport()
    deadline = time.monotonic() + BUDGET_S
    while _expire_predictions(settings, engine, s3, batch, report) == batch and time.monotonic() < deadline:
        pass
    while _delete_files(settings, engine, s3, batch, report) == batch and time.monotonic() < deadline:
        pass
    while _delete_loras(settings, engine, s3, batch, report) == batch and time.monotonic() < deadline:
        pass
    return report


def _expire_predictions(settings: Settings, engine: Engine, s3: S3Client, batch: int, report: ReapReport) -> int:
    kept_s = func.greatest(retention_s(settings), SETTLE_S)
    # Tenant by tenant (LATERAL), so that each is a range scan of the partial index `predictions_unexpired`: a
    # plain join with `tenants` scanned the whole table (250 ms a pass at a million rows; this way 1 ms).
    per_tenant = (
        select(p.c.id, p.c.tenant_id)
        .where(
            p.c.tenant_id == tenants.c.id,
            p.c.expired_at.is_(None),
            p.c.status.in_(sorted(TERMINAL)),
            p.c.completed_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, kept_s),
        )
        .limit(batch)
        .with_for_update(skip_locked=True)  # another reaper has those
        .lateral("due")
    )
    due = select(per_tenant.c.id, per_tenant.c.tenant_id).select_from(tenants.join(per_tenant, true())).limit(batch)
    with engine.begin() as conn:  # the rows stay locked while their objects go
        rows = conn.execute(due).all()
        if not rows:
            return 0
        keys = [key for r in rows for key in listed(s3, settings.s3_bucket, prediction_prefix(r.tenant_id, r.id))]
        delete_keys(s3, settings.s3_bucket, keys)
        conn.execute(result_cache.expire_with_originals([r.id for r in rows]))  # with the answers given from them
    report.predictions += len(rows)
    report.objects += len(keys)
    return len(rows)


def _delete_files(settings: Settings, engine: Engine, s3: S3Client, batch: int, report: ReapReport) -> int:
    due = (
        select(files.c.id, files.c.key)
        .where(files.c.expires_at < func.now())
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    with engine.begin() as conn:
        rows = conn.execute(due).all()
        if not rows:
            return 0
        # A batch's output and error files store nothing (key ""): rendered from its rows (core/batches.py).
        delete_keys(s3, settings.s3_bucket, [r.key for r in rows if r.key])
        conn.execute(delete(files).where(files.c.id.in_([r.id for r in rows])))
    report.files += len(rows)
    report.objects += len(rows)
    return len(rows)


def _unused_since(settings: Settings) -> ColumnElement[Any]:
    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.lora_retention_s)


def _delete_loras(settings: Settings, engine: Engine, s3: S3Client, batch: int, report: ReapReport) -> int:
    named = p.c.params["loras"].op("@>")(func.jsonb_build_array(func.jsonb_build_object("sha256", loras.c.sha256)))
    still_wanted = exists().where(p.c.tenant_id == loras.c.tenant_id, p.c.status.not_in(TERMINAL), named)
    due = (
        select(loras.c.tenant_id, loras.c.sha256)
        .where(loras.c.last_used_at < _unused_since(settings), ~still_wanted)
        .limit(batch)
        .with_for_update(skip_locked=True)  # a request naming it again waits, then stores it anew
    )
    with engine.begin() as conn:
        rows = conn.execute(due).all()
        if not rows:
            return 0
        delete_keys(s3, settings.s3_bucket, [lora.object_key(r.tenant_id, r.sha256) for r in rows])
        conn.execute(delete(loras).where(tuple_(loras.c.tenant_id, loras.c.sha256).in_([tuple(r) for r in rows])))
    report.loras += len(rows)
    report.objects += len(rows)
    return len(rows)
