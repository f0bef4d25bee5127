"""GPU inference benchmark of the worker's pipeline: `python bench/gpu.py` (CUDA) or `python bench/gpu.py --tiny` (CPU).

On CUDA it builds the real FLUX.2 [klein] 4B architecture (transformer, Qwen3-4B text encoder, VAE, with
their real configs, bench/flops.py) with random weights directly on the GPU, in the worker's dtype: no
weights are downloaded. `--model PATH` loads real weights from a local diffusers folder instead. The
pipeline then goes through the worker's own setup (`models.klein_pipeline.KleinPipeline`: dtype, speed
switches from KLEIN_* settings, warm-up) and every timing is the worker's own call, `generate(params,
references)`, PIL images out. `--tiny` runs the same code on the tiny random-weights pipeline on CPU, at
sizes divided by `--tiny-scale`, so the benchmark never rots; its figures are CPU figures, not GPU ones.

For each scenario (bench/flops.py SCENARIOS): p50/p90 seconds after warm-up, images/s, peak memory, the
FLOPs counted on the meta device, the compute floor at `--peak-tflops` and the fraction of it reached
(floor / p50; 1.0 would be every FLOP at peak rate). Prompts differ on every call unless
`--repeat-prompt`, so the prompt-embedding cache never hides the text encoder.

`--compare` builds a fresh pipeline per switch and times the baseline (every switch off: the plain
diffusers pipeline) and each switch on its own, then all of them. `--fp8-error` reports FP8's
numerical difference to bf16 on the same inputs (transformer output, decoded image).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if not __package__:  # `python bench/gpu.py`: the repository on the path instead of bench/ (its platform.py)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.flops import (
    PEAK_TFLOPS,
    REAL_TEXT_ENCODER,
    REAL_TRANSFORMER,
    REAL_VAE,
    SCENARIOS,
    FlopCounter,
    Scenario,
    ScenarioFlops,
)

# Every speed switch off: the plain diffusers pipeline (bf16 on CUDA).
BASELINE: dict[str, Any] = {
    "attention_backend": "native",
    "fuse_qkv": False,
    "truncate_text_encoder": False,
    "prompt_cache_size": 0,
    "vae_channels_last": False,
    "cudnn_benchmark": False,
    "compile_transformer": False,
    "compile_vae": False,
    "fp8": False,
}
PROMPT = "a lighthouse on a cliff at dusk, waves breaking on the rocks, volumetric light"


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    repeat_prompt: bool = False


def variants(cuda: bool) -> list[Variant]:
    """Baseline, each switch on its own, then everything on."""
    attention = (
        ["_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3"] if cuda else ["_native_math"]
    )
    out = [Variant("baseline", {})]
    out += [Variant(f"attention={name}", {"attention_backend": name}) for name in attention]
    out += [
        Variant("fuse_qkv", {"fuse_qkv": True}),
        Variant("truncate_text_encoder", {"truncate_text_encoder": True}),
        Variant("prompt_cache (same prompt)", {"prompt_cache_size": 32}, repeat_prompt=True),
        Variant("vae_channels_last", {"vae_channels_last": True}),
        Variant("cudnn_benchmark", {"cudnn_benchmark": True}),
        Variant("compile_transformer", {"compile_transformer": True}),
        Variant("compile_vae", {"compile_vae": True}),
        Variant("fp8", {"fp8": True}),
    ]
    all_on = {
        "attention_backend": "auto",
        "fuse_qkv": True,
        "truncate_text_encoder": True,
        "prompt_cache_size": 32,
        "vae_channels_last": True,
        "cudnn_benchmark": True,
        "compile_transformer": True,
        "compile_vae": True,
    }
    out += [Variant("all (bf16)", all_on), Variant("all + fp8", all_on | {"fp8": True})]
    return out


@dataclass
class Result:
    key: str
    scenario: str
    p50_s: float
    p90_s: float
    mean_s: float
    images_per_s: float
    peak_gb: float
    tflop: float
    floor_s: float
    floor_fraction: float
    iterations: int
    times_s: list[float]


# Building pipelines ------------------------------------------------------------------------------------------


def build_real_pipeline(device: str, dtype: Any, seed: int = 0) -> Any:
    """The real 4B architecture with random weights, built directly on `device` (CUDA; "meta" for shapes only).

    The tokenizer is the tiny pipeline's byte-level one: the pipeline pads every prompt to 512 tokens, so the
    text encoder (real config, real 151,936-entry embedding) sees the real sequence length.
    """
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
    torch.manual_seed(seed)
    with torch.device(device):  # one module at a time, cast before the next: peak ≈ the largest in float32
        transformer: Any = Flux2Transformer2DModel(**REAL_TRANSFORMER)
        transformer = transformer.to(dtype)
        text_encoder: Any = Qwen3ForCausalLM(Qwen3Config(**REAL_TEXT_ENCODER, pad_token_id=tokenizer.pad_token_id))
        text_encoder = text_encoder.to(dtype)
        vae: Any = AutoencoderKLFlux2(**REAL_VAE)
        vae = vae.to(dtype)
    if device != "meta":
        _scale_down_random_weights(transformer)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=True,
    )


def _scale_down_random_weights(transformer: Any) -> None:
    """Keep 25 random blocks' activations finite in bf16: small random weights (speed does not depend on them)."""
    import torch

    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                parameter.zero_()


