"""What every dialect's view shares: the row they read, Replicate's status words, timestamps, output links."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from core import signing
from core.lifecycle import Status
from core.settings import Settings

Row = Mapping[str, Any]  # a predictions row by column name

# The status words of Replicate's API, which Pruna's (and its client) took over.
STATUS_WORDS = {
    Status.CREATED: "starting",
    Status.PROCESSING: "processing",
    Status.COMPLETED: "succeeded",
    Status.FAILED: "failed",
    Status.CANCELED: "canceled",
}


def iso_z(moment: datetime) -> str:
    """UTC with milliseconds and a Z, as WaveSpeed and 1min write their timestamps."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delivery_url(base_url: str, prediction_id: str, filename: str) -> str:
    return f"{base_url}/v1/predictions/delivery/{prediction_id}/{filename}"


def output_urls(base_url: str, row: Row) -> list[str]:
    return [delivery_url(base_url, row["id"], output["filename"]) for output in row["outputs"]]


def signed_output_urls(settings: Settings, base_url: str, row: Row) -> list[str]:
    return [
        signing.sign(settings, delivery_url(base_url, row["id"], o["filename"]), row["id"], o["filename"])
        for o in row["outputs"]
    ]
