"""Batch jobs, the API's side (docs/batch.md): input files checked, batches created (OpenAI's from a JSONL file, the
native one from a list of inputs) and fed (core/batches.py), read, listed and canceled, and their output and
error files rendered from the rows when downloaded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import RowMapping, func, insert, select, tuple_, update
from starlette.datastructures import UploadFile

from api.context import AppContext
from api.errors import BadRequest, NotFound, OverCapacity, ServiceError, answer
from api.infra.objects import read_object
from api.services import predictions
from api.services.auth import Principal
from api.services.files import read_upload, store_data, stored_file
from core import batches
from core.ids import new_id
from core.queue import kick_webhooks
from core.tables import batch_requests as r
from core.tables import batches as b
from core.tables import predictions as p

ENDPOINT = "/v1/images/generations"
MAX_CUSTOM_ID = 512
MAX_INPUTS = 10_000  # a native batch's inputs per request (its body is bounded by max_body_bytes too)
PAGE = 200  # lines rendered per read of the rows


@dataclass(frozen=True)
class Line:
    line: int
    custom_id: str
    model: str | None = None
    input: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


async def store_input(ctx: AppContext, principal: Principal, upload: UploadFile) -> RowMapping:
    """A batch's input file (`purpose=batch`): UTF-8 JSONL within the bounds, stored as the tenant's file. Its
    lines are checked one by one when a batch is created from it (a bad line fails alone)."""
    predictions.require_active(principal)
    settings = ctx.settings
    data = await read_upload(upload, settings.batch_max_file_bytes)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BadRequest("invalid request: file: a batch file is UTF-8 text, one JSON request per line") from None
    count = sum(1 for line in text.splitlines() if line.strip())
    if count == 0:
        raise BadRequest("invalid request: file: no requests (one JSON request per line)")
    if count > settings.batch_max_lines:
        raise BadRequest(f"invalid request: file: {count} requests, at most {settings.batch_max_lines} per batch file")
    values = {"content_type": "application/jsonl", "extension": "jsonl", "purpose": "batch"}
    return await store_data(ctx, principal, data, values | {"filename": (upload.filename or "batch.jsonl")[:255]})


def file_object(row: RowMapping) -> dict[str, Any]:
    """A file as OpenAI's Files API shows it (openai.types.FileObject)."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created_at"].timestamp()),
        "expires_at": int(row["expires_at"].timestamp()),
        "filename": row["filename"] or row["id"],
        "purpose": row["purpose"] or "vision",
        "status": "processed",
        "status_details": None,
    }


def line_error(number: int, custom_id: str, exc: ServiceError, param: str | None = None) -> Line:
    error = answer(exc)
    assert error is not None
    detail = error.extra.get("detail") or [{}]
    param = param or ".".join(str(part) for part in detail[0].get("loc", [])) or None
    code = error.extra.get("code")
    return Line(
        number, custom_id, error={"status": error.status, "message": error.message, "param": param, "code": code}
    )


async def input_text(ctx: AppContext, principal: Principal, file_id: object) -> str:
    """The text of the tenant's `purpose=batch` file named by a batch's `input_file_id`."""
    if not isinstance(file_id, str):
        raise BadRequest("invalid request: input_file_id: the id of a file uploaded with purpose `batch`")
    stored = await stored_file(ctx, principal, file_id)
    if stored["purpose"] != "batch":
        raise BadRequest(f"invalid request: input_file_id: file {file_id!r} was not uploaded with purpose `batch`")
    return (await read_object(ctx, stored["key"])).decode()


def window(ctx: AppContext, value: object) -> tuple[str, int]:
    """(the completion window as given, its seconds): `24h` by default, within the bounds."""
    value = "24h" if value is None else value
    seconds = batches.window_s(value) if isinstance(value, str) else None
    low, high = ctx.settings.batch_min_window_s, 7 * 86400
    if seconds is None or not low <= seconds <= high:
        raise BadRequest(f"invalid request: completion_window: a duration such as `24h`, from {low} s to 7 days")
    return str(value), seconds


