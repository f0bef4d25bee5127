"""Replicate's requests as this platform reads them: the FLUX.2 [klein] input (mapped onto the model's own input,
whose defaults and ranges hold), `Prefer: wait`, and the one version each registered model has (a digest of its
input schema, so a new schema is a new version).

`go_fast` and `disable_safety_checker` only tune Replicate's own hardware and checker: accepted, without effect.
Any other input this platform does not run is a 422 naming it, never dropped.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from api.errors import Invalid, validation_error
from api.routes.dialects.common import seed_or_random
from core.settings import Settings
from models.klein import (
    MAX_OUTPUTS,
    MAX_REFERENCES,
    GenerationParams,
    InputAspectRatio,
    KleinInput,
    OutputFormat,
    Prompt,
    size_for_aspect_ratio,
    size_for_ratio,
)
from models.registry import MODELS, ModelSpec, resolve

MAX_WAIT_S = 60  # Replicate's bound on `Prefer: wait=N`
# The model's own inputs, passed through to its input model (its defaults and ranges: the base model's differ).
OWN_INPUTS = ("prompt", "aspect_ratio", "seed", "num_inference_steps", "guidance", "output_format", "output_quality")


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
    disable_safety_checker: bool = Field(False, description="Accepted without effect: no safety checker runs here")

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


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    stream: bool | None = Field(None, description="Accepted: every prediction has urls.stream")


class VersionedRequest(PredictionRequest):
    version: str = Field(description="A version id, `owner/name` or `owner/name:version`")


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


def versioned_model(version: str) -> ModelSpec:
    """The model a `version` names (its id, `owner/name` or `owner/name:id`), or a 422 naming `version`."""
    name, _, wanted = version.partition(":") if "/" in version else ("", "", version)
    if name:
        spec = resolve(name)
        found = spec if spec is not None and wanted in ("", version_id(spec)) else None
    else:
        found = next((spec for spec in MODELS if version_id(spec) == wanted), None)
    if found is None:
        known = ", ".join(f"{replicate_name(spec)}:{version_id(spec)}" for spec in MODELS)
        raise Invalid(f"invalid request: version: {version!r} is not a version of a model here; known: {known}")
    return found


def prefer_wait(prefer: str | None, settings: Settings) -> float:
    """`Prefer: wait` holds the request up to the Try-Sync limit, `wait=N` up to N s (1–60)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return settings.try_sync_timeout_s
        if not value.strip().isdigit() or not 1 <= int(value) <= MAX_WAIT_S:
            raise Invalid(f"invalid request: Prefer: wait=N takes N from 1 to {MAX_WAIT_S} seconds, got {value!r}")
        return min(float(value), settings.try_sync_timeout_s)
    return 0.0


def parse_input(spec: ModelSpec, raw: dict[str, Any]) -> tuple[ReplicateInput, KleinInput]:
    """Replicate's input, and the model's own input made of the fields they share (its defaults, its ranges)."""
    try:
        given = ReplicateInput.model_validate(raw)
        own = spec.input_model.model_validate(given.model_dump(include=set(OWN_INPUTS), exclude_none=True))
    except ValidationError as exc:
        raise validation_error(exc.errors(), prefix=("input",)) from None
    return given, own


def to_params(given: ReplicateInput, own: KleinInput, reference_size: tuple[int, int] | None) -> GenerationParams:
    """The model's own parameters, with Replicate's output count and megapixels."""
    params = own.to_params(seed_or_random(own.seed), reference_size)
    if given.output_megapixels != "1":
        megapixels = float(given.output_megapixels)
        if given.aspect_ratio == "match_input_image":
            width, height = size_for_ratio(reference_size[0] / reference_size[1] if reference_size else 1.0, megapixels)
        else:
            width, height = size_for_aspect_ratio(given.aspect_ratio, megapixels)
        params = params.model_copy(update={"width": width, "height": height})
    return params.model_copy(update={"num_outputs": given.num_outputs})
