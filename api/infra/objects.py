"""Reading and storing objects, and serving them as files."""

from __future__ import annotations

import asyncio
from typing import IO

from boto3.s3.transfer import TransferConfig
from fastapi import Response

from api.context import AppContext
from api.infra.fetch import Sink
from core.netguard import FetchError

PIECE = 2**20  # bytes read from storage at a time
# Files are stored in 8 MiB parts (multipart above that), one at a time: boto3 copies each part into memory
# to send it (about 14 MiB of the API's memory while a 64 MiB file is stored; two at a time cost 36 MiB).
UPLOAD = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=1)
UPLOAD.max_in_memory_upload_chunks = 1  # s3transfer's setting, not among boto3's arguments (its default: 10)


async def read_object(ctx: AppContext, key: str) -> bytes:
    obj = await asyncio.to_thread(ctx.s3.get_object, Bucket=ctx.settings.s3_bucket, Key=key)
    return await asyncio.to_thread(obj["Body"].read)


async def put_object(ctx: AppContext, key: str, data: bytes, content_type: str) -> None:
    await asyncio.to_thread(
        ctx.s3.put_object, Bucket=ctx.settings.s3_bucket, Key=key, Body=data, ContentType=content_type
    )


async def read_object_into(ctx: AppContext, key: str, sink: Sink, max_bytes: int) -> None:
    """The object into `sink` a piece at a time; FetchError if it is larger than `max_bytes`."""
    obj = await asyncio.to_thread(ctx.s3.get_object, Bucket=ctx.settings.s3_bucket, Key=key)
    body = obj["Body"]
    try:
        if obj["ContentLength"] > max_bytes:
            raise FetchError(f"the file is larger than {max_bytes} bytes")
        while chunk := await asyncio.to_thread(body.read, PIECE):
            await sink.write(chunk)
    finally:
        body.close()


async def put_file(ctx: AppContext, key: str, file: IO[bytes], content_type: str) -> None:
    """Store a file from its start, read in parts (never whole) in a thread."""
    file.seek(0)
    await asyncio.to_thread(
        ctx.s3.upload_fileobj, file, ctx.settings.s3_bucket, key, ExtraArgs={"ContentType": content_type}, Config=UPLOAD
    )


def file_response(data: bytes, content_type: str, max_age_s: int) -> Response:
    return Response(
        data,
        media_type=content_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": f"private, max-age={max_age_s}"},
    )
