"""The FLUX.2 [klein] pipeline on a device. Imported by workers only (torch lives here)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline
from PIL import Image as PILImage
from PIL.Image import Image

from core.settings import Settings, get_settings
from models import lora
from models.klein import GenerationParams
from models.optimize import (
    PromptCache,
    SpeedupReport,
    WarmupShape,
    apply_speedups,
    check_out_layers,
    fall_back_to_native_attention,
    pick_dtype,
    process_age_s,
    warmup_shapes,
)
from models.registry import ModelSpec, resolve, spec_for

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model_path: str, dtype: torch.dtype, device: torch.device) -> Any:
    """`from_pretrained` with every weight loaded straight onto `device`, never staged in host memory first.

    diffusers 0.42 takes a pipeline-level `device_map` of "cpu", "balanced" or the accelerator's type ("cuda") and
    hands it to each model's own `from_pretrained`; an index ("cuda:1") is the current CUDA device while loading.
    Needs accelerate; without it the weights are loaded on the CPU and moved (logged).
    """
    if importlib.util.find_spec("accelerate") is None:
        log.warning("accelerate is not installed: loading %s on the CPU, then moving it to %s", model_path, device)
        return Flux2KleinPipeline.from_pretrained(model_path, dtype=dtype)
    current = torch.cuda.device(device.index) if device.type == "cuda" and device.index is not None else None
    with current or contextlib.nullcontext():
        return Flux2KleinPipeline.from_pretrained(model_path, dtype=dtype, device_map=device.type)


class Stop(RuntimeError):
    """Generation stopped between steps; the message is the reason shown to the client."""


@dataclass
class StartupTimes:
    """Where a worker's start went, in seconds; `process_s` is process start to ready (None off Linux)."""

    load_s: float
    speedups_s: float
    warmup_s: float
    warmup_shapes: int
    ready_s: float
    process_s: float | None


