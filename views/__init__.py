"""A prediction as each dialect shows it: pure data → JSON, read by the API (status, lists, the event stream) and
by the webhook worker (payloads). Nothing here imports the HTTP tier or any process's metrics
(tests/unit/test_layers.py keeps it so).

Pruna, Replicate and WaveSpeed: the body their status endpoints return; fal: its webhook's `{request_id, status,
payload, error}` with the result as `payload` (WaveSpeed's `data`, as its webhooks carry
it); BFL: its get_result body with a `timestamp`. Generate and OpenAI answer synchronously and have no status
endpoint: their payload is their answer's shape with the prediction's id and status beside it, and links instead
of bytes.
"""

from __future__ import annotations

from typing import Any

from core.lifecycle import Status
from core.settings import Settings
from views import bfl, fal, pruna, replicate, wavespeed
from views.common import STATUS_WORDS, Row, signed_output_urls


def render(dialect: str, row: Row, base_url: str, settings: Settings) -> dict[str, Any]:
    """The webhook payload for a prediction made through `dialect`, rendered at each attempt (links freshly
    signed)."""
    status = Status(row["status"])
    urls = signed_output_urls(settings, base_url, row) if status is Status.COMPLETED else []
    logs = {"logs": row["logs"]}  # as the status endpoints add it (api/services/live.py)
    if dialect == "wavespeed":
        return wavespeed.view(row, base_url, urls) | logs
    if dialect == "fal":
        return fal.webhook_payload(row, urls)
    if dialect == "bfl":
        return bfl.webhook_payload(row, urls[0] if urls else None)
    if dialect == "pruna":
        return pruna.view(row, base_url, logs)
    if dialect == "replicate":
        return replicate.view(row, base_url, settings, row["logs"])
    common = {"id": row["id"], "status": STATUS_WORDS[status], "error": row["error"], "timings": row["timings"]}
    if dialect == "openai":
        params = row["params"]
        return common | {
            "created": int(row["created_at"].timestamp()),
            "data": [{"url": url, "revised_prompt": None} for url in urls],
            "model": row["model"],
            "seed": params["seed"],
            "size": f"{params['width']}x{params['height']}",
        }
    return common | {"seed": row["params"]["seed"], "images": urls}  # generate
