"""The prediction state machine: the only code that changes a prediction's status.

    created ──▶ processing ──▶ completed
       │  ▲         │
       │  └─────────┤  requeue: the holder's lease lapsed (worker lost), attempts left
       │            ├────▶ failed  (error, timeout, or no attempts left)
       └────────────┴────▶ canceled / failed
    created ◀── failed: an operator's requeue (its attempts start over)
    created / processing ──▶ canceled "deadline exceeded" (core/deadlines.py): not started, or not finished, in time

Each transition is one compare-and-set UPDATE: it applies only if the row is still in the
state the caller expects, so duplicate task deliveries and racing writers cannot both win.
The functions build statements; callers run them on their own connection (async in the
API, sync in workers) and look at the returned row (None: the transition did not apply).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BindParameter,
    Insert,
    Select,
    SmallInteger,
    String,
    Text,
    Update,
    and_,
    bindparam,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, INTERVAL, JSONB, JSONPATH

from core.deadlines import DEADLINE_EXCEEDED
from core.events import FINAL_COLUMNS
from core.tables import predictions as p


class Status(StrEnum):
    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED})


def create(
    *,
    prediction_id: str | BindParameter[Any],
    tenant_id: str | BindParameter[Any],
    api_key_id: str | BindParameter[Any] | None,
    model: str | BindParameter[Any],
    input: dict[str, Any] | BindParameter[Any],
    params: dict[str, Any] | BindParameter[Any],
) -> Insert:
    """A new prediction, `created`. Values may be `bindparam()`s for a statement compiled once (api/infra/pg.py)."""
    return insert(p).values(
        id=prediction_id,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        model=model,
        input=input,
        params=params,
        status=Status.CREATED,
    )


_NEW_COLUMNS = ("id", "tenant_id", "api_key_id", "model", "input", "params", "webhook", "priority", "cache_key")
_DEADLINE_COLUMNS = ("start_deadline_s", "deadline_s")  # seconds from now, as text (null: none)


def create_many() -> Insert:
    """New predictions, `created`, from parallel arrays bound by name: `id`, `tenant_id`, `api_key_id`,
    `model`, `input`, `params` and `webhook` as JSON text (webhook may be null), `priority` as text, `cache_key`
    (core/result_cache.py; may be null), and the deadlines `start_deadline_s` and `deadline_s` as seconds from
    now in text (null: none; core/deadlines.py).
    One statement for a batch of submits (api/infra/coalesce.py)."""
    names = (*_NEW_COLUMNS, *_DEADLINE_COLUMNS)
    rows = func.unnest(*(BindParameter(name, type_=ARRAY(Text)) for name in names))
    new = rows.table_valued(*names).render_derived()
    values = select(
        new.c.id,
        new.c.tenant_id,
        new.c.api_key_id,
        new.c.model,
        cast(new.c.input, JSONB),
        cast(new.c.params, JSONB),
        cast(new.c.webhook, JSONB),
        cast(new.c.priority, SmallInteger),
        new.c.cache_key,
        literal(Status.CREATED.value, String),
        *(func.now() + cast(new.c[name].concat(" seconds"), INTERVAL) for name in _DEADLINE_COLUMNS),
    )
    return insert(p).from_select([*_NEW_COLUMNS, "status", "start_deadline_at", "deadline_at"], values)


def claim(prediction_id: str | BindParameter[Any], worker_id: str, lease_s: float, max_attempts: int) -> Update:
    """created → processing, or take over a processing row whose holder's lease ran out."""
    claimable = and_(
        p.c.attempts < max_attempts,
        or_(
            and_(p.c.status == Status.CREATED, _in_time),
            and_(p.c.status == Status.PROCESSING, p.c.lease_expires_at < func.now()),
        ),
    )
    return update(p).where(p.c.id == prediction_id, claimable).values(_held(worker_id, lease_s)).returning(p)


# What predictions must share to run in one pipeline call (models/klein_pipeline.py, generate_batch).
BATCH_KEYS = ("width", "height", "num_inference_steps", "guidance_scale", "max_sequence_length")


