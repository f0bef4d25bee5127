"""Timing the worker's own call, `KleinPipeline.generate_batch(batch, references)`, PIL images out, per scenario.

Each measured cell says whether it ran compiled: after the shape's warm-up, one untimed call runs under
torch.compile's "fail_on_recompile" stance, which raises instead of compiling or falling back; a cell whose
shape was not compiled (or whose warm-up failed) is marked eager, never passed off as compiled.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.flops import Scenario, ScenarioFlops
from models.klein import GenerationParams
from models.optimize import WarmupShape

PROMPT = "a lighthouse on a cliff at dusk, waves breaking on the rocks, volumetric light"


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
    times_s: list[float] = field(default_factory=list)
    compiled: bool = False  # every compiled module ran its compiled graph (checked, not assumed)
    warmup_s: float | None = None  # compiling this shape (compiled variants), the worker's start-up share


def shape_of(scenario: Scenario) -> WarmupShape:
    return WarmupShape(scenario.width, scenario.height, scenario.references, scenario.batch)


def reference_images(scenario: Scenario) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in scenario.references]


def params_for(scenario: Scenario, i: int, prompt: str | None = None) -> GenerationParams:
    return GenerationParams(
        prompt=prompt if prompt is not None else f"{PROMPT}, variation {i}",
        width=scenario.width,
        height=scenario.height,
        num_inference_steps=scenario.steps,
        guidance_scale=1.0,
        seed=i,
        output_format="png",
        output_quality=80,
    )


def batch_for(scenario: Scenario, i: int, prompt: str | None = None) -> list[GenerationParams]:
    """One call of the scenario. A batch is the worker's micro-batching: `batch` predictions of one image each,
    each its own prompt and seed, in one pipeline call (KleinPipeline.generate_batch)."""
    return [params_for(scenario, i * scenario.batch + j, prompt) for j in range(scenario.batch)]


def generate(klein: Any, batch: list[GenerationParams], references: list[Any]) -> list[Any]:
    return [image for images in klein.generate_batch(batch, references) for image in images]


def runs_compiled(klein: Any, batch: list[GenerationParams], references: list[Any]) -> bool:
    """One call that may not compile nor fall back to eager: True if it ran through, False if any compiled module
    would have needed another graph for this shape. The stance is eager_on_recompile afterwards (the worker's)."""
    import torch

    torch.compiler.set_stance("fail_on_recompile")
    try:
        generate(klein, batch, references)
        return True
    except RuntimeError as exc:  # torch 2.13 raises a plain RuntimeError naming the stance
        if "fail_on_recompile" not in str(exc):
            raise
        return False
    finally:
        torch.compiler.set_stance("eager_on_recompile")


def run_scenario(
    klein: Any,
    scenario: Scenario,
    flops: ScenarioFlops,
    iters: int,
    warmup: int,
    peak_tflops: float,
    repeat_prompt: bool = False,
) -> Result:
    """`warmup` untimed calls, then `iters` timed ones. On a compiled pipeline the first untimed call is the
    compiled-or-eager check (so at least one untimed call runs)."""
    import torch

    cuda = klein.device.type == "cuda"
    references = reference_images(scenario)
    prompt = PROMPT if repeat_prompt else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    compiled = klein.compiled and runs_compiled(klein, batch_for(scenario, 20_000, prompt), references)
    for i in range(warmup - 1 if klein.compiled else warmup):
        generate(klein, batch_for(scenario, 10_000 + i, prompt), references)
    times = []
    for i in range(iters):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        images = generate(klein, batch_for(scenario, i, prompt), references)  # PIL out: the device is done
        times.append(time.perf_counter() - started)
        assert len(images) == scenario.batch
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:  # the process's peak resident memory so far (Linux reports KiB)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    p50 = statistics.median(times)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    floor_s = flops.floor_s(peak_tflops)
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
        compiled=compiled,
    )


def warm_up(klein: Any, scenario: Scenario) -> float:
    """Compile `scenario`'s shape as the worker's start-up would (KleinPipeline.warm_up_all, attention fallback
    included); seconds taken. Other shapes then run eagerly, never compiling in a measurement."""
    import torch

    torch.compiler.set_stance("default")
    started = time.perf_counter()
    try:
        klein.warm_up_all([shape_of(scenario)])
    finally:
        torch.compiler.set_stance("eager_on_recompile")
    return time.perf_counter() - started


def breakdown(klein: Any, scenario: Scenario) -> dict[str, float]:
    """One more call, timed per part (CUDA events; perf_counter on CPU): text encoder, transformer (all steps),
    VAE encode (references) and decode, the rest. Hooks go on modules that are never compiled (the transformer's
    top level, the text encoder) and wrappers on vae.encode/decode, so no compiled graph is invalidated."""
    import torch

    cuda = klein.device.type == "cuda"
    spans: dict[str, list[list[Any]]] = {}

    def mark() -> Any:
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(name: str) -> None:
        spans.setdefault(name, []).append([mark()])

    def end(name: str) -> None:
        spans[name][-1].append(mark())

    pipe, handles = klein.pipe, []
    for name, module in (("text_encoder", pipe.text_encoder), ("transformer", pipe.transformer)):
        handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: begin(n)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: end(n)))

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            begin(name)
            out = fn(*args, **kwargs)
            end(name)
            return out

        return call

    pipe.vae.encode, pipe.vae.decode = timed("vae_encode", pipe.vae.encode), timed("vae_decode", pipe.vae.decode)
    try:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        generate(klein, batch_for(scenario, 30_000), reference_images(scenario))  # new prompts: encoded
        total_ms = (time.perf_counter() - started) * 1000
    finally:
        for handle in handles:
            handle.remove()
        del pipe.vae.encode, pipe.vae.decode  # the class's methods again

    def ms(pair: list[Any]) -> float:
        return pair[0].elapsed_time(pair[1]) if cuda else (pair[1] - pair[0]) * 1000

    out = {f"{name}_ms": round(sum(ms(p) for p in pairs if len(p) == 2), 2) for name, pairs in spans.items()}
    out["other_ms"] = round(total_ms - sum(out.values()), 2)
    out["total_ms"] = round(total_ms, 2)
    return out


def results_table(results: list[Result], memory: str) -> str:
    lines = [
        f"| scenario | p50 s | p90 s | images/s | {memory} | TFLOP | floor s | floor fraction | compiled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.p50_s:.4f} | {r.p90_s:.4f} | {r.images_per_s:.2f} | {r.peak_gb:.2f} "
            f"| {r.tflop:.4g} | {r.floor_s:.4g} | {r.floor_fraction:.3g} | {'yes' if r.compiled else 'no'} |"
        )
    return "\n".join(lines)


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
        info["capability"] = list(torch.cuda.get_device_capability(device))
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    return info
