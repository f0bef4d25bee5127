"""One benchmark variant: a set of speed switches, one pipeline, every scenario, one JSON record.

`run_variant` builds the pipeline through the worker's setup (`KleinPipeline`), warms up exactly the shapes it
measures, one before each (so a variant cut short by its time limit keeps what it measured), and writes its
record after every step. It owns the only reference to the pipeline and releases it before returning: nothing
of one variant stays in memory under the next one's figures.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.flops import REAL_VAE, FlopCounter, Scenario, ScenarioFlops
from bench.gpu_measure import breakdown, environment, run_scenario, warm_up

if TYPE_CHECKING:
    from core.settings import Settings

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
ALL_ON: dict[str, Any] = {
    "attention_backend": "auto",
    "fuse_qkv": True,
    "truncate_text_encoder": True,
    "prompt_cache_size": 32,
    "vae_channels_last": True,
    "cudnn_benchmark": True,
    "compile_transformer": True,
    "compile_vae": True,
}
# The default --compare set, in the order it runs (what matters most first, under a time budget).
CORE = ("baseline", "defaults", "all (bf16)", "all + fp8")
ENV = "settings"  # the single run: the KLEIN_* settings as the worker reads them


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    repeat_prompt: bool = False

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")

    def settings(self, env: Settings) -> Settings:
        """Its settings: BASELINE plus its overrides; "defaults" the worker's defaults; ENV `env` itself. The
        bench warms up each scenario's shape itself, so none at start."""
        if self.name == ENV:
            chosen = env
        elif self.name == "defaults":
            fields = type(env).model_fields
            chosen = env.model_copy(update={k: fields[k].default for k in BASELINE})
        else:
            chosen = env.model_copy(update=BASELINE | self.overrides)
        return chosen.model_copy(update={"warmup_sizes": []})


def variants(cuda: bool) -> list[Variant]:
    """Baseline, the worker's defaults, each switch on its own, then everything on."""
    attention = (
        ["_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3"] if cuda else ["_native_math"]
    )
    out = [Variant("baseline", {}), Variant("defaults", {})]
    out += [Variant(f"attention={name}", {"attention_backend": name}) for name in attention]
    out += [
        Variant("fuse_qkv", {"fuse_qkv": True}),
        Variant("truncate_text_encoder", {"truncate_text_encoder": True}),
        Variant("prompt_cache (same prompt)", {"prompt_cache_size": 32}, repeat_prompt=True),
        Variant("vae_channels_last", {"vae_channels_last": True}),
        Variant("cudnn_benchmark", {"cudnn_benchmark": True}),
        Variant("compile_transformer", {"compile_transformer": True}),
        Variant("compile_vae", {"compile_vae": True}),
        Variant("fp8 (compiled)", {"fp8": True, "compile_transformer": True}),
        Variant("all (bf16)", ALL_ON),
        Variant("all + fp8", ALL_ON | {"fp8": True}),
    ]
    return out


# Pipelines ----------------------------------------------------------------------------------------------------


def source_name(args: Any) -> str:
    if args.model:
        return f"weights from {args.model}"
    if args.tiny:
        return "tiny random-weights pipeline"
    return "FLUX.2 [klein] 4B architecture at cut depth" if args.cut_depth else "FLUX.2 [klein] 4B architecture"


def make_pipeline(args: Any, settings: Settings) -> Any:
    """A KleinPipeline through the worker's setup path, from the tiny, the random 4B (full or cut depth) or real
    weights (`--model`, loaded as the worker loads them)."""
    import torch

    from bench.real_model import CUT, FULL, build_real_pipeline
    from models.klein_pipeline import KleinPipeline
    from models.optimize import pick_dtype

    if args.model:
        return KleinPipeline(args.model, args.device, settings)
    if args.tiny:
        from models.tiny import build_tiny_pipeline

        return KleinPipeline(source_name(args), args.device, settings, pipe=build_tiny_pipeline())
    depth = CUT if args.cut_depth else FULL
    started = time.perf_counter()
    pipe = build_real_pipeline(args.device, pick_dtype(settings.dtype, torch.device(args.device)), depth=depth)
    print(f"built the {source_name(args)} with random weights in {time.perf_counter() - started:.1f} s", flush=True)
    return KleinPipeline(source_name(args), args.device, settings, pipe=pipe, spec=depth.spec())


