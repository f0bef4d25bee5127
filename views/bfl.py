"""A prediction as Black Forest Labs' API shows it: `GET /v1/get_result`'s body (docs.bfl.ai, "Get Result": `id`,
`status`, `result`, `progress`, `details`, `preview`) and the webhook's, which is the same with a `timestamp`
(BFL's skills repository, bfl-api/references/webhook-integration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from core.lifecycle import Status
from views.common import Row, iso_z

# BFL's statuses (docs.bfl.ai, "Errors" → "Response Types"); "Task not found" is answered for unknown ids.
PENDING, READY, ERROR = "Pending", "Ready", "Error"
CONTENT_MODERATED = "Content Moderated"  # the generated output was flagged (our image checker blocked it)
NOT_FOUND = "Task not found"


def status_word(row: Row) -> str:
    status = Status(row["status"])
    if status is Status.COMPLETED:
        return READY
    if status is Status.FAILED and (row.get("safety") or {}).get("blocked"):
        return CONTENT_MODERATED
    return ERROR if status.terminal else PENDING


def _seconds(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def result_view(row: Row, sample: str | None, extras: Mapping[str, Any]) -> dict[str, Any]:
    """`sample`: the first output's signed link, once Ready. `extras`: api/services/live.py's (progress)."""
    word = status_word(row)
    params = row["params"]
    body: dict[str, Any] = {"id": row["id"], "status": word, "result": None, "progress": None, "details": None}
    body["preview"] = None
    if word == READY:
        started, ended = row.get("started_at"), row.get("completed_at")
        body["result"] = {
            "sample": sample,
            "prompt": params["prompt"],
            "seed": params["seed"],
            "start_time": _seconds(started),
            "end_time": _seconds(ended),
            "duration": (ended - started).total_seconds() if started and ended else None,
        }
        body["progress"] = 1.0
    elif word == PENDING:
        done = extras.get("progress")
        body["progress"] = round(done["percent"] / 100, 3) if done else 0.0
    else:
        body["error"] = row["error"] or Status(row["status"]).value
        if word == CONTENT_MODERATED:
            body["details"] = {"moderation_reasons": ["output flagged by the image checker"]}
    return body


def not_found(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "status": NOT_FOUND, "result": None, "progress": None, "details": None, "preview": None}


def webhook_payload(row: Row, sample: str | None) -> dict[str, Any]:
    """The webhook body: the get_result view at completion, with when it was sent."""
    return result_view(row, sample, {}) | {"timestamp": iso_z(datetime.now(UTC))}