def make_pipeline(args: argparse.Namespace, settings: Any) -> Any:
    """A KleinPipeline through the worker's setup path, from the tiny, the random 4B or real weights."""
    import torch

    from models.klein_pipeline import KleinPipeline
    from models.optimize import pick_dtype

    device = torch.device(args.device)
    if args.model:
        return KleinPipeline(args.model, args.device, settings)
    if args.tiny:
        from models.tiny import build_tiny_pipeline

        return KleinPipeline("tiny random-weights pipeline", args.device, settings, pipe=build_tiny_pipeline())
    started = time.perf_counter()
    pipe = build_real_pipeline(args.device, pick_dtype(settings.dtype, device))
    print(f"built the random-weights 4B pipeline on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    return KleinPipeline("FLUX.2 [klein] 4B architecture, random weights", args.device, settings, pipe=pipe)


def release(klein: Any) -> None:
    import torch

    del klein
    gc.collect()
    torch.compiler.set_stance("default")
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False


# Running scenarios -------------------------------------------------------------------------------------------


def reference_images(scenario: Scenario) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in scenario.references]


def run_scenario(
    klein: Any, scenario: Scenario, flops: ScenarioFlops, args: argparse.Namespace, repeat_prompt: bool = False
) -> Result:
    import torch

    from models.klein import GenerationParams

    cuda = klein.device.type == "cuda"
    references = reference_images(scenario)

    def params(i: int) -> GenerationParams:
        return GenerationParams(
            prompt=PROMPT if repeat_prompt else f"{PROMPT}, variation {i}",
            width=scenario.width,
            height=scenario.height,
            num_inference_steps=scenario.steps,
            guidance_scale=1.0,
            seed=i,
            output_format="png",
            output_quality=80,
            num_outputs=scenario.batch,
        )

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup):
        klein.generate(params(10_000 + i), references)
    times = []
    for i in range(args.iters):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        images = klein.generate(params(i), references)  # PIL out: the device is done
        times.append(time.perf_counter() - started)
        assert len(images) == scenario.batch
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:  # the process's peak resident memory so far (Linux reports KiB)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    p50 = statistics.median(times)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    floor_s = flops.floor_s(args.peak_tflops)
    return Result(
        key=scenario.key,
        scenario=scenario.label,
        p50_s=p50,
        p90_s=p90,
        mean_s=statistics.fmean(times),
        images_per_s=scenario.batch / p50,
        peak_gb=peak_gb,
        tflop=flops.total / 1e12,
        floor_s=floor_s,
        floor_fraction=floor_s / p50,
        iterations=len(times),
        times_s=times,
    )


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    chosen = [s for s in SCENARIOS if not args.scenarios or s.key in args.scenarios.split(",")]
    if not chosen:
        raise SystemExit(f"no scenario among {args.scenarios!r}; known: {', '.join(s.key for s in SCENARIOS)}")
    return [s.scaled(args.tiny_scale) for s in chosen] if args.tiny else chosen


