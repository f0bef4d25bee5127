"""FLOPs of a FLUX.2 [klein] generation, counted by torch on the real 4B configs: `python bench/flops.py`.

The three models are built on the `meta` device (shapes only: no memory, no weights) and run under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention (2 FLOPs per
multiply-add); norms and element-wise ops are not counted. The transformer is counted for one step at the
scenario's token counts and multiplied by the steps: text tokens = max_sequence_length (512, the pipeline
always pads), image tokens = (H/16)·(W/16) per output, plus (h/16)·(w/16) per reference image.

Two totals: "as shipped" runs the text encoder the way diffusers 0.42.1 does (all 36 layers and the
151,936-way logits); "required" runs only layers 0–27, whose hidden states (9, 18, 27) are used, and
no logits (models/optimize.py `truncate_text_encoder`). The floor is the required work at the GPU's
dense bf16 rate (800 TFLOP/s by default for an H100 SXM).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # `python bench/flops.py`: the repository on the path instead of bench/ (its platform.py)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

PEAK_TFLOPS = 800.0  # dense bf16 an H100 SXM sustains on large GEMMs (989 on paper)
TEXT_TOKENS = 512
MEGAPIXEL = 1024 * 1024

# FLUX.2 [klein] 4B, as in the released checkpoint's config files.
REAL_TRANSFORMER: dict[str, Any] = {
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": False,
}
REAL_TEXT_ENCODER: dict[str, Any] = {  # Qwen3-4B
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
REAL_VAE: dict[str, Any] = {}  # AutoencoderKLFlux2 defaults: blocks 128/256/512/512, 32 latent channels


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    width: int
    height: int
    references: tuple[tuple[int, int], ...] = ()
    batch: int = 1  # images per prompt (one prompt, one text-encoder pass)
    steps: int = 4

    def scaled(self, divisor: int) -> Scenario:
        """The same scenario with every side divided by `divisor` (multiples of 16 kept): tiny CPU runs."""

        def side(x: int) -> int:
            return max(64, x // divisor // 16 * 16)

        refs = tuple((side(w), side(h)) for w, h in self.references)
        w, h = side(self.width), side(self.height)
        label = f"{self.label} [{w}x{h}" + "".join(f"+{rw}x{rh}" for rw, rh in refs) + "]"
        return Scenario(self.key, label, w, h, refs, self.batch, self.steps)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("t2i-1024", "1024² text-to-image", 1024, 1024),
    Scenario("t2i-512", "512² text-to-image", 512, 512),
    Scenario("edit-1024", "1024² edit, 1 reference", 1024, 1024, ((1024, 1024),)),
    Scenario("edit2-1024", "1024² edit, 2 references", 1024, 1024, ((1024, 1024), (1024, 1024))),
    Scenario("batch4-512", "512² batch of 4", 512, 512, batch=4),
)


def reference_size(width: int, height: int) -> tuple[int, int]:
    """What the pipeline does to a reference: down to 1 MP if larger, then sides down to multiples of 16."""
    if width * height > MEGAPIXEL:
        scale = math.sqrt(MEGAPIXEL / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width // 16 * 16, height // 16 * 16


@dataclass
class ScenarioFlops:
    scenario: str
    text_encoder: float  # required: layers 0..27, no logits
    text_encoder_as_shipped: float  # all layers and the logits
    vae_encode: float  # the references, once per request
    transformer_step: float
    steps: int
    vae_decode: float
    image_tokens: int
    reference_tokens: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def transformer(self) -> float:
        return self.transformer_step * self.steps

    @property
    def total(self) -> float:
        return self.text_encoder + self.vae_encode + self.transformer + self.vae_decode

    @property
    def total_as_shipped(self) -> float:
        return self.text_encoder_as_shipped + self.vae_encode + self.transformer + self.vae_decode

    def floor_s(self, peak_tflops: float = PEAK_TFLOPS) -> float:
        return self.total / (peak_tflops * 1e12)

    def as_dict(self, peak_tflops: float = PEAK_TFLOPS) -> dict[str, Any]:
        return asdict(self) | {
            "transformer": self.transformer,
            "total": self.total,
            "total_as_shipped": self.total_as_shipped,
            "floor_s": self.floor_s(peak_tflops),
            "peak_tflops": peak_tflops,
        }


class FlopCounter:
    """Counts FLOPs of the three models built from their configs on the meta device."""

    def __init__(
        self,
        transformer_config: dict[str, Any],
        text_encoder_config: dict[str, Any],
        vae_config: dict[str, Any],
        out_layers: tuple[int, ...] = (9, 18, 27),
    ) -> None:
        self.transformer_config = _init_kwargs(transformer_config)
        self.text_encoder_config = dict(text_encoder_config)
        self.vae_config = _init_kwargs(vae_config)
        self.out_layers = out_layers

    @classmethod
    def real(cls) -> FlopCounter:
        return cls(REAL_TRANSFORMER, REAL_TEXT_ENCODER, REAL_VAE)

    @classmethod
    def for_pipeline(cls, pipe: Any) -> FlopCounter:
        """From a pipeline's own configs; a truncated text encoder is counted with all its original layers."""
        te = pipe.text_encoder.config.to_dict()
        text_encoder_layers = getattr(pipe.text_encoder.lm_head, "original_layers", None)
        if text_encoder_layers is not None:
            te["num_hidden_layers"] = text_encoder_layers
            te.pop("layer_types", None)
        return cls(dict(pipe.transformer.config), te, dict(pipe.vae.config))

    @functools.cached_property
    def models(self) -> tuple[Any, Any, Any]:
        import torch
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        with torch.device("meta"):
            transformer: Any = Flux2Transformer2DModel(**self.transformer_config)
            text_encoder: Any = Qwen3ForCausalLM(Qwen3Config(**self.text_encoder_config))
            vae: Any = AutoencoderKLFlux2(**self.vae_config)
        return transformer.eval(), text_encoder.eval(), vae.eval()

    @functools.cached_property
    def truncated_text_encoder(self) -> Any:
        from models.optimize import truncate_text_encoder

        text_encoder = copy.deepcopy(self.models[1])
        truncate_text_encoder(text_encoder, self.out_layers)
        return text_encoder

    def parameters(self) -> dict[str, int]:
        transformer, text_encoder, vae = self.models
        return {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        }

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one counter per process, a handful of shapes
    def text_encoder(self, prompts: int = 1, tokens: int = TEXT_TOKENS, truncated: bool = True) -> float:
        import torch

        model = self.truncated_text_encoder if truncated else self.models[1]
        input_ids = torch.zeros(prompts, tokens, dtype=torch.long, device="meta")
        # A prepared mask mapping skips transformers' data-dependent mask checks, impossible on meta tensors;
        # a padding mask does not change the count.
        masks = {"full_attention": None, "sliding_attention": None}
        with torch.no_grad():
            return _count(
                lambda: model(input_ids=input_ids, attention_mask=masks, output_hidden_states=True, use_cache=False)
            )

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def transformer_step(self, image_tokens: int, text_tokens: int = TEXT_TOKENS, batch: int = 1) -> float:
        import torch

        transformer = self.models[0]
        config = transformer.config
        joint = config.joint_attention_dim
        with torch.device("meta"):
            hidden = torch.empty(batch, image_tokens, config.in_channels)
            text = torch.empty(batch, text_tokens, joint)
            timestep = torch.empty(batch)
            img_ids = torch.zeros(batch, image_tokens, 4, dtype=torch.long)
            txt_ids = torch.zeros(batch, text_tokens, 4, dtype=torch.long)
        with torch.no_grad():
            return _count(
                lambda: transformer(
                    hidden_states=hidden,
                    encoder_hidden_states=text,
                    timestep=timestep,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=None,
                    return_dict=False,
                )
            )

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def vae_decode(self, width: int, height: int, batch: int = 1) -> float:
        import torch

        vae = self.models[2]
        latents = torch.empty(batch, vae.config.latent_channels, height // 8, width // 8, device="meta")
        with torch.no_grad():
            return _count(lambda: vae.decode(latents, return_dict=False))

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def vae_encode(self, width: int, height: int) -> float:
        import torch

        vae = self.models[2]
        image = torch.empty(1, 3, height, width, device="meta")
        with torch.no_grad():
            return _count(lambda: vae.encode(image).latent_dist.mode())

    def scenario(self, scenario: Scenario) -> ScenarioFlops:
        image_tokens = (scenario.width // 16) * (scenario.height // 16)
        references = [reference_size(w, h) for w, h in scenario.references]
        reference_tokens = sum((w // 16) * (h // 16) for w, h in references)
        te = self.text_encoder(1, TEXT_TOKENS, True)
        te_full = self.text_encoder(1, TEXT_TOKENS, False)
        encode = sum(self.vae_encode(w, h) for w, h in references)
        step = self.transformer_step(image_tokens + reference_tokens, TEXT_TOKENS, scenario.batch)
        decode = self.vae_decode(scenario.width, scenario.height, scenario.batch)
        return ScenarioFlops(
            scenario=scenario.label,
            text_encoder=te,
            text_encoder_as_shipped=te_full,
            vae_encode=encode,
            transformer_step=step,
            steps=scenario.steps,
            vae_decode=decode,
            image_tokens=image_tokens * scenario.batch,
            reference_tokens=reference_tokens,
        )


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config as constructor arguments (no private keys)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _count(fn: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_table(rows: list[ScenarioFlops], peak_tflops: float = PEAK_TFLOPS) -> str:
    def t(x: float) -> str:
        return f"{x / 1e12:.2f}"

    lines = [
        "| scenario | tokens (image+ref) | text enc. required / as shipped | VAE enc. | transformer (steps × step) "
        f"| VAE dec. | total required | total as shipped | floor s @ {peak_tflops:g} TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.image_tokens}+{r.reference_tokens} "
            f"| {t(r.text_encoder)} / {t(r.text_encoder_as_shipped)} "
            f"| {t(r.vae_encode)} | {t(r.transformer)} ({r.steps} × {t(r.transformer_step)}) | {t(r.vae_decode)} "
            f"| {t(r.total)} | {t(r.total_as_shipped)} | {r.floor_s(peak_tflops):.4f} |"
        )
    return "\n".join(lines) + "\n(TFLOP; matmul, convolution and attention FLOPs counted by torch FlopCounterMode)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)

    counter = FlopCounter.real()
    params = counter.parameters()
    print(
        "parameters: transformer {:.3f} B, text encoder {:.3f} B (tied embeddings counted once), VAE {:.1f} M".format(
            params["transformer"] / 1e9, params["text_encoder"] / 1e9, params["vae"] / 1e6
        )
    )
    rows = [counter.scenario(s) for s in SCENARIOS]
    print(flop_table(rows, args.peak_tflops))
    if args.json:
        data = {"parameters": params, "scenarios": [r.as_dict(args.peak_tflops) for r in rows]}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
