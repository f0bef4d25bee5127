"""Reference images from a request — uploads, URLs, base64 data URIs — checked and loaded as bytes (in
memory: Pillow reads an image whole, and each is at most KLEIN_MAX_IMAGE_BYTES).

A URL of a file uploaded to this server is read from storage, not fetched over HTTP; any other
URL goes through the SSRF-safe fetcher. Every image is size-checked and decoded before it is
accepted, so a worker never receives something it cannot open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from api.context import AppContext, public_base_url
from api.errors import Invalid, ServiceError
from api.infra.fetch import FetchError, Sink, fetch_into, in_memory
from api.infra.objects import read_object_into
from api.services.auth import Principal
from api.services.files import inspect_image, stored_file
from core import images
from models.klein import MAX_REFERENCES

OWN_FILE_PATH = re.compile(r"^/v1/files/([A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Reference:
    data: bytes
    info: images.ImageInfo


async def resolve(
    ctx: AppContext, principal: Principal, request: Request, sources: Sequence[str | bytes], field: str
) -> list[Reference]:
    """Load and check every reference; a bad one is a 422 naming `field[i]`."""
    if not sources:
        return []
    if len(sources) > MAX_REFERENCES:
        raise Invalid(f"invalid request: {field}: at most {MAX_REFERENCES} reference images, got {len(sources)}")
    ours = own_hosts(request, ctx)

    async def one(index: int, source: str | bytes) -> Reference:
        try:
            data = source if isinstance(source, bytes) else await _load(ctx, principal, source, ours)
            info = await inspect_image(ctx, data)
        except (images.BadImage, FetchError) as exc:
            raise Invalid(f"invalid request: {field}[{index}]: {exc}") from None
        return Reference(data, info)

    return list(await asyncio.gather(*(one(i, source) for i, source in enumerate(sources))))


def own_hosts(request: Request, ctx: AppContext) -> set[str]:
    """The hosts whose /v1/files URLs name this server's uploads."""
    return {urlsplit(public_base_url(request, ctx.settings)).netloc, request.url.netloc}


async def read_url(ctx: AppContext, principal: Principal, url: str, ours: set[str], sink: Sink, max_bytes: int) -> None:
    """The bytes an http(s) URL names into `sink`, as they arrive: the tenant's upload when it is one of ours
    (from storage, not over HTTP), else what the SSRF-safe fetcher gets. FetchError says why not, for the client."""
    parts = urlsplit(url.strip())
    own = OWN_FILE_PATH.match(parts.path)
    if own and parts.netloc in ours:
        try:
            row = await stored_file(ctx, principal, own.group(1))
        except ServiceError as exc:
            raise FetchError(exc.message) from None
        await read_object_into(ctx, row["key"], sink, max_bytes)
        return
    if parts.scheme not in ("http", "https"):
        raise FetchError("must be an http(s) URL")
    settings = ctx.settings
    await fetch_into(url.strip(), sink, max_bytes, settings.fetch_timeout_s, settings.fetch_allowlist)


async def _load(ctx: AppContext, principal: Principal, source: str, ours: set[str]) -> bytes:
    source = source.strip()
    if source.startswith("data:"):
        return _data_uri(source, ctx.settings.max_image_bytes)
    if urlsplit(source).scheme not in ("http", "https"):
        raise images.BadImage("must be an http(s) URL or a base64 data URI (data:image/png;base64,...)")
    return await in_memory(lambda sink: read_url(ctx, principal, source, ours, sink, ctx.settings.max_image_bytes))


def _data_uri(uri: str, max_bytes: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise images.BadImage("data URIs must be base64: data:image/png;base64,...")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise images.BadImage(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise images.BadImage("data URI is not valid base64") from None
