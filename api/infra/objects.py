"""Reading stored objects and serving them as files."""

from __future__ import annotations

import asyncio

from fastapi import Response

from api.context import AppContext


async def read_object(ctx: AppContext, key: str) -> bytes:
    obj = await asyncio.to_thread(ctx.s3.get_object, Bucket=ctx.settings.s3_bucket, Key=key)
    return await asyncio.to_thread(obj["Body"].read)


async def put_object(ctx: AppContext, key: str, data: bytes, content_type: str) -> None:
    await asyncio.to_thread(
        ctx.s3.put_object, Bucket=ctx.settings.s3_bucket, Key=key, Body=data, ContentType=content_type
    )


def file_response(data: bytes, content_type: str, max_age_s: int) -> Response:
    return Response(
        data,
        media_type=content_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": f"private, max-age={max_age_s}"},
    )
