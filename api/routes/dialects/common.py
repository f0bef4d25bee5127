"""What every dialect shares, written once: model lookup, seeds, sizes, the synchronous wait's answers, timestamps.

A dialect module is its request model (with `to_params`), its status words and its renderer; it calls these.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.convertors import PathConvertor, register_url_convertor

from api.errors import CONTENT_POLICY, ContentRefused, GenerationFailed, Invalid, NotFound, TimedOut
from api.infra.rows import Row
from core.deadlines import DEADLINE_EXCEEDED, Deadline
from core.ids import random_seed
from core.lifecycle import Status
from core.settings import Settings
from models.klein import floor16
from models.registry import ModelSpec, known_ids, resolve


class AnyPath(PathConvertor):
    """Starlette's `path`, newlines included, as `{name:any_path}`: a path with a %0A in it is still the dialect's
    route (401, 404 in the dialect's shape), not an unmatched URL."""

    regex = r"[\s\S]*"


register_url_convertor("any_path", AnyPath())


def lookup_model(name: str | None, body_field: str | None = None) -> ModelSpec:
    """The model `name` names. Unknown: 404 where the request addresses the model as a resource (a path, a
    header; OpenAI answers `model_not_found` with 404), 422 naming `body_field` where the provider documents
    the model as one of the body's parameters (Klein generate, 1min)."""
    spec = resolve(name) if name else None
    if spec is not None:
        return spec
    known = known_ids()
    if body_field is not None:
        raise Invalid(f"invalid request: {body_field}: unknown model {name!r}; known: {', '.join(known)}")
    raise NotFound(f"unknown model {name!r}", known_models=known)


def served_model(name: str | None, settings: Settings, body_field: str | None = None) -> ModelSpec:
    """`lookup_model` for a submit: also refused (404, or 422 naming `body_field`) when no worker pool of this
    deployment serves the model (KLEIN_SERVED_MODELS), rather than queued where nothing will ever take it."""
    spec = lookup_model(name, body_field)
    if spec.id in settings.served_models:
        return spec
    served = ", ".join(settings.served_models)
    message = f"model {spec.id!r} is not served by this deployment; served: {served}"
    if body_field is not None:
        raise Invalid(f"invalid request: {body_field}: {message}")
    raise NotFound(message, served_models=list(settings.served_models))


def seed_or_random(seed: int | None) -> int:
    """A seed as the client gave it, or a random one (None or -1) that is then recorded and reported."""
    return seed if seed is not None and seed >= 0 else random_seed()


def parse_size(size: str, low: int, high: int, example: str) -> tuple[int, int]:
    """`W*H` or `WxH` (each side low–high) as multiples of 16, rounded down; ValueError says what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*[*x×]\s*(\d+)\s*", size)
    if not match or not all(low <= int(side) <= high for side in match.groups()):
        separator = example.strip("0123456789")
        raise ValueError(f"must be WIDTH{separator}HEIGHT with each side {low}–{high}, e.g. {example}")
    return floor16(int(match.group(1))), floor16(int(match.group(2)))


def header_deadline(header: str, value: str | None, parse: Callable[[str], float], running: bool) -> Deadline | None:
    """The deadline a request header sets (core/deadlines.py), or None without one; a malformed or out-of-bounds
    value is a 422 naming the header."""
    if value is None:
        return None
    try:
        return Deadline(parse(value), running)
    except ValueError as exc:
        detail = [{"loc": ["header", header], "msg": str(exc), "type": "value_error"}]
        raise Invalid(f"invalid request: {header} header: {exc}", detail=detail) from None


def deadline_exceeded(row: Row) -> bool:
    """Whether the prediction was canceled for its deadline (core/deadlines.py)."""
    return row["status"] == Status.CANCELED and row["error"] == DEADLINE_EXCEEDED


def completed(row: Row, wait_s: float) -> Row:
    """The synchronous dialects' answer to a prediction after its wait: the row when it completed, else 400 (its
    outputs blocked by the content policy), 500 (failed or canceled, with the reason) or 504 (still running; it
    carries on, and its id is given; or canceled for its deadline)."""
    status = Status(row["status"])
    if status is Status.COMPLETED:
        return row
    if status is Status.FAILED and (row.get("safety") or {}).get("blocked"):
        raise ContentRefused(row["error"], code=CONTENT_POLICY, id=row["id"])
    if deadline_exceeded(row):
        raise TimedOut(f"generation canceled: {DEADLINE_EXCEEDED} (id {row['id']})")
    if status.terminal:
        raise GenerationFailed(f"generation {status.value}: {row['error'] or 'no reason recorded'}")
    raise TimedOut(f"generation exceeded the {wait_s:g} s time limit (id {row['id']})")
