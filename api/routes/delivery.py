"""Delivery of output files: `GET /v1/predictions/delivery/{id}/{filename}`.

With an API key: served when the caller's tenant owns the prediction (others get 404).
Without one: served only on a valid, unexpired signature (see core/signing.py).
Either way, an expired or deleted prediction's outputs answer 410 (api/services/retention.py).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from botocore.exceptions import ClientError
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from sqlalchemy import bindparam, select

from api.context import AppContext, get_ctx
from api.errors import Forbidden, NotFound
from api.infra.objects import file_response, read_object
from api.infra.pg import Statement
from api.routes.openapi_errors import Error, errors, image
from api.services import retention
from api.services.auth import authenticate, presented_key
from api.services.predictions import Row, fetch_or_404
from core import signing
from core.tables import predictions

router = APIRouter()
_READ_SIGNED = Statement(select(predictions).where(predictions.c.id == bindparam("id")))


async def outputs_base64(ctx: AppContext, row: Row) -> list[str]:
    """The outputs inline, for dialects that ask for base64 instead of URLs."""
    return [base64.b64encode(await read_output(ctx, row, output)).decode() for output in row["outputs"]]


async def read_output(ctx: AppContext, row: Row, output: dict[str, Any]) -> bytes:
    """An output's bytes, or 410 when the prediction expired or the object is gone from storage."""
    if row.get("expired_at") is not None:
        raise await retention.gone(ctx, row)
    try:
        return await read_object(ctx, output["key"])
    except ClientError as exc:
        if retention.is_missing(exc):
            raise await retention.gone(ctx, row) from None
        raise


def gone(shape: type[BaseModel] = Error) -> dict[int | str, dict[str, Any]]:
    """The documented 410 (api/routes/openapi_errors.py documents the other statuses)."""
    return {410: {"model": shape, "description": "The prediction's outputs expired or were deleted (data retention)"}}


@router.get(
    "/v1/predictions/delivery/{prediction_id}/{filename}",
    response_class=Response,
    responses={**image("The output file"), **errors(401, 403, 404, 422, 429, 503), **gone()},
)
async def deliver(
    prediction_id: str,
    filename: str,
    request: Request,
    ctx: Annotated[AppContext, Depends(get_ctx)],
    expires: int | None = None,
    signature: str | None = None,
) -> Response:
    row: Row | None
    if presented_key(request) is None and expires is not None and signature is not None:
        if not signing.verify(ctx.settings, prediction_id, filename, expires, signature):
            raise Forbidden("delivery link invalid or expired")
        row = await _READ_SIGNED.one(ctx.pg, id=prediction_id)  # the signature stands for the tenant
        if row is None:
            raise NotFound(f"prediction {prediction_id!r} not found")
    else:
        row = await fetch_or_404(ctx, await authenticate(request), prediction_id)
    output = next((o for o in row["outputs"] if o["filename"] == filename), None)
    if output is None:
        raise NotFound(f"output {filename!r} not found for prediction {prediction_id!r}")
    return file_response(await read_output(ctx, row, output), output["content_type"], max_age_s=3600)
