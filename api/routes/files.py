"""Uploads of reference images and LoRA adapters: `POST /v1/files` (multipart field `content`), `GET /v1/files/{id}`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Invalid
from api.infra.objects import file_response, read_object
from api.routes import batches
from api.routes.openapi_errors import errors, image
from api.services.auth import Authenticated
from api.services.batches import file_object
from api.services.files import file_url, store_upload, stored_file

router = APIRouter(tags=["files"], responses=errors(401, 429, 503))
Ctx = Annotated[AppContext, Depends(get_ctx)]


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
                        "description": "a PNG, JPEG or WebP image, or a LoRA adapter (.safetensors); also `file` "
                        "with `purpose=batch`: a batch's JSONL input (OpenAI's Files API, docs/batch.md)",
                    }
                },
            }
        }
    },
}


@router.post("/v1/files", status_code=201, openapi_extra={"requestBody": _UPLOAD}, responses=errors(400, 413, 422))
async def upload_file(request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    async with request.form(max_files=1, max_fields=10) as form:  # its files closed (and deleted) on the way out
        upload = form.get("content") or form.get("file")
        if form.get("purpose") == "batch" and isinstance(upload, UploadFile):  # OpenAI's Files API: a batch's input
            return await batches.upload(request, ctx, principal, upload)
        if not isinstance(upload, UploadFile):
            raise Invalid("invalid request: content: send the image as multipart form field `content`")
        row = await store_upload(ctx, principal, upload)
    url = file_url(public_base_url(request, ctx.settings), row["id"])
    body = {name: row[name] for name in ("id", "content_type", "bytes", "width", "height")}
    body |= {"url": url, "urls": {"get": url}, "expires_at": row["expires_at"].isoformat()}
    return JSONResponse(body, status_code=201)


@router.get(
    "/v1/files/{file_id}", response_class=Response, responses={**image("The uploaded image"), **errors(404, 422)}
)
async def download_file(file_id: str, principal: Authenticated, ctx: Ctx) -> Response:
    row = await stored_file(ctx, principal, file_id)
    if row["purpose"] is not None:  # a batch's file: OpenAI's file object (its bytes: /v1/files/{id}/content)
        return JSONResponse(file_object(row))
    return file_response(await read_object(ctx, row["key"]), row["content_type"], max_age_s=3600)
