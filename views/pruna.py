"""A prediction as Pruna's API shows it (shared/seeds/000_*): the status endpoint's body, which its webhooks carry."""

from __future__ import annotations

from typing import Any

from core import safety
from core.lifecycle import Status
from views.common import STATUS_WORDS, Row, output_urls


def view(row: Row, base_url: str, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Pruna prediction body, with `live` (api/services/live.py) where the status is asked for. Timestamps
    stay datetimes: orjson writes them as `isoformat()` does, in C."""
    status = row["status"]  # a Status is its str, so the str looks it up
    body: dict[str, Any] = {
        "id": row["id"],
        "model": row["model"],
        "input": row["input"],
        "status": STATUS_WORDS[status],
        "get_url": f"{base_url}/v1/predictions/status/{row['id']}",
        "seed": row["params"]["seed"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "completed_at": row["completed_at"],
        "timings": row["timings"],
        "error": row["error"],
        "safety": safety.public(row.get("safety")),
    }
    if status == Status.COMPLETED:
        urls = output_urls(base_url, row)
        body["generation_url"] = urls[0]
        body["generation_urls"] = urls
    if row.get("cached_from") is not None:  # answered from the result cache (docs/cache.md)
        body["cached"], body["cached_from"] = True, row["cached_from"]
    if row["params"].get("enhance", "off") != "off":  # the rewrite it was generated from (docs/enhancer.md)
        body["enhanced_prompt"] = row.get("enhanced_prompt")
    if row.get("expired_at") is not None:  # its outputs are gone: the URLs answer 410 (docs/retention.md)
        body["expired_at"] = row["expired_at"]
    return body | live if live else body
