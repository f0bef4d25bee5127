"""FLUX.2 [klein] 4B: its public input schema, limits, defaults and resolution rules.

Torch-free: the API imports this. The pipeline itself lives in models/klein_pipeline.py.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core import deadlines, lora
from core.enhance import Mode, mode
from core.safety import Effective

AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
InputAspectRatio = Literal[
    "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "match_input_image"
]
OutputFormat = Literal["png", "jpg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}

MAX_REFERENCES = 4  # 1 reference: edit; 2–4: multi-reference
MAX_OUTPUTS = 4
MAX_LORAS = 8  # the schema's bound; KLEIN_MAX_LORAS (3) is the deployment's
MAX_LORA_SCALE = 4.0
MAX_PROMPT_CHARS = 4096  # the text encoder reads 512 tokens; longer prompts are truncated by the pipeline
MAX_SEED = 2**32 - 1
MEGAPIXEL = 1024 * 1024
SIZE_MULTIPLE = 16  # VAE scale 8 × 2×2 latent packing

# The released checkpoint is step- and guidance-distilled: 4 steps, guidance 1.0 (classifier-free
# guidance is skipped for distilled models). Pruna's page lists 20 / 3.5, the undistilled defaults.
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 1.0
# The undistilled base checkpoint (the one LoRAs are trained on): classifier-free guidance, many steps.
BASE_STEPS = 50
BASE_GUIDANCE = 4.0
# The Qwen3 hidden states the pipeline stacks into the prompt embedding (diffusers' `text_encoder_out_layers`).
TEXT_ENCODER_OUT_LAYERS: tuple[int, ...] = (9, 18, 27)
GUIDANCE_IGNORED = (
    "Accepted for compatibility and ignored: the distilled model runs without classifier-free guidance and has no "
    "guidance embedding, so every value gives the same image."
)


@functools.lru_cache(maxsize=256)
def size_for_aspect_ratio(aspect_ratio: str, megapixels: float = 1.0) -> tuple[int, int]:
    """(width, height) of about `megapixels`, each side a multiple of 16: 1:1 → 1024×1024, 16:9 → 1360×768."""
    a, b = (int(part) for part in aspect_ratio.split(":"))
    return size_for_ratio(a / b, megapixels)


def size_for_ratio(width_over_height: float, megapixels: float = 1.0) -> tuple[int, int]:
    width = math.sqrt(megapixels * MEGAPIXEL * width_over_height)
    return _round16(width), _round16(width / width_over_height)


# The Klein generate API's named aspect ratios and their exact resolutions (shared/seeds/001).
NAMED_SIZES: dict[str, tuple[int, int]] = {
    "square": (1024, 1024),
    "landscape": (1344, 768),
    "portrait": (768, 1344),
    "photo": (1248, 832),
    "photo_v": (832, 1248),
    "standard": (1184, 896),
    "standard_v": (896, 1184),
    "wide": (1568, 672),
}


def floor16(side: int) -> int:
    """The pipeline rounds sizes down to multiples of 16; we do it first so reported sizes are true."""
    return side - side % SIZE_MULTIPLE


def _round16(x: float) -> int:
    return max(SIZE_MULTIPLE, round(x / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be blank")
    return prompt


# The prompt as every dialect accepts it.
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]


class LoraInput(BaseModel):
    """A LoRA adapter as clients name it (WaveSpeed's `loras` items)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=2048, description="https URL of a .safetensors LoRA, or a /v1/files URL")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="Its weight; 0 disables it.")


class LoraRef(BaseModel):
    """A LoRA as a worker gets it: its tenant's copy (`loras/<tenant_id>/<sha256>.safetensors`), and its scale.
    Stored, cached and loaded per tenant, so that nothing of it depends on what other tenants ran."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    sha256: str
    scale: float

    @property
    def key(self) -> str:
        return lora.object_key(self.tenant_id, self.sha256)

    @property
    def adapter_name(self) -> str:
        """Its name in the worker's caches and pipeline; whole: the worker reads the loaded set back from it."""
        return f"lora_{self.tenant_id}_{self.sha256}"


def loaded_by(adapter_name: str) -> tuple[str, str]:
    """(tenant_id, sha256) of a LoraRef.adapter_name (a hash has no `_`)."""
    tenant_id, _, sha256 = adapter_name.removeprefix("lora_").rpartition("_")
    return tenant_id, sha256


Loras = Annotated[
    list[LoraInput], Field(max_length=MAX_LORAS, description="LoRA adapters on the transformer (docs/lora.md).")
]


class GenerationParams(BaseModel):
    """What a worker runs: every dialect's request ends up as one of these."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int = Field(ge=0, le=MAX_SEED)
    output_format: OutputFormat
    output_quality: int
    num_outputs: int = 1
    max_sequence_length: int = 512
    # Object-storage keys of the reference images (0: text-to-image, 1: edit, 2–4: multi-reference),
    # stored with the prediction so a redelivered task sees the same inputs.
    reference_keys: tuple[str, ...] = ()
    loras: tuple[LoraRef, ...] = ()  # applied in this order with their scales
    # The image checker's policy for this prediction (core/safety.py): its tenant's, or "off" as the request asked.
    safety: Effective = "block"
    # The prompt enhancer (docs/enhancer.md): "strict" fails the prediction if the rewrite fails, "best_effort"
    # generates from the original prompt then; the worker generates from the rewrite.
    enhance: Mode = "off"

    @property
    def megapixels(self) -> float:
        return self.width * self.height / MEGAPIXEL


class KleinInput(BaseModel):
    """The model's input as clients send it (`{"input": {...}}` on /v1/predictions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt = Field(description="What to generate.")
    images: list[str] = Field(
        [],
        max_length=MAX_REFERENCES,
        description="Reference images (URLs, data URIs or /v1/files URLs): 1 edits it, 2–4 guide a new image.",
    )
    aspect_ratio: InputAspectRatio | None = Field(
        None,
        description="Output aspect ratio at about one megapixel. Default: 1:1, or the first reference image's.",
    )
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed, reported back.")
    num_inference_steps: int = Field(
        DEFAULT_STEPS, ge=1, le=50, description="Denoising steps; the distilled model needs 4."
    )
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0, le=20, description=GUIDANCE_IGNORED)
    output_format: OutputFormat = "jpg"
    output_quality: int = Field(80, ge=1, le=100, description="Quality for jpg and webp.")
    num_outputs: int = Field(
        1, ge=1, le=MAX_OUTPUTS, description="Images of this prompt and seed, each billed; generation_urls lists them."
    )
    loras: Loras = []
    disable_safety_checker: bool = Field(
        False, description="Turn the output safety checker off; refused unless the account allows it (docs/safety.md)"
    )
    deadline_s: float | None = Field(
        None,
        ge=deadlines.MIN_S,
        le=deadlines.MAX_S,
        allow_inf_nan=False,
        description="Cancel it (status canceled, error 'deadline exceeded', not billed) unless it finishes within "
        "this many seconds of the submit: never started if still queued then, stopped at the next step if running.",
    )

    def deadline(self) -> deadlines.Deadline | None:
        return None if self.deadline_s is None else deadlines.Deadline(self.deadline_s)

    cache: bool = Field(
        True, description="false: never answered from the result cache, even with a seed given (docs/cache.md)"
    )
    enhance_prompt: bool | Literal["best_effort"] = Field(
        False,
        description="Rewrite the prompt with the prompt enhancer first and generate from the rewrite, reported as "
        '`enhanced_prompt` (docs/enhancer.md); "best_effort": generate from the original if the rewrite fails.',
    )

    def to_params(self, seed: int, reference_size: tuple[int, int] | None = None) -> GenerationParams:
        if self.aspect_ratio in (None, "match_input_image"):
            ratio = reference_size[0] / reference_size[1] if reference_size else 1.0
            width, height = size_for_ratio(ratio)
        else:
            width, height = size_for_aspect_ratio(self.aspect_ratio)
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance,
            seed=seed,
            output_format=self.output_format,
            output_quality=self.output_quality,
            num_outputs=self.num_outputs,
            enhance=mode(self.enhance_prompt),
        )


class KleinBaseInput(KleinInput):
    """The base model's input: the same fields, its own defaults (classifier-free guidance, 50 steps)."""

    num_inference_steps: int = Field(BASE_STEPS, ge=1, le=100, description="Denoising steps; the base model needs ~50.")
    guidance: float = Field(
        BASE_GUIDANCE, ge=0, le=20, description="Classifier-free guidance scale; above 1 each step runs twice."
    )
