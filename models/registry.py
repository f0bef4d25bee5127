"""The served models: ids, aliases and input schemas. Torch-free (the API reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.klein import DEFAULT_GUIDANCE, DEFAULT_STEPS, KleinInput


@dataclass(frozen=True)
class ModelSpec:
    id: str
    aliases: tuple[str, ...]
    description: str
    input_model: type[KleinInput]
    notes: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "aliases": list(self.aliases),
            "description": self.description,
            "notes": self.notes,
            "input_schema": self.input_schema(),
        }


FLUX_KLEIN_4B = ModelSpec(
    id="flux-klein-4b",
    aliases=(
        "flux-2-klein-4b",
        "flux2-klein-4b",
        "black-forest-labs/flux-2-klein-4b",
        "wavespeed-ai/flux-2-klein-4b",
    ),
    description="FLUX.2 [klein] 4B: fast text-to-image generation.",
    input_model=KleinInput,
    notes=(
        f"Step- and guidance-distilled checkpoint: defaults are {DEFAULT_STEPS} steps and guidance "
        f"{DEFAULT_GUIDANCE}, not the 20 / 3.5 of an undistilled model."
    ),
)

MODELS: tuple[ModelSpec, ...] = (FLUX_KLEIN_4B,)
_BY_NAME = {name.lower(): spec for spec in MODELS for name in spec.names}


def resolve(name: str) -> ModelSpec | None:
    return _BY_NAME.get(name.strip().lower())


def known_ids() -> list[str]:
    return [name for spec in MODELS for name in spec.names]
