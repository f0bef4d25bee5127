"""The FLUX.2 [klein] pipeline on a device. Imported by workers only (torch lives here)."""

from __future__ import annotations

import logging

import torch
from diffusers import Flux2KleinPipeline
from PIL.Image import Image

from models.klein import GenerationParams

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class KleinPipeline:
    """Loaded once per worker process; `generate` runs one prediction."""

    def __init__(self, model_path: str, device: str = "auto") -> None:
        self.device = pick_device(device)
        # bf16 on GPUs; float32 on CPU, where bf16 matmuls are slow.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = Flux2KleinPipeline.from_pretrained(model_path, dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.parameters = sum(
            p.numel() for m in (self.pipe.transformer, self.pipe.text_encoder, self.pipe.vae) for p in m.parameters()
        )
        log.info("loaded %s on %s (%s, %.3g B parameters)", model_path, self.device, self.dtype, self.parameters / 1e9)

    def generate(self, params: GenerationParams) -> list[Image]:
        # A CPU generator draws the same noise on every device, so a seed means the same image.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with torch.inference_mode():
            result = self.pipe(
                prompt=params.prompt,  # keyword: `image` is the first positional parameter
                height=params.height,
                width=params.width,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                num_images_per_prompt=params.num_outputs,
                generator=generator,
            )
        return list(result.images)
