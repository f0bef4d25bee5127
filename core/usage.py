"""Usage metering: one record per completed prediction, priced at the tenant's plan at that moment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert, Select, cast, func, insert, literal, select
from sqlalchemy.types import Date, Numeric

from core.tables import tenants, usage_records


def record(prediction: Any, default_price: float) -> Insert:
    """Bill a completed prediction row (from lifecycle.complete). Failed predictions are never billed."""
    images = len(prediction["outputs"])
    params = prediction["params"]
    price = func.coalesce(tenants.c.price_per_image, literal(default_price, Numeric(12, 6)))
    source = select(
        literal(prediction["id"]),
        tenants.c.id,
        literal(prediction["api_key_id"]),
        literal(prediction["model"]),
        literal(images),
        literal(round(params["width"] * params["height"] / 2**20, 4), Numeric(10, 4)),
        literal(params["num_inference_steps"]),
        price,
        price * images,
    ).where(tenants.c.id == prediction["tenant_id"])
    columns = ["prediction_id", "tenant_id", "api_key_id", "model", "images", "megapixels", "steps"]
    return insert(usage_records).from_select([*columns, "price_per_image", "amount"], source)


def totals(tenant_id: str | None, start: Any, end: Any) -> Select[Any]:
    """Totals per day and model (and tenant), for created_at in [start, end)."""
    day = cast(usage_records.c.created_at, Date).label("day")
    query = select(
        usage_records.c.tenant_id,
        day,
        usage_records.c.model,
        func.count().label("predictions"),
        func.sum(usage_records.c.images).label("images"),
        func.sum(usage_records.c.megapixels * usage_records.c.images).label("megapixels"),
        func.sum(usage_records.c.amount).label("amount"),
    ).where(usage_records.c.created_at >= start, usage_records.c.created_at < end)
    if tenant_id is not None:
        query = query.where(usage_records.c.tenant_id == tenant_id)
    return query.group_by(usage_records.c.tenant_id, day, usage_records.c.model).order_by(
        usage_records.c.tenant_id, day, usage_records.c.model
    )