def batch_candidates(
    model: str, params: dict[str, Any], exclude_id: str, max_attempts: int, limit: int, batch_work: bool = False
) -> Select:
    """Up to `limit` queued predictions that can share a pipeline call with `params`: same model, BATCH_KEYS and
    LoRAs (with their scales), text-to-image only (the pipeline conditions every image of a call on the same
    references), and of the same kind of work (`batch_work`: a batch job's, core/batches.py; a batch's images never
    lengthen an interactive prediction's call); in the order the queue serves them: priority, then age. Read
    without locks; `claim_companions` decides."""
    return (
        select(p.c.id, p.c.params["num_outputs"].as_integer().label("num_outputs"))
        .where(
            p.c.status == Status.CREATED,
            _in_time,
            p.c.model == model,
            p.c.id != exclude_id,
            p.c.attempts < max_attempts,
            p.c.params.contains({key: params[key] for key in BATCH_KEYS}),
            func.coalesce(func.jsonb_array_length(p.c.params["reference_keys"]), 0) == 0,
            func.coalesce(p.c.params["loras"], cast([], JSONB)) == cast(params.get("loras", []), JSONB),
            p.c.batch_id.is_not(None) if batch_work else p.c.batch_id.is_(None),
        )
        .order_by(p.c.priority, p.c.created_at)
        .limit(limit)
    )


def next_with_loras(model: str, tenant_id: str, sha256s: list[str], max_attempts: int) -> Select:
    """The oldest queued prediction of `model` and of `tenant_id` whose LoRAs are `sha256s` (in order, any
    scales), if it is in the most urgent priority class queued now. A worker with the tenant's LoRAs loaded takes
    it ahead of the queue's order (worker/runtime.py, a few in a row at most), but never ahead of a more urgent
    tenant's prediction, and never another tenant's (what it is told would tell what this one ran)."""
    queued = and_(p.c.status == Status.CREATED, _in_time, p.c.model == model, p.c.attempts < max_attempts)
    most_urgent = select(func.min(p.c.priority)).where(queued).scalar_subquery()
    every_sha = cast(literal("$[*].sha256"), JSONPATH)
    shas = func.jsonb_path_query_array(func.coalesce(p.c.params["loras"], cast([], JSONB)), every_sha)
    same = p.c.tenant_id == tenant_id, shas == cast(sha256s, JSONB)
    return select(p.c.id).where(queued, *same, p.c.priority == most_urgent).order_by(p.c.created_at).limit(1)


def claim_companions(worker_id: str, lease_s: float, max_attempts: int) -> Update:
    """created → processing for the ids bound as `ids` that are still queued: the companions of a claim."""
    return (
        update(p)
        .where(
            p.c.id.in_(bindparam("ids", expanding=True)),
            p.c.status == Status.CREATED,
            _in_time,
            p.c.attempts < max_attempts,
        )
        .values(_held(worker_id, lease_s))
        .returning(p)
    )


# A queued prediction a worker may still start: no start deadline, or not passed (core/deadlines.py).
_in_time = or_(p.c.start_deadline_at.is_(None), p.c.start_deadline_at > func.now())


def _held(worker_id: str, lease_s: float) -> dict[str, Any]:
    return {
        "status": Status.PROCESSING,
        "worker_id": worker_id,
        "attempts": p.c.attempts + 1,
        "started_at": func.now(),
        "lease_expires_at": func.now() + timedelta(seconds=lease_s),
    }


def renew(prediction_ids: list[str], worker_id: str, lease_s: float) -> Update:
    """Extend the holder's leases (the worker's heartbeat); an id not returned is no longer ours."""
    return (
        update(p)
        .where(p.c.id.in_(prediction_ids), p.c.status == Status.PROCESSING, p.c.worker_id == worker_id)
        .values(lease_expires_at=func.now() + timedelta(seconds=lease_s))
        .returning(p.c.id)
    )


def requeue_lapsed(prediction_id: str) -> Update:
    """processing → created when the holder's lease lapsed and attempts are left."""
    return (
        update(p)
        .where(p.c.id == prediction_id, p.c.status == Status.PROCESSING, p.c.lease_expires_at < func.now())
        .values(status=Status.CREATED, worker_id=None, lease_expires_at=None)
        .returning(p.c.id, p.c.tenant_id)
    )


def give_up(prediction_id: str, error: str) -> Update:
    """processing → failed when the holder's lease lapsed and no attempts are left."""
    return (
        update(p)
        .where(p.c.id == prediction_id, p.c.status == Status.PROCESSING, p.c.lease_expires_at < func.now())
        .values(status=Status.FAILED, error=error, completed_at=func.now(), lease_expires_at=None)
        .returning(p.c.id, p.c.tenant_id)
    )


def complete(
    prediction_id: str | BindParameter[Any],
    worker_id: str,
    outputs: list[dict[str, Any]] | BindParameter[Any],
    timings: dict[str, int] | BindParameter[Any],
    logs: list[dict[str, str]] | BindParameter[Any] | None = None,
    safety: dict[str, Any] | BindParameter[Any] | None = None,
) -> Update:
    return _finish(
        prediction_id,
        worker_id,
        Status.COMPLETED,
        outputs=outputs,
        timings=timings,
        logs=[] if logs is None else logs,
        safety=safety,
    )


