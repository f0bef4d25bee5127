"""Delivery of output files: `GET /v1/predictions/delivery/{id}/{filename}`.

Streams the object from storage after checking that the caller's tenant owns the prediction.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from api.auth import Authenticated
from api.context import AppContext, get_ctx
from api.errors import ApiError
from api.predictions import fetch_or_404

router = APIRouter()


def delivery_url(base_url: str, prediction_id: str, filename: str) -> str:
    return f"{base_url}/v1/predictions/delivery/{prediction_id}/{filename}"


@router.get("/v1/predictions/delivery/{prediction_id}/{filename}", response_class=Response)
async def deliver(
    prediction_id: str, filename: str, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> Response:
    row = await fetch_or_404(ctx, principal, prediction_id)
    output = next((o for o in row["outputs"] if o["filename"] == filename), None)
    if output is None:
        raise ApiError(404, f"output {filename!r} not found for prediction {prediction_id!r}")
    obj = await asyncio.to_thread(ctx.s3.get_object, Bucket=ctx.settings.s3_bucket, Key=output["key"])
    body = await asyncio.to_thread(obj["Body"].read)
    return Response(
        content=body,
        media_type=output["content_type"],
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=86400"},
    )
