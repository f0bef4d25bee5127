"""LoRA adapters named by a request: read as they arrive (our uploads from storage, other URLs through the
SSRF-safe fetcher, at most KLEIN_MAX_LORA_BYTES decoded) into a `Spool` (memory up to SPOOL_BYTES, then an
unnamed temporary file), which refuses a file as soon as its header names layers the model's transformer lacks
or has in other sizes (as its workers published them) or its bytes pass what its header declares; then checked
in a thread, read in steps (safetensors only; a well-formed LoRA with finite weights), and stored from the file
only once the whole request is accepted (`store`, called by predictions.submit right before the insert): once per
tenant and content hash, counted against the tenant, deleted by the reaper once unused (core/retention.py). No
LoRA is ever held whole in the API's memory."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import orjson
from botocore.exceptions import ClientError
from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from api.context import AppContext
from api.errors import Invalid
from api.infra.objects import put_file
from api.services.files import inspect_lora
from api.services.principals import Principal
from api.services.references import own_hosts, read_url
from api.services.retention import duration
from core import lora
from core.netguard import FetchError
from core.tables import loras, tenants
from models.klein import LoraInput, LoraRef

TARGETS_TTL_S = 30.0
_targets: dict[str, tuple[float, dict[str, tuple[int, int]] | None]] = {}  # model → (read at, its LoRA targets)


SPOOL_BYTES = 2**20  # a LoRA arriving is held in memory up to this, then written to a temporary file


@dataclass(frozen=True)
class Adapter:
    """A LoRA a request named, checked and hashed, in its spooled file; not stored until `store`, which closes
    it (as `resolve` does when it refuses the request; a request refused in between lets go of it, and the file
    is closed and gone with its last reference: it never had a name in the temporary directory)."""

    ref: LoraRef
    file: IO[bytes]
    size: int
    field: str  # where the request named it: `input.loras[0].path`

    def close(self) -> None:
        self.file.close()


class Misfit(lora.LoraError):
    """A LoRA whose header names layers the model lacks or has in other sizes; the problems, for the client."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        super().__init__(shown)


class Spool:
    """A LoRA file as it arrives (an api.infra.fetch.Sink): in memory up to SPOOL_BYTES, then in an unnamed
    file in the temporary directory (tempfile's: $TMPDIR, else /tmp). Refused as soon as its first bytes show a
    lie or a misfit: a header over lora.MAX_HEADER_BYTES, a header declaring a file over `max_bytes` or layers
    that do not fit `fits` (the model's LoRA targets, when known), or more bytes than the header declares (a gzip
    bomb behind a valid header costs about a MiB, not `max_bytes`)."""

    def __init__(self, ctx: AppContext, max_bytes: int, fits: dict[str, tuple[int, int]] | None = None) -> None:
        self.ctx, self.max_bytes, self.fits = ctx, max_bytes, fits
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_BYTES)  # noqa: SIM115 (closed by its owner)
        self.size = 0
        self.head = bytearray()  # the first bytes, until the header is in
        self.declared: int | None = None  # the file's size, as its header says

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.declared is None:
            await self._read_header(chunk)
        if self.declared is not None and self.size > self.declared:
            raise lora.LoraError(
                f"the file has at least {self.size - self.declared} bytes after its last tensor (its header "
                f"declares {self.declared} bytes; padding is not accepted)"
            )
        if self.size > SPOOL_BYTES:  # on disk by now
            await asyncio.to_thread(self.file.write, chunk)
        else:
            self.file.write(chunk)

    async def _read_header(self, chunk: bytes) -> None:
        self.head += chunk
        if len(self.head) < 9 or len(self.head) < 8 + lora.header_length(bytes(self.head[:9])):
            return
        async with self.ctx.decodes:  # parsing up to a MiB of JSON: off the loop, like the other checks
            declared, layers = await asyncio.to_thread(lora.read_head, bytes(self.head))
        self.head = bytearray()
        if declared > self.max_bytes:
            raise lora.LoraError(f"its header declares a file of {declared} bytes; at most {self.max_bytes} are read")
        problems = lora.misfits(layers, self.fits) if self.fits else []
        if problems:  # refused before the tensors are read
            raise Misfit(problems)
        self.declared = declared


async def open_url(
    ctx: AppContext, principal: Principal, url: str, ours: set[str], fits: dict[str, tuple[int, int]] | None = None
) -> tuple[IO[bytes], lora.Inspected]:
    """The LoRA a URL names, spooled and checked (against `fits`, the model's LoRA targets, as soon as its
    header is in); the caller closes the file. LoraError (Misfit included) or FetchError say why not, for the
    client; the file is closed then."""
    max_bytes = ctx.settings.max_lora_bytes
    spool = Spool(ctx, max_bytes, fits)
    try:
        await read_url(ctx, principal, url, ours, spool, max_bytes)
        return spool.file, await inspect_lora(ctx, spool.file)
    except BaseException:
        spool.file.close()
        raise


