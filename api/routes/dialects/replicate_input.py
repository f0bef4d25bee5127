"""Replicate's requests as this platform reads them: the FLUX.2 [klein] input (mapped onto the model's own input,
whose defaults and ranges hold), `Prefer: wait`, and the one version each registered model has (a digest of its
input schema, so a new schema is a new version).

`go_fast` only tunes Replicate's own hardware: accepted, without effect. `disable_safety_checker` turns the output
checker off where the tenant allows it (docs/safety.md), else a 422.
Any other input this platform does not run is a 422 naming it, never dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import Invalid, validation_error
from api.routes.dialects.common import seed_or_random
from core.settings import Settings
from models.klein import (
    GenerationParams,
    KleinInput,
    size_for_aspect_ratio,
    size_for_ratio,
)
from models.registry import MODELS, ModelSpec, resolve
from views.replicate import ReplicateInput, replicate_name, version_id

MAX_WAIT_S = 60  # Replicate's bound on `Prefer: wait=N`
# The model's own inputs, passed through to its input model (its defaults and ranges: the base model's differ).
OWN_INPUTS = ("prompt", "aspect_ratio", "seed", "num_inference_steps", "guidance", "output_format", "output_quality")


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    stream: bool | None = Field(None, description="Accepted: every prediction has urls.stream")


class VersionedRequest(PredictionRequest):
    version: str = Field(description="A version id, `owner/name` or `owner/name:version`")


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
