"""FP8's numerical difference to bf16 on the same inputs: `python bench/gpu.py --fp8-error`.

With torchao on a GPU of compute capability ≥ 8.9 the real kernels; elsewhere (CPU, --tiny, --cut-depth) an
emulation that rounds the same layers' weights and inputs to float8 e4m3 with per-row scales, and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bench.gpu_measure import PROMPT
from models.klein import TEXT_ENCODER_OUT_LAYERS

FP8_MAX = 448.0  # largest float8_e4m3fn value


def relative_error(value: Any, reference: Any) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def numerical_difference(
    pipe: Any,
    mutate: Callable[[Any], str],
    width: int,
    height: int,
    seed: int = 0,
    out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS,
) -> dict[str, Any]:
    """Transformer output and decoded image before and after `mutate(pipe)`, on the same inputs."""
    import torch

    device = pipe._execution_device
    layers = tuple(out_layers)
    with torch.inference_mode():
        prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=PROMPT, device=device, max_sequence_length=512, text_encoder_out_layers=layers
        )
        latents, latent_ids = pipe.prepare_latents(
            batch_size=1,
            num_latents_channels=pipe.transformer.config.in_channels // 4,
            height=height,
            width=width,
            dtype=prompt_embeds.dtype,
            device=device,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        timestep = torch.full((1,), 0.5, device=device, dtype=latents.dtype)

    def transformer_output() -> Any:
        with torch.inference_mode():
            return pipe.transformer(
                hidden_states=latents,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_ids,
                return_dict=False,
            )[0].float()

    def image() -> Any:
        with torch.inference_mode():
            return pipe(
                prompt=PROMPT,
                height=height,
                width=width,
                num_inference_steps=4,
                guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt",
                text_encoder_out_layers=layers,
            ).images.float()

    reference_out, reference_image = transformer_output(), image()
    outcome = mutate(pipe)
    out, img = transformer_output(), image()
    mse = float(((img - reference_image) ** 2).mean())
    return {
        "variant": outcome,
        "size": f"{width}x{height}",
        "transformer_relative_error": relative_error(out, reference_out),
        "image_relative_error": relative_error(img, reference_image),
        "image_max_abs_error": float((img - reference_image).abs().max()),
        "image_psnr_db": float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse))),
        "finite": bool(torch.isfinite(reference_out).all() and torch.isfinite(out).all()),
    }


def _fake_fp8(x: Any) -> Any:
    """Round to float8 e4m3 with one scale per row (last dim), back in x's dtype: torchao's PerRow numerics."""
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def emulate_fp8(transformer: Any) -> str:
    """FP8 numerics without FP8 hardware: the layers FP8 would quantise get per-row float8-rounded weights and
    per-token float8-rounded inputs, computed in their own dtype. A CPU stand-in for torchao's kernels."""
    import torch

    from models.optimize import fp8_filter

    count = 0
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if fp8_filter(module, name):
                module.weight.copy_(_fake_fp8(module.weight))
                module.register_forward_pre_hook(lambda _m, args: (_fake_fp8(args[0]), *args[1:]))
                count += 1
    return f"emulated: {count} linear layers with float8-rounded weights and inputs (per row)"


def fp8_difference(klein: Any, width: int, height: int) -> dict[str, Any]:
    """FP8 against bf16 on `klein` (switches off, eager), on the same inputs; `klein` is quantised afterwards."""
    from models.optimize import quantize_fp8

    def mutate(pipe: Any) -> str:
        outcome = quantize_fp8(pipe.transformer, klein.device)
        if outcome.startswith("skipped"):
            print(f"FP8 {outcome}; measuring its emulation instead", flush=True)
            return emulate_fp8(pipe.transformer)
        return outcome

    return numerical_difference(klein.pipe, mutate, width, height, out_layers=klein.text_encoder_out_layers)
