"""Uploads of reference images and LoRA adapters: `POST /v1/files` (multipart field `content`), `GET /v1/files/{id}`."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import RowMapping, func, insert, select
from starlette.datastructures import UploadFile

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Invalid, NotFound, TooLarge
from api.infra.objects import file_response, put_object, read_object
from api.routes.openapi_errors import errors, image
from api.services.auth import Authenticated, Principal
from core import images, lora
from core.ids import new_id
from core.tables import files

router = APIRouter(tags=["files"], responses=errors(401, 429, 503))
Ctx = Annotated[AppContext, Depends(get_ctx)]


def file_url(base_url: str, file_id: str) -> str:
    return f"{base_url}/v1/files/{file_id}"


async def inspect_image(ctx: AppContext, data: bytes) -> images.ImageInfo:
    """images.inspect off the event loop (a 4096² PNG takes a core for a fifth of a second; Pillow lets go of
    the GIL while it decodes), at most `max_concurrent_decodes` at a time in this process."""
    settings = ctx.settings
    async with ctx.decodes:
        return await asyncio.to_thread(images.inspect, data, settings.max_image_bytes, settings.max_image_pixels)


async def inspect_lora(ctx: AppContext, data: bytes) -> tuple[dict[str, lora.Pair], str]:
    """lora.inspect (header, layout, finite weights) and the file's sha256, off the event loop like the images'
    decoding and within the same bound (a 256 MiB LoRA takes a core for a few tenths of a second)."""
    async with ctx.decodes:
        return await asyncio.to_thread(_inspect_lora, data)


def _inspect_lora(data: bytes) -> tuple[dict[str, lora.Pair], str]:
    return lora.inspect(data), hashlib.sha256(data).hexdigest()


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
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


_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["content"],
                "properties": {
                    "content": {
                        "type": "string",
                        "format": "binary",
                        "description": "a PNG, JPEG or WebP image, or a LoRA adapter (.safetensors)",
                    }
                },
            }
        }
    },
}


@router.post("/v1/files", status_code=201, openapi_extra={"requestBody": _UPLOAD}, responses=errors(400, 413, 422))
async def upload_file(request: Request, principal: Authenticated, ctx: Ctx) -> JSONResponse:
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("content") or form.get("file")
    if not isinstance(upload, UploadFile):
        raise Invalid("invalid request: content: send the image as multipart form field `content`")
    settings = ctx.settings
    data = await read_upload(upload, max(settings.max_image_bytes, settings.max_lora_bytes))
    file_id = new_id()
    values: dict[str, Any] = {"id": file_id, "tenant_id": principal.tenant_id, "bytes": len(data)}
    if lora.looks_like_safetensors(data):  # a LoRA adapter (docs/lora.md), checked as one
        if len(data) > settings.max_lora_bytes:
            raise TooLarge(f"LoRA larger than {settings.max_lora_bytes} bytes")
        try:
            await inspect_lora(ctx, data)
        except lora.LoraError as exc:
            raise Invalid(f"invalid request: content: {exc}") from None
        values |= {"content_type": lora.CONTENT_TYPE, "key": f"{principal.tenant_id}/files/{file_id}.safetensors"}
    else:
        if len(data) > settings.max_image_bytes:
            raise TooLarge(f"file larger than {settings.max_image_bytes} bytes")
        try:
            info = await inspect_image(ctx, data)
        except images.BadImage as exc:
            raise Invalid(f"invalid request: content: {exc}") from None
        key = f"{principal.tenant_id}/files/{file_id}.{info.extension}"
        values |= {"content_type": info.content_type, "key": key, "width": info.width, "height": info.height}
    await put_object(ctx, values["key"], data, values["content_type"])
    values["expires_at"] = func.now() + timedelta(seconds=settings.upload_ttl_s)
    async with ctx.engine.begin() as conn:
        row = (await conn.execute(insert(files).values(**values).returning(files))).mappings().one()
    url = file_url(public_base_url(request, ctx.settings), file_id)
    body = {name: row[name] for name in ("id", "content_type", "bytes", "width", "height")}
    body |= {"url": url, "urls": {"get": url}, "expires_at": row["expires_at"].isoformat()}
    return JSONResponse(body, status_code=201)


@router.get(
    "/v1/files/{file_id}", response_class=Response, responses={**image("The uploaded image"), **errors(404, 422)}
)
async def download_file(file_id: str, principal: Authenticated, ctx: Ctx) -> Response:
    row = await stored_file(ctx, principal, file_id)
    return file_response(await read_object(ctx, row["key"]), row["content_type"], max_age_s=3600)
