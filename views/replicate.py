"""A prediction as Replicate's API shows it, and the model identity its clients read: `owner/name`, the one
version each registered model has (a digest of its input schema, so a new schema is a new version) and that
schema. The input model is here because the version is made of it."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.lifecycle import Status
from core.settings import Settings
from models.klein import MAX_OUTPUTS, MAX_REFERENCES, InputAspectRatio, OutputFormat, Prompt
from models.registry import ModelSpec, resolve
from views.common import STATUS_WORDS, Row, iso_z, signed_output_urls


class ReplicateInput(BaseModel):
    """FLUX.2 [klein] on Replicate (black-forest-labs/flux-2-klein-4b), as far as this platform runs it; anything
    else is a 422 naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    images: list[str] | None = Field(None, max_length=MAX_REFERENCES, description="Reference images (URLs)")
    input_images: list[str] | None = Field(None, max_length=MAX_REFERENCES, description="Another name for images")
    aspect_ratio: InputAspectRatio = "1:1"
    output_megapixels: Literal["0.25", "0.5", "1"] = "1"
    seed: int | None = Field(None, description="Random when unset; reported in the logs")
    num_outputs: int = Field(1, ge=1, le=MAX_OUTPUTS)
    num_inference_steps: int | None = Field(None, description="The model's default when unset")
    guidance: float | None = Field(None, description="The model's default when unset")
    output_format: OutputFormat = "jpg"
    output_quality: int = Field(95, description="1–100, for jpg and webp")
    go_fast: bool = Field(False, description="Accepted without effect: the workers always run their fastest setup")
    disable_safety_checker: bool = Field(
        False, description="Turn the output safety checker off; refused unless the account allows it (docs/safety.md)"
    )

    @model_validator(mode="after")
    def _one_name_for_references(self) -> ReplicateInput:
        if self.images is not None and self.input_images is not None:
            raise ValueError("give reference images as either images or input_images, not both")
        return self

    @property
    def references(self) -> tuple[list[str], str]:
        """The reference URLs, and the field they came in."""
        if self.input_images is not None:
            return self.input_images, "input.input_images"
        return self.images or [], "input.images"


def replicate_name(spec: ModelSpec) -> str:
    """`owner/name`: the model's first alias of that form (its id where it has none)."""
    return next((name for name in spec.names if "/" in name), spec.id)


@functools.cache
def openapi_schema(spec: ModelSpec) -> dict[str, Any]:
    """A Replicate version's `openapi_schema`: the input with the model's own defaults, an array of URLs out."""
    schema = ReplicateInput.model_json_schema()
    own = spec.input_schema()["properties"]
    schema["properties"] |= {name: own[name] for name in ("num_inference_steps", "guidance")}
    output = {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}
    return {
        "openapi": "3.0.2",
        "info": {"title": replicate_name(spec), "version": "1"},
        "paths": {},
        "components": {"schemas": {"Input": schema, "Output": output}},
    }


@functools.cache
def version_id(spec: ModelSpec) -> str:
    """64 hex digits like Replicate's, from the schema: a new schema is a new version."""
    return hashlib.sha256(orjson.dumps(openapi_schema(spec), option=orjson.OPT_SORT_KEYS)).hexdigest()


def version_object(spec: ModelSpec) -> dict[str, Any]:
    return {
        "id": version_id(spec),
        "created_at": "1970-01-01T00:00:00Z",  # as /v1/models' `created`: a version here has no publication date
        "cog_version": "klein-serve",  # not Cog; the client only reads it to date old schemas
        "openapi_schema": openapi_schema(spec),
    }


def view(
    row: Row, base_url: str, settings: Settings, logs: Sequence[Mapping[str, str]], waited: bool = False
) -> dict[str, Any]:
    """Replicate's prediction object. `waited`: the answer to a `Prefer: wait` that ended before the prediction
    did, which the client takes for final unless it says `starting`."""
    status = Status(row["status"])
    spec = resolve(row["model"])
    removed = row.get("expired_at") is not None
    prediction_url = f"{base_url}/v1/predictions/{row['id']}"
    timings = row["timings"]
    metrics: dict[str, Any] = {}
    if "total_ms" in timings:
        metrics = {"predict_time": (timings["total_ms"] - timings.get("queue_ms", 0)) / 1000}
        metrics["total_time"] = timings["total_ms"] / 1000
    if status is Status.COMPLETED:
        metrics["image_count"] = len(row["outputs"])
    return {
        "id": row["id"],
        "model": replicate_name(spec) if spec else row["model"],
        "version": version_id(spec) if spec else row["model"],
        "input": row["input"],
        "logs": "\n".join([f"Using seed: {row['params']['seed']}", *(entry["message"] for entry in logs)]),
        "output": signed_output_urls(settings, base_url, row) if status is Status.COMPLETED and not removed else None,
        "error": row["error"],
        "status": "starting" if waited and not status.terminal else STATUS_WORDS[status],
        "created_at": _time(row["created_at"]),
        "started_at": _time(row["started_at"]),
        "completed_at": _time(row["completed_at"]),
        "data_removed": removed,
        "urls": {
            "get": prediction_url,
            "cancel": f"{prediction_url}/cancel",
            "stream": f"{prediction_url}/stream",
            "web": f"{base_url}/#history",
        },
        "metrics": metrics,
    }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else iso_z(moment)