def metadata(value: object) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise BadRequest("invalid request: metadata: at most 16 string pairs, keys ≤ 64 and values ≤ 512 characters")
    return value


async def create(
    ctx: AppContext,
    principal: Principal,
    lines: list[Line],
    completion: tuple[str, int],
    values: dict[str, Any],
    base_url: str | None = None,
) -> dict[str, Any]:
    """Store the batch and its lines (at most `batch_max_in_flight` of the tenant's open at once), then feed it."""
    settings, batch_id = ctx.settings, new_id()
    async with ctx.engine.begin() as conn:
        await conn.execute(batches.with_lock(principal.tenant_id))
        if (await conn.execute(batches.open_count(principal.tenant_id))).scalar_one() >= settings.batch_max_in_flight:
            raise OverCapacity(
                f"this account has {settings.batch_max_in_flight} batches in progress, the most it may have; "
                "create another once one has ended",
                code="batch_limit_exceeded",
            )
        row = (
            (
                await conn.execute(
                    insert(b)
                    .values(
                        id=batch_id,
                        tenant_id=principal.tenant_id,
                        api_key_id=principal.api_key_id,
                        completion_window=completion[0],
                        expires_at=func.now() + timedelta(seconds=completion[1]),
                        total=len(lines),
                        **values,
                    )
                    .returning(b)
                )
            )
            .mappings()
            .one()
        )
        rows = [
            {
                "batch_id": batch_id,
                "line": line.line,
                "custom_id": line.custom_id,
                "model": line.model,
                "input": line.input,
                "params": line.params,
                "error": line.error,
            }
            for line in lines
        ]
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(r), rows[start : start + 5000])
    await feed(ctx)
    refused = sum(line.error is not None for line in lines)
    return batches.batch_object(dict(row), (0, refused), base_url)


async def feed(ctx: AppContext) -> None:
    """core.batches.feed on the API's connection, then its predictions to the broker."""
    async with ctx.engine.begin() as conn:
        fed = await conn.run_sync(batches.feed, ctx.settings)
    if fed:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            batches.push(pipe, ctx.settings, fed)
            await pipe.execute()


async def _row(ctx: AppContext, principal: Principal, batch_id: str) -> RowMapping:
    async with ctx.engine.connect() as conn:
        statement = select(b).where(b.c.id == batch_id, b.c.tenant_id == principal.tenant_id)
        row = (await conn.execute(statement)).mappings().first()
    if row is None:
        raise NotFound(f"batch {batch_id!r} not found")
    return row


async def _view(ctx: AppContext, row: RowMapping, base_url: str) -> dict[str, Any]:
    if row["status"] in batches.OPEN:
        async with ctx.engine.connect() as conn:
            done = tuple((await conn.execute(batches.counts(row["id"]))).one())
    else:
        done = (row["completed"], row["failed"])
    return batches.batch_object(dict(row), (int(done[0]), int(done[1])), base_url)


async def read(ctx: AppContext, principal: Principal, batch_id: str, base_url: str) -> dict[str, Any]:
    return await _view(ctx, await _row(ctx, principal, batch_id), base_url)