class KleinPipeline:
    """Loaded once per worker process; `generate` runs one prediction.

    `settings` carries the speed switches (models/optimize.py); by default the process's settings.
    `pipe` hands over an already built Flux2KleinPipeline instead of loading `model_path` (benchmarks,
    tests); it goes through the same dtype, device, speed-up and warm-up steps. `spec` is the served model's
    (models/registry.py): by default the one `model_path`'s folder declares, its text-encoder hidden states
    checked against the loaded encoder before anything runs. `on_warm_up` is called when the weights are
    loaded and warming up begins.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "auto",
        settings: Settings | None = None,
        *,
        pipe: Flux2KleinPipeline | None = None,
        spec: ModelSpec | None = None,
        on_warm_up: Callable[[], None] = lambda: None,
    ) -> None:
        started = time.perf_counter()
        self.settings = settings if settings is not None else get_settings()
        self.model_path = model_path
        if spec is None:
            served = resolve(self.settings.model_id)
            if served is None:
                raise ValueError(f"KLEIN_MODEL_ID={self.settings.model_id!r} is no model of models/registry.py")
            spec = spec_for(model_path, served)
        self.spec = spec
        self.text_encoder_out_layers = tuple(self.spec.text_encoder_out_layers)
        self.device = pick_device(device)
        # bf16 on GPUs; float32 on CPU, where bf16 matmuls are slow (KLEIN_DTYPE overrides).
        self.dtype = pick_dtype(self.settings.dtype, self.device)
        built: Any = pipe if pipe is not None else load_pipeline(model_path, self.dtype, self.device)
        if bool(built.config.get("is_distilled", False)) != self.spec.distilled:
            kind = "distilled" if self.spec.distilled else "undistilled (base)"
            raise ValueError(f"{model_path}: {self.spec.id} is {kind}, these weights are not (is_distilled)")
        try:  # a clear error now rather than an IndexError in the first request
            check_out_layers(
                built.text_encoder, self.text_encoder_out_layers, built.transformer.config.joint_attention_dim
            )
        except ValueError as exc:
            raise ValueError(f"{model_path}: {exc}") from None
        for module in (built.transformer, built.text_encoder, built.vae):
            if module.dtype != self.dtype:  # a pipeline handed over in another dtype
                module.to(self.dtype)
        self.pipe: Any = built.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.parameters = sum(
            p.numel() for m in (self.pipe.transformer, self.pipe.text_encoder, self.pipe.vae) for p in m.parameters()
        )
        log.info("loaded %s on %s (%s, %.3g B parameters)", model_path, self.device, self.dtype, self.parameters / 1e9)
        loaded = time.perf_counter()
        # The whole Qwen3 causal LM for the prompt enhancer (models/enhancer.py), before truncation makes the
        # pipeline's text encoder a cut view of it: the same weights, no second copy.
        self.language_model: Any = self.pipe.text_encoder if self.settings.enhancer == "local" else None

        self.speedups: SpeedupReport = apply_speedups(
            self.pipe, self.settings, self.device, self.text_encoder_out_layers
        )
        # LoRA adapters (models/lora.py): what they may name, and the set loaded now.
        self.lora_targets = lora.targets(self.pipe.transformer)
        self.adapters = lora.Adapters(self.pipe)
        sped_up = time.perf_counter()

        shapes = warmup_shapes(self.settings)
        on_warm_up()
        with torch.compiler.set_stance("default"):  # compiles even after another pipeline set eager_on_recompile
            self.warm_up_all(shapes)
        if shapes and self.compiled:
            # Warmed shapes run compiled; any other shape runs eagerly instead of compiling inside a request.
            torch.compiler.set_stance("eager_on_recompile")
        ready = time.perf_counter()
        self.startup = StartupTimes(
            load_s=loaded - started,
            speedups_s=sped_up - loaded,
            warmup_s=ready - sped_up,
            warmup_shapes=len(shapes),
            ready_s=ready - started,
            process_s=process_age_s(),
        )
        log.info(
            "pipeline ready in %.2f s (load %.2f s, speed-ups %.2f s, warm-up %.2f s over %d shapes); "
            "process start to ready %s",
            self.startup.ready_s,
            self.startup.load_s,
            self.startup.speedups_s,
            self.startup.warmup_s,
            len(shapes),
            "n/a" if self.startup.process_s is None else f"{self.startup.process_s:.2f} s",
        )

    @property
    def compiled(self) -> bool:
        return self.settings.compile_transformer or self.settings.compile_vae

    def warm_up_all(self, shapes: Sequence[WarmupShape]) -> None:
        """Warm up every shape. When the attention backend chosen automatically fails to compile (a graph break
        under fullgraph=True, a kernel refusing a shape), start over with native SDPA instead of failing to start."""
        try:
            for shape in shapes:
                self.warm_up(shape)
        except Exception as exc:
            if not (self.compiled and self.speedups.auto_attention):
                raise
            log.exception("compiled warm-up failed with the %s attention backend", self.speedups.auto_attention)
            fall_back_to_native_attention(self.pipe.transformer, self.speedups, exc)
            self.release_memory()
            for shape in shapes:
                self.warm_up(shape)

    @property
    def prompt_cache(self) -> PromptCache | None:
        cache = self.pipe.encode_prompt
        return cache if isinstance(cache, PromptCache) else None

    def warm_up(self, shape: WarmupShape) -> None:
        """One 1-step generation at `shape`: compiles (static shapes) and autotunes before any request does."""
        started = time.perf_counter()
        references = [PILImage.new("RGB", size, (127, 127, 127)) for size in shape.references]
        params = GenerationParams(
            prompt="warm-up",
            width=shape.width,
            height=shape.height,
            num_inference_steps=1,
            guidance_scale=1.0,
            seed=0,
            output_format="png",
            output_quality=100,
            num_outputs=shape.batch,
        )
        self.generate(params, references)
        log.info("warm-up %s: %.2f s", shape, time.perf_counter() - started)

    def generate(
        self,
        params: GenerationParams,
        references: Sequence[Image] = (),
        stop_reason: Callable[[], str | None] = lambda: None,
        on_step: Callable[[int, int], None] = lambda step, total: None,
    ) -> list[Image]:
        """Text-to-image, or an edit of one reference, or generation from 2–4 references.

        After every denoising step, `on_step(steps done, steps in all)` is called and `stop_reason` asked;
        a reason (time limit, canceled) raises Stop.
        """
        return self.generate_batch([params], references, stop_reason, [on_step])[0]

    def generate_batch(
        self,
        batch: Sequence[GenerationParams],
        references: Sequence[Image] = (),
        stop_reason: Callable[[], str | None] = lambda: None,
        on_steps: Sequence[Callable[[int, int], None]] = (),
    ) -> list[list[Image]]:
        """Several predictions in one pipeline call: each its own prompt, seed and number of images; all of
        them the same size, steps, guidance and text length (core.lifecycle.BATCH_KEYS) and `references`.

        Each prediction's noise comes from its own CPU generator, drawn image by image as the pipeline does
        for one prediction alone, so a prediction's image is the one it gets alone (up to the float error
        of batched arithmetic). `on_steps[i]` hears about every step; `stop_reason` raises Stop.
        """
        first = batch[0]
        if len({params.num_outputs for params in batch}) == 1:  # the text encoder reads each prompt once
            prompts, per_prompt = [params.prompt for params in batch], first.num_outputs
        else:
            prompts, per_prompt = [params.prompt for params in batch for _ in range(params.num_outputs)], 1
        # A CPU generator draws the same noise on every device, so a seed means the same image. One
        # generator per prediction, repeated for its images: they draw in turn, as one draw of all would.
        generators = []
        for params in batch:
            generators += [torch.Generator("cpu").manual_seed(params.seed)] * params.num_outputs

        def check(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            for on_step in on_steps:
                on_step(step + 1, first.num_inference_steps)
            reason = stop_reason()
            if reason is not None:
                raise Stop(reason)
            return tensors

        with torch.inference_mode():
            result = self.pipe(
                image=list(references) or None,
                prompt=prompts,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                num_images_per_prompt=per_prompt,
                generator=generators,
                max_sequence_length=first.max_sequence_length,
                text_encoder_out_layers=self.text_encoder_out_layers,
                callback_on_step_end=check,
            )
        images = list(result.images)
        split, start = [], 0
        for params in batch:
            split.append(images[start : start + params.num_outputs])
            start += params.num_outputs
        return split

    def prepare_lora(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA's tensors in this transformer's layout (fused q/k/v where it runs them fused) and dtype."""
        fused = any(getattr(m, "fused_projections", False) for m in self.pipe.transformer.modules())
        return lora.prepare(tensors, fused, self.dtype)

    def release_memory(self) -> None:
        """After a failure (GPU out of memory above all): hand cached blocks back so the next one fits."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