def fail(
    prediction_id: str | BindParameter[Any],
    worker_id: str,
    error: str | BindParameter[Any],
    timings: dict[str, int] | BindParameter[Any],
    logs: list[dict[str, str]] | BindParameter[Any] | None = None,
    safety: dict[str, Any] | BindParameter[Any] | None = None,
) -> Update:
    return _finish(
        prediction_id,
        worker_id,
        Status.FAILED,
        error=error,
        timings=timings,
        logs=[] if logs is None else logs,
        safety=safety,
    )


def fail_unclaimed(prediction_id: str, error: str) -> Update:
    """created → failed, for a prediction that never reached a worker (e.g. it could not be enqueued)."""
    return (
        update(p)
        .where(p.c.id == prediction_id, p.c.status == Status.CREATED)
        .values(status=Status.FAILED, error=error, completed_at=func.now())
        .returning(p.c.id)
    )


def requeue_failed(
    limit: int,
    prediction_id: str | None = None,
    tenant_id: str | None = None,
    model: str | None = None,
    failed_since: datetime | None = None,
) -> Update:
    """failed → created for up to `limit` failed predictions matching every filter given, latest failures first:
    the operator's requeue. Attempts start over and the failed run's error, timings and logs go; a prediction
    whose objects were deleted (its references with them: expired or deleted) stays failed."""
    chosen = (
        select(p.c.id)
        .where(p.c.status == Status.FAILED, p.c.expired_at.is_(None))
        .order_by(p.c.completed_at.desc())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    for column, value in (("id", prediction_id), ("tenant_id", tenant_id), ("model", model)):
        if value is not None:
            chosen = chosen.where(p.c[column] == value)
    if failed_since is not None:
        chosen = chosen.where(p.c.completed_at >= failed_since)
    return (
        update(p)
        .where(p.c.id.in_(chosen.scalar_subquery()), p.c.status == Status.FAILED)
        .values(
            status=Status.CREATED,
            error=None,
            attempts=0,
            worker_id=None,
            lease_expires_at=None,
            started_at=None,
            completed_at=None,
            outputs=[],
            timings={},
            logs=[],
        )
        .returning(p.c.id, p.c.tenant_id, p.c.model, p.c.priority)
    )


def cancel(prediction_id: str, tenant_id: str) -> Update:
    return (
        update(p)
        .where(
            p.c.id == prediction_id,
            p.c.tenant_id == tenant_id,
            p.c.status.in_([Status.CREATED, Status.PROCESSING]),
        )
        .values(status=Status.CANCELED, completed_at=func.now(), lease_expires_at=None)
        .returning(p)
    )


def expire_unstarted(prediction_id: str | None = None, limit: int = 1000) -> Update:
    """created → canceled with DEADLINE_EXCEEDED for queued predictions past their start deadline: `prediction_id`
    (a worker whose claim it refused, the API reading it), or up to `limit` of them (the sweeper). Never billed:
    no usage record is written. Returns the final row as a worker's finish does (FINAL_COLUMNS) and `webhook`."""
    due = select(p.c.id).where(p.c.status == Status.CREATED, p.c.start_deadline_at <= func.now())
    if prediction_id is not None:
        due = due.where(p.c.id == prediction_id)
    due = due.limit(limit).with_for_update(skip_locked=True)
    return (
        update(p)
        .where(p.c.id.in_(due.scalar_subquery()), p.c.status == Status.CREATED)
        .values(status=Status.CANCELED, error=DEADLINE_EXCEEDED, completed_at=func.now())
        .returning(*FINAL_COLUMNS, p.c.webhook)
    )


def cancel_running(
    prediction_id: str | BindParameter[Any],
    worker_id: str,
    timings: dict[str, int] | BindParameter[Any],
    logs: list[dict[str, str]] | BindParameter[Any],
) -> Update:
    """processing → canceled with DEADLINE_EXCEEDED, by the worker holding it, stopped at a step past its deadline
    (worker/leases.py). Never billed."""
    return _finish(prediction_id, worker_id, Status.CANCELED, error=DEADLINE_EXCEEDED, timings=timings, logs=logs)


def _finish(prediction_id: str | BindParameter[Any], worker_id: str, status: Status, **values: Any) -> Update:
    # Only the worker holding the claim may finish it. The row comes back as its completion event carries it.
    return (
        update(p)
        .where(p.c.id == prediction_id, p.c.status == Status.PROCESSING, p.c.worker_id == worker_id)
        .values(status=status, completed_at=func.now(), lease_expires_at=None, **values)
        .returning(*FINAL_COLUMNS)
    )
