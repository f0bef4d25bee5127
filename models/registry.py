"""The served models: ids, aliases and input schemas. Torch-free (the API reads it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.klein import (
    BASE_GUIDANCE,
    BASE_STEPS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    TEXT_ENCODER_OUT_LAYERS,
    KleinBaseInput,
    KleinInput,
)

# Optional, beside a diffusers folder's model_index.json: what that folder changes in the spec it is served with.
# A cut-depth text encoder (tests, CPU benchmarks) names the hidden states it has:
# {"text_encoder_out_layers": [0, 1, 2]}.
SPEC_FILE = "klein-spec.json"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    aliases: tuple[str, ...]
    description: str
    input_model: type[KleinInput]
    notes: str = ""
    # The text encoder's hidden states stacked into the prompt embedding: (count × the encoder's width) must equal
    # the transformer's joint_attention_dim, and the encoder must have max(...) layers at least.
    text_encoder_out_layers: tuple[int, ...] = TEXT_ENCODER_OUT_LAYERS
    # Step- and guidance-distilled (no classifier-free guidance), and the defaults of dialects without the fields.
    distilled: bool = True
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE

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
            "distilled": self.distilled,
            "defaults": {"num_inference_steps": self.default_steps, "guidance": self.default_guidance},
            "input_schema": self.input_schema(),
        }


FLUX_KLEIN_4B = ModelSpec(
    id="flux-klein-4b",
    aliases=(
        "flux-2-klein-4b",
        "flux2-klein-4b",
        "black-forest-labs/flux-2-klein-4b",
        "wavespeed-ai/flux-2-klein-4b",
        "fal-ai/flux-2/klein/4b",
    ),
    description="FLUX.2 [klein] 4B: fast text-to-image generation.",
    input_model=KleinInput,
    notes=(
        f"Step- and guidance-distilled checkpoint: {DEFAULT_STEPS} steps by default, not the 20 of an undistilled "
        "model; guidance is ignored (any value gives the same image)."
    ),
)

FLUX_KLEIN_4B_BASE = ModelSpec(
    id="flux-klein-4b-base",
    aliases=(
        "flux-2-klein-4b-base",
        "flux-2-klein-base-4b",  # BFL's spelling (its finetune endpoint: /v1/flux-2-klein-base-4b-finetuned)
        "flux2-klein-4b-base",
        "black-forest-labs/flux-2-klein-4b-base",
        "fal-ai/flux-2/klein/4b/base",
    ),
    description="FLUX.2 [klein] 4B base: the undistilled model, with classifier-free guidance; LoRAs train on it.",
    input_model=KleinBaseInput,
    notes=f"Undistilled: {BASE_STEPS} steps and guidance {BASE_GUIDANCE:g} by default, each step twice above 1.",
    distilled=False,
    default_steps=BASE_STEPS,
    default_guidance=BASE_GUIDANCE,
)

MODELS: tuple[ModelSpec, ...] = (FLUX_KLEIN_4B, FLUX_KLEIN_4B_BASE)
DEFAULT_MODEL = FLUX_KLEIN_4B
_BY_NAME = {name.lower(): spec for spec in MODELS for name in spec.names}


def resolve(name: str) -> ModelSpec | None:
    return _BY_NAME.get(name.strip().lower())


def known_ids() -> list[str]:
    return [name for spec in MODELS for name in spec.names]


def spec_for(model_path: str, base: ModelSpec = DEFAULT_MODEL) -> ModelSpec:
    """The spec a worker serves `model_path` with: `base`, with what the folder's SPEC_FILE overrides, if it has one."""
    path = Path(model_path) / SPEC_FILE
    if not path.is_file():
        return base
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or set(data) - {"text_encoder_out_layers"}:
        raise ValueError(f"{path}: only text_encoder_out_layers may be set there, got {data!r}")
    layers = data.get("text_encoder_out_layers", list(base.text_encoder_out_layers))
    if not (isinstance(layers, list) and layers and all(isinstance(k, int) and k >= 0 for k in layers)):
        raise ValueError(f"{path}: text_encoder_out_layers must be a non-empty list of layer indices ≥ 0")
    return dataclasses.replace(base, text_encoder_out_layers=tuple(layers))


def write_spec_file(folder: Path, text_encoder_out_layers: tuple[int, ...]) -> Path:
    path = folder / SPEC_FILE
    path.write_text(json.dumps({"text_encoder_out_layers": list(text_encoder_out_layers)}) + "\n")
    return path