def results_table(results: list[Result], memory: str) -> str:
    lines = [
        f"| scenario | p50 s | p90 s | images/s | {memory} | TFLOP | floor s | floor fraction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.p50_s:.4f} | {r.p90_s:.4f} | {r.images_per_s:.2f} | {r.peak_gb:.2f} "
            f"| {r.tflop:.4g} | {r.floor_s:.4g} | {r.floor_fraction:.3g} |"
        )
    return "\n".join(lines)


# Numerical difference (FP8 vs bf16) -------------------------------------------------------------------------


def relative_error(value: Any, reference: Any) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def numerical_difference(
    pipe: Any, mutate: Callable[[Any], str], width: int, height: int, seed: int = 0
) -> dict[str, Any]:
    """Transformer output and decoded image before and after `mutate(pipe)`, on the same inputs."""
    import torch

    device = pipe._execution_device
    with torch.inference_mode():
        prompt_embeds, text_ids = pipe.encode_prompt(prompt=PROMPT, device=device, max_sequence_length=512)
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


FP8_MAX = 448.0  # largest float8_e4m3fn value


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


def fp8_difference(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """FP8 against bf16 on one fresh pipeline (switches off, eager), on the same inputs. With torchao on a
    GPU of compute capability ≥ 8.9 the real kernels; elsewhere (CPU, --tiny) the emulation above."""
    from models.optimize import quantize_fp8

    klein = make_pipeline(args, settings.model_copy(update=BASELINE))
    device = klein.device
    size = scenarios_for(args)[0]

    def mutate(pipe: Any) -> str:
        outcome = quantize_fp8(pipe.transformer, device)
        if outcome.startswith("skipped"):
            print(f"FP8 {outcome}; measuring its emulation instead", flush=True)
            return emulate_fp8(pipe.transformer)
        return outcome

    try:
        return numerical_difference(klein.pipe, mutate, size.width, size.height)
    finally:
        release(klein)


# Main ---------------------------------------------------------------------------------------------------


def environment(device: Any) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, the tiny random-weights pipeline (CI mode)")
    parser.add_argument("--model", help="load real weights from this diffusers folder instead of random ones")
    parser.add_argument("--device", help="default: cuda, or cpu with --tiny")
    parser.add_argument("--scenarios", help="comma-separated keys: " + ",".join(s.key for s in SCENARIOS))
    parser.add_argument("--iters", type=int, help="timed calls per scenario (default 10; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed calls per scenario first (default 2; 1 with --tiny)")
    parser.add_argument("--tiny-scale", type=int, default=4, help="--tiny: divide every side by this (default 4)")
    parser.add_argument("--repeat-prompt", action="store_true", help="the same prompt every call (cache hits)")
    parser.add_argument("--compare", action="store_true", help="baseline vs each switch on its own, then all")
    parser.add_argument("--switches", help="--compare: only these variants (comma-separated names)")
    parser.add_argument("--fp8-error", action="store_true", help="FP8 vs bf16 relative error on the same inputs")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 rate of the floor")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.iters = args.iters or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from core.settings import Settings

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --tiny for the CPU mode", file=sys.stderr)
        return 2
    settings = Settings()  # KLEIN_* from the environment, as the worker reads them
    scenarios = scenarios_for(args)
    env = environment(device)
    mode = "CPU, tiny random-weights pipeline (not GPU figures)" if args.tiny else env.get("gpu", str(device))
    print(f"# klein GPU benchmark: {mode}", flush=True)
    print(
        f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
        f"torchao {env['torchao']}"
    )
    memory = "peak GB (GPU allocated)" if device.type == "cuda" else "peak GB (process RSS)"
    report: dict[str, Any] = {"environment": env, "mode": mode, "peak_tflops": args.peak_tflops}

    klein = make_pipeline(args, settings)
    counter = FlopCounter.for_pipeline(klein.pipe)
    flops = {s.key: counter.scenario(s) for s in scenarios}
    print(f"speed switches: {klein.speedups.summary()}")
    startup = klein.startup
    print(
        f"worker start: process start to ready {startup.process_s or float('nan'):.1f} s "
        f"(load/placement {startup.load_s:.1f} s, speed-ups {startup.speedups_s:.1f} s, "
        f"warm-up {startup.warmup_s:.1f} s over {startup.warmup_shapes} shapes)",
        flush=True,
    )
    results = [run_scenario(klein, s, flops[s.key], args, args.repeat_prompt) for s in scenarios]
    print(results_table(results, memory), flush=True)
    report |= {
        "settings": {k: getattr(settings, k) for k in (*BASELINE, "dtype", "compile_mode", "warmup_sizes")},
        "speedups": klein.speedups.outcomes,
        "startup": asdict(startup),
        "flops": {k: v.as_dict(args.peak_tflops) for k, v in flops.items()},
        "results": [asdict(r) for r in results],
    }
    release(klein)

    if args.compare:
        report["compare"] = compare(args, settings, scenarios, flops, memory)
    if args.fp8_error:
        difference = fp8_difference(args, settings)
        report["fp8_difference"] = difference
        print("FP8 vs bf16 on the same inputs:", json.dumps(difference, indent=1))

    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def compare(
    args: argparse.Namespace,
    settings: Any,
    scenarios: list[Scenario],
    flops: dict[str, ScenarioFlops],
    memory: str,
) -> list[dict[str, Any]]:
    chosen = variants(args.device.startswith("cuda"))
    if args.switches:
        names = args.switches.split(",")
        chosen = [v for v in chosen if v.name in names or v.name == "baseline"]
    rows: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    for variant in chosen:
        # Warm exactly the benchmarked shapes at start when compiling, so the start-up figure covers them.
        warmup = [f"{s.width}x{s.height}" + "".join(f"+{w}x{h}" for w, h in s.references) for s in scenarios]
        overrides = BASELINE | variant.overrides
        compiled = overrides["compile_transformer"] or overrides["compile_vae"]
        variant_settings = settings.model_copy(update=overrides | {"warmup_sizes": warmup if compiled else []})
        try:
            klein = make_pipeline(args, variant_settings)
        except Exception as exc:  # a backend that is not installed: reported, the comparison goes on
            print(f"{variant.name}: could not set up: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": variant.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            results = [run_scenario(klein, s, flops[s.key], args, variant.repeat_prompt) for s in scenarios]
        except Exception as exc:
            print(f"{variant.name}: failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": variant.name, "error": f"{type(exc).__name__}: {exc}"})
            release(klein)
            continue
        outcomes = {k: v for k, v in klein.speedups.outcomes.items() if k in variant.overrides}
        row = {
            "variant": variant.name,
            "outcomes": outcomes,
            "startup_s": klein.startup.ready_s,
            "results": [asdict(r) for r in results],
        }
        if variant.name == "baseline":
            baseline = {r.key: r.p50_s for r in results}
        rows.append(row)
        release(klein)
        speedups = ", ".join(
            f"{r.key} {r.p50_s:.4f} s ({baseline[r.key] / r.p50_s:.2f}×, floor {r.floor_fraction:.3g})"
            for r in results
            if r.key in baseline
        )
        print(f"{variant.name}: {speedups} | {outcomes or ''}", flush=True)

    keys = [s.key for s in scenarios]
    lines = [
        "| variant | " + " | ".join(f"{k} p50 s (× baseline)" for k in keys) + f" | {memory} max | start s | outcome |",
        "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | " + " | ".join("—" for _ in keys) + f" | — | — | {row['error']} |")
            continue
        by_key = {r["key"]: r for r in row["results"]}
        cells = [f"{by_key[k]['p50_s']:.4f} ({baseline.get(k, float('nan')) / by_key[k]['p50_s']:.2f}×)" for k in keys]
        peak = max(r["peak_gb"] for r in row["results"])
        outcome = "; ".join(f"{k}: {v}" for k, v in row["outcomes"].items())
        lines.append(
            f"| {row['variant']} | " + " | ".join(cells) + f" | {peak:.2f} | {row['startup_s']:.1f} | {outcome} |"
        )
    print("\n" + "\n".join(lines), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