async def listing(
    ctx: AppContext, principal: Principal, after: str | None, limit: int, base_url: str
) -> dict[str, Any]:
    """The tenant's batches, newest first, OpenAI's cursor page (`after`: the last id of the previous page)."""
    query = select(b).where(b.c.tenant_id == principal.tenant_id)
    if after:
        cursor = select(b.c.created_at, b.c.id).where(b.c.id == after, b.c.tenant_id == principal.tenant_id)
        query = query.where(tuple_(b.c.created_at, b.c.id) < cursor.scalar_subquery())
    query = query.order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit + 1)
    async with ctx.engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    data = [await _view(ctx, row, base_url) for row in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


async def cancel(ctx: AppContext, principal: Principal, batch_id: str, base_url: str) -> dict[str, Any]:
    """Stop what has not started (unfed lines, queued predictions); what runs finishes and is kept. The batch is
    `cancelling` until then, `cancelled` after (at once when nothing runs). An ended batch is returned as it is."""
    async with ctx.engine.begin() as conn:
        await conn.execute(select(func.pg_advisory_xact_lock(batches.FEED_LOCK)))  # no feed between here and the end
        stopped = await conn.execute(
            update(b)
            .where(b.c.id == batch_id, b.c.tenant_id == principal.tenant_id, b.c.status == "in_progress")
            .values(status="cancelling", cancelling_at=func.now())
            .returning(b.c.id)
        )
        queued = (await conn.execute(batches.queued_of([batch_id]))).all() if stopped.first() else []
    for prediction_id, tenant_id in queued:
        await predictions.cancel_of(ctx, tenant_id, prediction_id)
    async with ctx.engine.begin() as conn:
        kicks = await conn.run_sync(batches.finalize, ctx.settings, batch_id)
    if kicks:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for prediction_id in kicks:
                kick_webhooks(pipe, ctx.settings, prediction_id)
            await pipe.execute()
    return await read(ctx, principal, batch_id, base_url)


Result = Callable[[RowMapping, dict[str, Any]], Awaitable[dict[str, Any]]]  # (batch, prediction) → response body


async def file_content(ctx: AppContext, principal: Principal, file_id: str, result: Result) -> AsyncIterator[bytes]:
    """A file's bytes: an upload as stored, a batch's output or error file rendered from its rows now (`result`:
    a completed line's response body in the batch's dialect, its links signed now)."""
    stored = await stored_file(ctx, principal, file_id)
    if stored["purpose"] != "batch_output":
        data = await read_object(ctx, stored["key"])
        return _once(data)
    batch = await _row(ctx, principal, stored["batch_id"])
    return _render(ctx, batch, file_id == batch["output_file_id"], result)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _render(ctx: AppContext, batch: RowMapping, outputs: bool, result: Result) -> AsyncIterator[bytes]:
    after = 0
    while True:
        query = (
            select(r.c.line, r.c.custom_id, r.c.error.label("refused"), p)
            .select_from(r.outerjoin(p, p.c.id == r.c.prediction_id))
            .where(r.c.batch_id == batch["id"], r.c.line > after)
            .order_by(r.c.line)
            .limit(PAGE)
        )
        async with ctx.engine.connect() as conn:
            page = (await conn.execute(query)).mappings().all()
        if not page:
            return
        chunk = []
        for row in page:
            done = row["status"] == "completed"
            if done == outputs:
                chunk.append(orjson.dumps(await _line(batch, row, result)) + b"\n")
        yield b"".join(chunk)
        after = page[-1]["line"]


async def _line(batch: RowMapping, row: RowMapping, result: Result) -> dict[str, Any]:
    """One line of an output or error file (OpenAI's BatchRequestOutput)."""
    line_id = "batch_req_" + (row["id"] or f"{batch['id']}_{row['line']}")
    base = {"id": line_id, "custom_id": row["custom_id"]}
    prediction = {column.name: row[column.name] for column in p.c}
    if row["status"] == "completed":
        try:
            body = await result(batch, prediction)
        except ServiceError as exc:
            error = answer(exc)
            assert error is not None
            return base | {"response": _error_response(error.status, error.message, None), "error": None}
        return base | {"response": {"status_code": 200, "request_id": row["id"], "body": body}, "error": None}
    if row["refused"] is not None:
        refused = row["refused"]
        response = _error_response(refused["status"], refused["message"], refused["param"], refused["code"])
        return base | {"response": response, "error": None}
    if row["status"] == "failed":
        return base | {"response": _error_response(500, row["error"] or "failed", None), "error": None}
    if batch["status"] == "expired":
        code, message = "batch_expired", "the request did not run before the batch's completion window ended"
    else:
        code, message = "batch_cancelled", "the batch was cancelled before this request ran"
    return base | {"response": None, "error": {"code": code, "message": message}}


def _error_response(status: int, message: str, param: str | None, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return {"status_code": status, "request_id": None, "body": {"error": error}}