def flop_counter(args: Any) -> FlopCounter:
    """The FLOPs of the pipeline `make_pipeline` builds, counted on the meta device (no weights)."""
    from bench.real_model import CUT, FULL

    if args.tiny:
        from models.tiny import build_tiny_pipeline

        return FlopCounter.for_pipeline(build_tiny_pipeline())
    if args.model:
        from models.registry import spec_for

        folder = Path(args.model)
        configs = [json.loads((folder / part / "config.json").read_text()) for part in ("transformer", "text_encoder")]
        vae = json.loads((folder / "vae" / "config.json").read_text())
        text = {k: v for k, v in configs[1].items() if k not in ("architectures", "dtype", "torch_dtype")}
        out_layers = spec_for(args.model).text_encoder_out_layers
        return FlopCounter(configs[0], text, vae, out_layers=out_layers)
    depth = CUT if args.cut_depth else FULL
    transformer, text_encoder, _ = depth.configs()
    return FlopCounter(transformer, text_encoder, REAL_VAE, out_layers=depth.out_layers)


def release() -> None:
    """After the last reference to a pipeline is dropped: compiled graphs, cycles, cached GPU blocks."""
    import torch

    torch.compiler.set_stance("default")
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False


# One variant ----------------------------------------------------------------------------------------------------


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically: a process killed mid-write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def run_variant(
    args: Any,
    variant: Variant,
    env: Settings,
    scenarios: list[Scenario],
    flops: dict[str, ScenarioFlops],
    path: Path | None = None,
    on_pipeline: Callable[[Any], None] = lambda klein: None,
) -> dict[str, Any]:
    """Measure `variant` over `scenarios`; the record, also written to `path` after every step."""
    import torch

    from models.optimize import fp8_unavailable

    started = time.perf_counter()
    settings = variant.settings(env)
    switches = {k: getattr(settings, k) for k in (*BASELINE, "dtype", "compile_mode")}
    record: dict[str, Any] = {"variant": variant.name, "status": "started", "settings": switches, "results": []}
    record["errors"] = []

    def save(status: str | None = None) -> None:
        if status:
            record["status"] = status
        record["elapsed_s"] = round(time.perf_counter() - started, 2)
        if path is not None:
            write_json(path, record)

    device = torch.device(args.device)
    record["environment"] = environment(device)
    save()
    unavailable = fp8_unavailable(device) if settings.fp8 else None
    if unavailable:  # measuring it would measure bf16 under an FP8 name
        save(f"skipped: {unavailable}")
        return record
    try:
        klein = make_pipeline(args, settings)
    except Exception as exc:  # a backend that is not installed: reported, the comparison goes on
        traceback.print_exc()
        record["errors"].append(f"setup: {type(exc).__name__}: {exc}")
        save("setup failed")
        release()
        return record
    try:
        on_pipeline(klein)
        record["startup"] = asdict(klein.startup)
        record["outcomes"] = dict(klein.speedups.outcomes)
        record["text_encoder_out_layers"] = list(klein.text_encoder_out_layers)
        save("measuring")
        print(f"[{variant.name}] {klein.speedups.summary()}", flush=True)
        for scenario in scenarios:
            try:
                warm = warm_up(klein, scenario) if klein.compiled else None
                floor = flops[scenario.key]
                repeat = variant.repeat_prompt
                result = run_scenario(klein, scenario, floor, args.iters, args.warmup, args.peak_tflops, repeat)
                result.warmup_s = warm
                row = asdict(result)
                if args.breakdown:
                    row["breakdown"] = breakdown(klein, scenario)
                record["results"].append(row)
                print(
                    f"[{variant.name}] {scenario.key}: p50 {result.p50_s:.4f} s, {result.images_per_s:.2f} img/s, "
                    f"peak {result.peak_gb:.2f} GB, {'compiled' if result.compiled else 'eager'}"
                    + (f" (compiled in {warm:.1f} s)" if warm is not None else ""),
                    flush=True,
                )
            except Exception as exc:
                traceback.print_exc()
                record["errors"].append(f"{scenario.key}: {type(exc).__name__}: {exc}")
                klein.release_memory()
            record["outcomes"] = dict(klein.speedups.outcomes)  # a failed compiled warm-up changes attention
            save()
        warmups = sum(r["warmup_s"] or 0.0 for r in record["results"])
        record["start_s"] = round(klein.startup.ready_s + warmups, 2)  # a worker warming these shapes at start
    finally:
        klein = None  # the only reference; diffusers' own module cycles and compiled graphs go in release()
        release()
    save("done with errors" if record["errors"] else "done")
    return record