async def resolve(
    ctx: AppContext, principal: Principal, request: Request, model: str, given: Sequence[LoraInput], field: str
) -> tuple[Adapter, ...]:
    """Each LoRA read and checked; a bad one is a 422 naming `field[i].path` (the others stop then, and every
    file is closed). Nothing is stored here."""
    if not given:
        return ()
    settings = ctx.settings
    if len(given) > settings.max_loras:
        raise Invalid(f"invalid request: {field}: at most {settings.max_loras} LoRAs, got {len(given)}")
    ours, fits = own_hosts(request, ctx), await targets(ctx, model)

    async def one(index: int, named: LoraInput) -> Adapter:
        where = f"{field}[{index}].path"
        try:
            file, inspected = await open_url(ctx, principal, named.path, ours, fits)
        except Misfit as exc:
            raise Invalid(f"invalid request: {where}: this LoRA does not fit {model}: {exc}") from None
        except (lora.LoraError, FetchError) as exc:
            raise Invalid(f"invalid request: {where}: {exc}") from None
        return Adapter(
            LoraRef(tenant_id=principal.tenant_id, sha256=inspected.sha256, scale=named.scale),
            file,
            inspected.size,
            where,
        )

    tasks: list[asyncio.Task[Adapter]] = []
    try:
        async with asyncio.TaskGroup() as group:  # the first refusal cancels the other reads
            tasks = [group.create_task(one(index, named)) for index, named in enumerate(given)]
    except BaseException as exc:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
        if isinstance(exc, BaseExceptionGroup):
            raise exc.exceptions[0] from None  # the first refusal: a 422 naming its LoRA
        raise
    return tuple(task.result() for task in tasks)


async def targets(ctx: AppContext, model: str) -> dict[str, tuple[int, int]] | None:
    """The layers a LoRA of `model` may name, as its workers published them at start (worker/runtime.py); None
    until one has (then the worker checks before it runs)."""
    cached = _targets.get(model)
    if cached is None or time.monotonic() - cached[0] >= TARGETS_TTL_S:
        raw = await ctx.redis.get(lora.targets_key(ctx.settings.queue_name, model))
        table = {name: (shape[0], shape[1]) for name, shape in orjson.loads(raw).items()} if raw else None
        cached = _targets[model] = (time.monotonic(), table)
    return cached[1]


async def store(ctx: AppContext, principal: Principal, adapters: Sequence[Adapter]) -> tuple[LoraRef, ...]:
    """Count the adapters as used by the tenant now (within its KLEIN_MAX_TENANT_LORA_BYTES, else a 422), then
    store each object from its file unless storage has it; the files are closed on the way out, stored or not.
    The rows come first: the reaper deletes only objects whose row is older than KLEIN_LORA_RETENTION_S, so it
    cannot take one from under this request."""
    if not adapters:
        return ()
    try:
        return await _store(ctx, principal, adapters)
    finally:
        for adapter in adapters:
            adapter.close()


async def _store(ctx: AppContext, principal: Principal, adapters: Sequence[Adapter]) -> tuple[LoraRef, ...]:
    tenant_id, settings = principal.tenant_id, ctx.settings
    unique = {adapter.ref.sha256: adapter for adapter in adapters}
    async with ctx.engine.begin() as conn:
        # A tenant's LoRAs are counted one request at a time (the row lock), so two cannot both squeeze in.
        await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update(key_share=True))
        held = select(func.coalesce(func.sum(loras.c.bytes), 0)).where(loras.c.tenant_id == tenant_id)
        used = (await conn.execute(held)).scalar_one()
        named = loras.c.tenant_id == tenant_id, loras.c.sha256.in_(unique)
        known = set((await conn.execute(select(loras.c.sha256).where(*named))).scalars())
        new = [adapter for sha256, adapter in unique.items() if sha256 not in known]
        if new and used + sum(adapter.size for adapter in new) > settings.max_tenant_lora_bytes:
            raise Invalid(
                f"invalid request: {new[0].field}: this account's stored LoRAs would exceed "
                f"{settings.max_tenant_lora_bytes} bytes ({used} stored); a LoRA is deleted "
                f"{duration(settings.lora_retention_s)} after a request last named it"
            )
        ordered = sorted(unique)  # rows locked in one order by every request
        rows = [{"tenant_id": tenant_id, "sha256": sha256, "bytes": unique[sha256].size} for sha256 in ordered]
        keys, touched = [loras.c.tenant_id, loras.c.sha256], {"last_used_at": func.now()}
        await conn.execute(insert(loras).values(rows).on_conflict_do_update(index_elements=keys, set_=touched))
    stored = await asyncio.gather(*(_put_once(ctx, adapter) for adapter in unique.values()), return_exceptions=True)
    for outcome in stored:  # each put finished with its file before `store` closes them
        if isinstance(outcome, BaseException):
            raise outcome
    return tuple(adapter.ref for adapter in adapters)


async def _put_once(ctx: AppContext, adapter: Adapter) -> None:
    """Stored once per tenant: the same bytes from any of its requests are the same object. Whether the object
    is there tells only what this tenant sent before, as it is never another tenant's (lora.object_key)."""
    try:
        await asyncio.to_thread(ctx.s3.head_object, Bucket=ctx.settings.s3_bucket, Key=adapter.ref.key)
    except ClientError:
        await put_file(ctx, adapter.ref.key, adapter.file, lora.CONTENT_TYPE)
