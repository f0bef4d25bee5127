"""Usage metering: one record per completed prediction, priced at the tenant's plan at that moment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Select, Update, bindparam, case, cast, func, insert, literal, select
from sqlalchemy.types import Date, Integer, Numeric

from core.lifecycle import Status
from core.tables import tenants, usage_records


def finish_and_bill(
    finish: Update,
    default_price: float,
    default_batch_price: float | None = None,
    plan: Column[Any] = tenants.c.price_per_image,
) -> Select[Any]:
    """A worker's final transition (lifecycle.complete or fail) and, if it completed the prediction, its usage
    record, in one statement: billed in the same atomic step as the compare-and-set that finishes it, so
    exactly once, and never when it failed. Returns the finished row, or nothing if the transition did not
    happen. Executed with `charges(...)` among its parameters. `plan`: the tenant's price column (the result
    cache's answers bill at `cache_price_per_image`), `default_price` where it is NULL. A batch's prediction
    (docs/batch.md) is billed at the tenant's batch price (else `default_batch_price`, else `default_price`) and
    recorded as batch work."""
    finished = finish.cte("finished")
    interactive = func.coalesce(plan, literal(default_price, Numeric(12, 6)))
    batch_default = default_price if default_batch_price is None else default_batch_price
    batch_price = func.coalesce(tenants.c.batch_price_per_image, literal(batch_default, Numeric(12, 6)))
    is_batch = finished.c.batch_id.is_not(None)
    price = case((is_batch, batch_price), else_=interactive)
    images = bindparam("images", type_=Integer)
    source = (
        select(
            finished.c.id,
            tenants.c.id,
            finished.c.api_key_id,
            finished.c.model,
            images,
            bindparam("megapixels", type_=Numeric(10, 4)),
            bindparam("steps", type_=Integer),
            price,
            price * images,
            is_batch,
        )
        .select_from(finished.join(tenants, tenants.c.id == finished.c.tenant_id))
        .where(finished.c.status == Status.COMPLETED)
    )
    columns = ["prediction_id", "tenant_id", "api_key_id", "model", "images", "megapixels", "steps"]
    billed = insert(usage_records).from_select([*columns, "price_per_image", "amount", "batch"], source).cte("billed")
    return select(finished).add_cte(billed)


def charges(params: dict[str, Any], images: int) -> dict[str, Any]:
    """What a prediction run with these GenerationParams and producing `images` is billed on."""
    megapixels = round(params["width"] * params["height"] / 2**20, 4)
    return {"images": images, "megapixels": megapixels, "steps": params["num_inference_steps"]}


def totals(tenant_id: str | None, start: Any, end: Any) -> Select[Any]:
    """Totals per day, model and kind of work (interactive or batch) (and tenant), for created_at in [start, end)."""
    day = cast(usage_records.c.created_at, Date).label("day")
    query = select(
        usage_records.c.tenant_id,
        day,
        usage_records.c.model,
        usage_records.c.batch,
        func.count().label("predictions"),
        func.sum(usage_records.c.images).label("images"),
        func.sum(usage_records.c.megapixels * usage_records.c.images).label("megapixels"),
        func.sum(usage_records.c.amount).label("amount"),
    ).where(usage_records.c.created_at >= start, usage_records.c.created_at < end)
    if tenant_id is not None:
        query = query.where(usage_records.c.tenant_id == tenant_id)
    keys = (usage_records.c.tenant_id, day, usage_records.c.model, usage_records.c.batch)
    return query.group_by(*keys).order_by(*keys)
