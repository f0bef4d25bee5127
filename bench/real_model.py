"""The real FLUX.2 [klein] 4B architecture with random weights, at full or cut depth, built offline.

The configs are the released checkpoint's (bench/flops.py). Full depth is what the GPU benchmark measures; cut
depth keeps every real width (3072-wide transformer, 24 heads × 128, a 2560-wide Qwen3 with its 151,936-entry
embedding, the real VAE) with 1 double + 1 single block and a 4-layer text encoder, so the real shapes run on a
CPU in seconds per call: the test that fails when diffusers or transformers change under us.

The tokenizer is the tiny pipeline's byte-level one: the pipeline pads every prompt to 512 tokens, so the text
encoder still sees the real sequence length. Weights are uniform with std 0.02 (speed does not depend on them,
and 25 random blocks stay finite in bf16); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.flops import REAL_TEXT_ENCODER, REAL_TRANSFORMER, REAL_VAE
from models.klein import TEXT_ENCODER_OUT_LAYERS
from models.registry import FLUX_KLEIN_4B, ModelSpec, write_spec_file

STD = 0.02


@dataclass(frozen=True)
class Depth:
    double_blocks: int
    single_blocks: int
    text_layers: int
    out_layers: tuple[int, ...]  # the text-encoder hidden states read: 3 × 2560 = the transformer's 7680

    def spec(self) -> ModelSpec:
        return dataclasses.replace(FLUX_KLEIN_4B, text_encoder_out_layers=self.out_layers)

    def configs(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(transformer, text encoder, VAE) constructor arguments."""
        transformer = REAL_TRANSFORMER | {"num_layers": self.double_blocks, "num_single_layers": self.single_blocks}
        return transformer, REAL_TEXT_ENCODER | {"num_hidden_layers": self.text_layers}, dict(REAL_VAE)


FULL = Depth(5, 20, 36, TEXT_ENCODER_OUT_LAYERS)
# Hidden states 0-2 of 4 layers: truncation has a layer to cut, as on the real 36-layer encoder.
CUT = Depth(1, 1, 4, (0, 1, 2))


def build_real_pipeline(device: str, dtype: Any, seed: int = 0, depth: Depth = FULL) -> Any:
    """A Flux2KleinPipeline of the real architecture, built directly on `device` ("meta": shapes only)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    generator = torch.Generator(device if device != "meta" else "cpu").manual_seed(seed)
    transformer_config, text_config, vae_config = depth.configs()
    # One module at a time, cast before the next: the peak is the largest module in float32.
    with torch.device(device):
        with _no_init():
            transformer: Any = Flux2Transformer2DModel(**transformer_config)
            text_encoder: Any = Qwen3ForCausalLM(Qwen3Config(**text_config, pad_token_id=tokenizer.pad_token_id))
        text_encoder.tie_weights()  # before drawing: the LM head is the embedding (151,936 × 2560)
        for module in (transformer, text_encoder):
            if device != "meta":
                _random_weights(module, generator)
        transformer, text_encoder = transformer.to(dtype), text_encoder.to(dtype)
        vae: Any = AutoencoderKLFlux2(**vae_config)
        vae = vae.to(dtype)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=True,
    )


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """Skips torch's and transformers' weight initialisation (most of the build time); _random_weights follows."""
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # another transformers: initialised twice, slower, same result
        return contextlib.nullcontext()


def _random_weights(module: Any, generator: Any) -> None:
    """Matrices uniform with std 0.02 (uniform draws 2.4× faster than normal on CPU), norm scales 1, biases 0."""
    import torch

    bound = STD * math.sqrt(3)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def save_real_layout(folder: Path, depth: Depth = CUT, seed: int = 0) -> Path:
    """The real architecture at `depth`, saved as a diffusers folder with the real model_index.json (bf16 weights,
    as released), the model spec's text-encoder layers (models/registry.py SPEC_FILE) when they are not the
    real ones, and the random-weights marker. Idempotent."""
    import torch

    from models.tiny import MARKER

    if (folder / MARKER).exists():
        return folder
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built as saved: half the memory to fill, no cast (only saved)
    try:
        pipe = build_real_pipeline("cpu", torch.bfloat16, seed, depth)
    finally:
        torch.set_default_dtype(default)
    pipe.save_pretrained(folder)
    if depth.out_layers != FULL.out_layers:
        write_spec_file(folder, depth.out_layers)
    marker = {"random_weights": True, "purpose": "the real 4B widths at cut depth, for tests", "depth": str(depth)}
    (folder / MARKER).write_text(json.dumps(marker) + "\n")
    return folder
