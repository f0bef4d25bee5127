"""A prediction as fal's queue API shows it (docs.fal.ai, "Queue"): the status object (`IN_QUEUE` with
`queue_position`, `IN_PROGRESS` and `COMPLETED` with `logs`) and the FLUX.2 [klein] endpoints' result (`images`,
`seed`, `timings`, `has_nsfw_concepts`, `prompt`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core import safety
from core.lifecycle import Status
from models.klein import CONTENT_TYPES
from views.common import Row

STATUS_WORDS = {
    Status.CREATED: "IN_QUEUE",
    Status.PROCESSING: "IN_PROGRESS",
    Status.COMPLETED: "COMPLETED",
    Status.FAILED: "COMPLETED",  # fal reports a failed request as completed, with its `error`
    Status.CANCELED: "COMPLETED",
}


def request_urls(base_url: str, app_id: str, request_id: str) -> dict[str, str]:
    """fal's URLs of a request: under the app's `owner/alias` (its first two path segments), as fal's own."""
    owner_alias = "/".join(app_id.split("/")[:2])
    response_url = f"{base_url}/{owner_alias}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }


def fal_logs(logs: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    return [{"message": e["message"], "level": "INFO", "source": "user", "timestamp": e["at"]} for e in logs]


def status_view(row: Row, base_url: str, extras: Mapping[str, Any], with_logs: bool) -> dict[str, Any]:
    """`extras`: api/services/live.py's (queue_position while queued, the logs so far)."""
    status = Status(row["status"])
    app_id = row["input"].get("app_id", "fal-ai/flux-2/klein/4b")
    body: dict[str, Any] = {"status": STATUS_WORDS[status], "request_id": row["id"]}
    body |= request_urls(base_url, app_id, row["id"])
    body["logs"] = fal_logs(extras.get("logs", [])) if with_logs else None
    if status is Status.CREATED:
        body["queue_position"] = extras.get("queue_position", 0)
    if status.terminal:
        body["metrics"] = {"inference_time": row["timings"].get("inference_ms", 0) / 1000}
    if status in (Status.FAILED, Status.CANCELED):
        body["error"] = row["error"] or status.value
        body["error_type"] = "request_canceled" if status is Status.CANCELED else "generation_failed"
    return body


def result_view(row: Row, urls: Sequence[str]) -> dict[str, Any]:
    """A completed request's result; `urls`: signed links, or data URIs under `sync_mode`."""
    params = row["params"]
    content_type = CONTENT_TYPES[params["output_format"]]
    size = {"width": params["width"], "height": params["height"]}
    return {
        "images": [{"url": url, **size, "content_type": content_type} for url in urls],
        "timings": {"inference": row["timings"].get("inference_ms", 0) / 1000},
        "seed": params["seed"],
        "has_nsfw_concepts": safety.has_nsfw_contents(row.get("safety"), len(row["outputs"])),
        "prompt": params["prompt"],
    }


def webhook_payload(row: Row, urls: Sequence[str]) -> dict[str, Any]:
    """What fal's webhooks carry (docs.fal.ai, "Webhooks"): `OK` with the result as `payload`, or `ERROR`."""
    status = Status(row["status"])
    done = status is Status.COMPLETED
    body: dict[str, Any] = {
        "request_id": row["id"],
        "gateway_request_id": row["id"],
        "status": "OK" if done else "ERROR",
        "payload": result_view(row, urls) if done else None,
    }
    if not done:
        body["error"] = row["error"] or status.value
    return body
