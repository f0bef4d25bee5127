"""Enhancement jobs (the `enhancements` table): the statements of their life, as core/lifecycle.py is for predictions.

    created ──▶ processing ──▶ completed (billed: `price`, `amount`)
       │            ├────▶ failed
       └────────────┴────▶ canceled

A standalone job (`POST /v1/prompts/enhance`) is queued to the model's GPU workers (`klein.enhance`), claimed under
a lease the worker renews while it runs, and finished by a compare-and-set only its holder can make. A prediction
that asks for `enhance_prompt` runs its enhancement inside its own job and records it here, completed, as one
statement (`record`), billed the same way.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Insert, Select, Update, and_, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.types import Date, Numeric

from core.lifecycle import Status
from core.tables import enhancements as e
from core.tables import tenants

ENHANCE_TASK = "klein.enhance"


def _price(default_price: float) -> Any:
    """The tenant's price per enhancement now, else the platform's."""
    return (
        select(func.coalesce(tenants.c.price_per_enhancement, literal(default_price, Numeric(12, 6))))
        .where(tenants.c.id == e.c.tenant_id)
        .scalar_subquery()
    )


def create(job_id: str, tenant_id: str, api_key_id: str | None, model: str, job_input: dict[str, Any]) -> Insert:
    return (
        insert(e)
        .values(id=job_id, tenant_id=tenant_id, api_key_id=api_key_id, model=model, input=job_input)
        .returning(e)
    )


def claim(worker_id: str, lease_s: float, max_attempts: int) -> Update:
    """created → processing for the job bound as `job_id`, or take over one whose holder's lease ran out."""
    claimable = and_(
        e.c.attempts < max_attempts,
        or_(e.c.status == Status.CREATED, and_(e.c.status == Status.PROCESSING, e.c.lease_expires_at < func.now())),
    )
    return (
        update(e)
        .where(e.c.id == bindparam("job_id"), claimable)
        .values(
            status=Status.PROCESSING,
            worker_id=worker_id,
            attempts=e.c.attempts + 1,
            started_at=func.now(),
            lease_expires_at=func.now() + timedelta(seconds=lease_s),
        )
        .returning(e)
    )


def renew(worker_id: str, lease_s: float) -> Update:
    """Extend the holder's lease on the job bound as `job_id`; nothing returned: it is no longer ours (canceled)."""
    return (
        update(e)
        .where(e.c.id == bindparam("job_id"), e.c.status == Status.PROCESSING, e.c.worker_id == worker_id)
        .values(lease_expires_at=func.now() + timedelta(seconds=lease_s))
        .returning(e.c.id)
    )


def complete(worker_id: str, default_price: float) -> Update:
    """processing → completed with `output`, `enhancer`, `tokens` and `timings` bound by those names prefixed
    `final_`, billed at the tenant's price in the same statement (exactly once: only the holder's finish applies)."""
    price = _price(default_price)
    return _finish(worker_id, Status.COMPLETED).values(
        output=bindparam("final_output"),
        enhancer=bindparam("final_enhancer"),
        tokens=bindparam("final_tokens"),
        price=price,
        amount=price,
    )


def fail(worker_id: str) -> Update:
    """processing → failed with `final_error` and `final_timings`."""
    return _finish(worker_id, Status.FAILED).values(error=bindparam("final_error"))


def _finish(worker_id: str, status: Status) -> Update:
    return (
        update(e)
        .where(e.c.id == bindparam("job_id"), e.c.status == Status.PROCESSING, e.c.worker_id == worker_id)
        .values(status=status, completed_at=func.now(), lease_expires_at=None, timings=bindparam("final_timings"))
        .returning(e)
    )


def cancel(job_id: str, tenant_id: str) -> Update:
    return (
        update(e)
        .where(e.c.id == job_id, e.c.tenant_id == tenant_id, e.c.status.in_([Status.CREATED, Status.PROCESSING]))
        .values(status=Status.CANCELED, completed_at=func.now(), lease_expires_at=None)
        .returning(e)
    )


def record(store: Update, default_price: float) -> Select[Any]:
    """A prediction's rewrite stored (`store`: an UPDATE of predictions returning its id, tenant_id, api_key_id,
    model and started_at, e.g. the worker's compare-and-set on its held row) and, if it applied, its enhancement
    recorded completed and billed, in one statement. Bound: `job_id`, `job_input`, `job_output`, `job_enhancer`,
    `job_tokens`, `job_timings` (no column names: `store` is an UPDATE) and what `store` binds. Returns the
    stored prediction's id, or nothing."""
    stored = store.cte("stored")
    price = func.coalesce(tenants.c.price_per_enhancement, literal(default_price, Numeric(12, 6)))
    source = select(
        bindparam("job_id", type_=e.c.id.type),
        stored.c.tenant_id,
        stored.c.api_key_id,
        stored.c.id,
        stored.c.model,
        bindparam("job_input", type_=e.c.input.type),
        literal(Status.COMPLETED.value),
        bindparam("job_output", type_=e.c.output.type),
        bindparam("job_enhancer", type_=e.c.enhancer.type),
        bindparam("job_tokens", type_=e.c.tokens.type),
        bindparam("job_timings", type_=e.c.timings.type),
        literal(1),
        price,
        price,
        stored.c.started_at,
        func.now(),
    ).select_from(stored.join(tenants, tenants.c.id == stored.c.tenant_id))
    columns = [
        "id", "tenant_id", "api_key_id", "prediction_id", "model", "input", "status", "output", "enhancer",
        "tokens", "timings", "attempts", "price", "amount", "started_at", "completed_at",
    ]  # fmt: skip
    billed = insert(e).from_select(columns, source).cte("billed")
    return select(stored.c.id).add_cte(billed)


def totals(tenant_id: str | None, start: Any, end: Any) -> Select[Any]:
    """Billed rewrites per day (and tenant), for completed_at in [start, end): the usage report's enhancements."""
    day = func.cast(e.c.completed_at, Date).label("day")
    query = select(e.c.tenant_id, day, func.count().label("enhancements"), func.sum(e.c.amount).label("amount")).where(
        e.c.status == Status.COMPLETED, e.c.completed_at >= start, e.c.completed_at < end
    )
    if tenant_id is not None:
        query = query.where(e.c.tenant_id == tenant_id)
    return query.group_by(e.c.tenant_id, day).order_by(e.c.tenant_id, day)
