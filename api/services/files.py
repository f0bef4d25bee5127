"""Files a tenant gives us: uploads (reference images and LoRA adapters) checked off the event loop and stored,
and the tenant's stored files looked up. The routes are api/routes/files.py."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import IO, Any

from sqlalchemy import RowMapping, delete, func, insert, select
from starlette.datastructures import UploadFile

from api.context import AppContext
from api.errors import Invalid, NotFound, TooLarge
from api.infra.objects import put_file, put_object
from api.services.principals import Principal
from api.services.retention import duration
from core import images, lora
from core.ids import new_id
from core.tables import files, tenants


def file_url(base_url: str, file_id: str) -> str:
    return f"{base_url}/v1/files/{file_id}"


async def inspect_image(ctx: AppContext, data: bytes) -> images.ImageInfo:
    """images.inspect off the event loop (a 4096² PNG takes a core for a fifth of a second; Pillow lets go of
    the GIL while it decodes), at most `max_concurrent_decodes` at a time in this process."""
    settings = ctx.settings
    async with ctx.decodes:
        return await asyncio.to_thread(images.inspect, data, settings.max_image_bytes, settings.max_image_pixels)


async def inspect_lora(ctx: AppContext, file: IO[bytes]) -> lora.Inspected:
    """lora.inspect (header, layout, finite weights, sha256) of a spooled file, read in steps in a thread like
    the images' decoding and within the same bound (a 256 MiB LoRA takes a core for a few tenths of a second)."""
    async with ctx.decodes:
        return await asyncio.to_thread(lora.inspect, file)


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    await upload.seek(0)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"file larger than {max_bytes} bytes")
    return data


async def stored_file(ctx: AppContext, principal: Principal, file_id: str) -> RowMapping:
    """The tenant's unexpired upload, or 404 (another tenant's file reads as absent)."""
    statement = select(files).where(
        files.c.id == file_id, files.c.tenant_id == principal.tenant_id, files.c.expires_at > func.now()
    )
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(statement)).mappings().first()
    if row is None:
        raise NotFound(f"file {file_id!r} not found or expired")
    return row


async def store_upload(ctx: AppContext, principal: Principal, upload: UploadFile) -> RowMapping:
    """Check an uploaded image or LoRA where Starlette spooled it (in memory up to 1 MiB, then an unnamed
    temporary file), count it against the tenant's unexpired uploads, and store it; its files row."""
    values, store = await _checked(ctx, principal, upload)
    row = await _counted(ctx, principal, values)
    try:
        await store()
    except BaseException:
        async with ctx.engine.begin() as conn:
            await conn.execute(delete(files).where(files.c.id == row["id"]))
        raise
    return row


async def _checked(
    ctx: AppContext, principal: Principal, upload: UploadFile
) -> tuple[dict[str, Any], Callable[[], Awaitable[None]]]:
    """The upload's files row values, once it proved to be an image or a LoRA we take, and how to store it."""
    settings, size = ctx.settings, upload.size or 0
    if size > max(settings.max_image_bytes, settings.max_lora_bytes):
        raise TooLarge(f"file larger than {max(settings.max_image_bytes, settings.max_lora_bytes)} bytes")
    file_id = new_id()
    values: dict[str, Any] = {"id": file_id, "tenant_id": principal.tenant_id, "bytes": size}
    await upload.seek(0)
    if lora.looks_like_safetensors(await upload.read(9), size):  # a LoRA adapter (docs/lora.md)
        if size > settings.max_lora_bytes:
            raise TooLarge(f"LoRA larger than {settings.max_lora_bytes} bytes")
        try:
            await inspect_lora(ctx, upload.file)
        except lora.LoraError as exc:
            raise Invalid(f"invalid request: content: {exc}") from None
        values |= {"content_type": lora.CONTENT_TYPE, "key": f"{principal.tenant_id}/files/{file_id}.safetensors"}
        return values, functools.partial(put_file, ctx, values["key"], upload.file, lora.CONTENT_TYPE)
    data = await read_upload(upload, settings.max_image_bytes)
    try:
        info = await inspect_image(ctx, data)
    except images.BadImage as exc:
        raise Invalid(f"invalid request: content: {exc}") from None
    key = f"{principal.tenant_id}/files/{file_id}.{info.extension}"
    values |= {"content_type": info.content_type, "key": key, "width": info.width, "height": info.height}
    return values, functools.partial(put_object, ctx, key, data, info.content_type)


async def _counted(ctx: AppContext, principal: Principal, values: dict[str, Any]) -> RowMapping:
    """The upload's row, inserted once the tenant's unexpired uploads with it stay within
    KLEIN_MAX_TENANT_UPLOAD_BYTES (else a 413). A tenant's uploads are counted one at a time (the row lock, as
    its LoRAs are), so two cannot both squeeze in."""
    settings, tenant_id = ctx.settings, principal.tenant_id
    async with ctx.engine.begin() as conn:
        await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update(key_share=True))
        unexpired = files.c.tenant_id == tenant_id, files.c.expires_at > func.now()
        used = (await conn.execute(select(func.coalesce(func.sum(files.c.bytes), 0)).where(*unexpired))).scalar_one()
        if used + values["bytes"] > settings.max_tenant_upload_bytes:
            raise TooLarge(
                f"this account's unexpired uploads would exceed {settings.max_tenant_upload_bytes} bytes ({used} "
                f"held); an upload expires {duration(settings.upload_ttl_s)} after it was made"
            )
        values |= {"expires_at": func.now() + timedelta(seconds=settings.upload_ttl_s)}
        return (await conn.execute(insert(files).values(**values).returning(files))).mappings().one()


async def store_data(ctx: AppContext, principal: Principal, data: bytes, values: dict[str, Any]) -> RowMapping:
    """Store checked bytes as the tenant's file (a batch's input, api/services/batches.py): counted against its
    unexpired uploads like any upload. `values`: the files row's content_type, key suffix (`extension`), purpose
    and filename."""
    file_id = new_id()
    extension = values.pop("extension")
    values |= {"id": file_id, "tenant_id": principal.tenant_id, "bytes": len(data)}
    values["key"] = f"{principal.tenant_id}/files/{file_id}.{extension}"
    row = await _counted(ctx, principal, values)
    try:
        await put_object(ctx, row["key"], data, row["content_type"])
    except BaseException:
        async with ctx.engine.begin() as conn:
            await conn.execute(delete(files).where(files.c.id == row["id"]))
        raise
    return row
