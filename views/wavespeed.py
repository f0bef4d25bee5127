"""A prediction as WaveSpeed's v3 API shows it (shared/seeds/002_*): the result endpoint's `data`, which its
webhooks carry."""

from __future__ import annotations

from typing import Any

from core import safety
from core.lifecycle import Status
from views.common import Row, iso_z

STATUS_WORDS = {
    Status.CREATED: "created",
    Status.PROCESSING: "processing",
    Status.COMPLETED: "completed",
    Status.FAILED: "failed",
    Status.CANCELED: "failed",
}


def view(row: Row, base_url: str, outputs: list[str]) -> dict[str, Any]:
    """`outputs`: what the client downloads as is, once completed (signed links or data URIs)."""
    status = Status(row["status"])
    done = status is Status.COMPLETED
    return {
        "id": row["id"],
        # the model path a WaveSpeed client posted to; made through another dialect: the model named there
        "model": row["input"].get("model", row["model"]),
        "outputs": outputs if done else [],
        "urls": {"get": f"{base_url}/api/v3/predictions/{row['id']}/result"},
        "has_nsfw_contents": safety.has_nsfw_contents(row.get("safety"), len(row["outputs"])),
        "status": STATUS_WORDS[status],
        "created_at": iso_z(row["created_at"]),
        "error": row["error"] or ("canceled" if status is Status.CANCELED else ""),
        "timings": {"inference": row["timings"].get("inference_ms", 0)},
        "seed": row["params"]["seed"],
    }
