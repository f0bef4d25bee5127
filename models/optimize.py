"""Worker speed switches for the FLUX.2 [klein] pipeline, each one a field of `core.settings.Settings`.

`apply_speedups(pipe, settings, device)` applies them in a fixed order to a loaded `Flux2KleinPipeline`
and returns what it did, switch by switch. Every switch is independent, so each can be measured on its
own (`python bench/gpu.py --compare`). A switch that needs CUDA is skipped on CPU with a log line, never
an error; everything that can run on CPU does, so the tiny pipeline exercises the same code as a GPU.

Order matters where switches touch the same modules: the text encoder is truncated before anything is
compiled, QKV projections are fused before FP8 quantises the (fused) linear layers, and compilation
comes last, over the final modules. FP8 runs only inside compiled blocks, and an automatically chosen
attention backend that fails in the compiled warm-up is replaced by native SDPA (`fall_back_to_native_attention`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.klein import MAX_OUTPUTS, TEXT_ENCODER_OUT_LAYERS
from models.text_encoder import (  # noqa: F401 - re-exported: the switches' one module
    PromptCache,
    SkippedLogits,
    check_out_layers,
    encoder_layers,
    encoding_view,
    install_prompt_cache,
    truncate_text_encoder,
)

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

# Attention backends worth trying on CUDA, fastest first; "auto" takes the first that is installed and works.
CUDA_ATTENTION_CANDIDATES: tuple[str, ...] = ("_flash_3", "flash", "_native_cudnn")
# Backends that run on a CPU; any other named backend is skipped there.
CPU_ATTENTION_BACKENDS = frozenset({"native", "_native_math"})
# One compiled graph per shape (static shapes): allow as many shapes as a worker plausibly serves.
RECOMPILE_LIMIT = 64
# torch.compile's backend for both compile switches; tests trace the same full graphs with "eager" in seconds.
COMPILE_BACKEND = "inductor"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The worker's dtype. Auto: bf16 on CUDA (transformer, text encoder and VAE); float32 on CPU (bf16 is slow)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


@dataclass
class SpeedupReport:
    """What each switch did: "on …", "off", or "skipped: why"."""

    outcomes: dict[str, str] = field(default_factory=dict)
    # The backend "auto" chose when it is not native SDPA: the one a failing compiled warm-up falls back from.
    auto_attention: str | None = None

    def note(self, switch: str, outcome: str, *, warn: bool = False) -> None:
        self.outcomes[switch] = outcome
        (log.warning if warn else log.info)("speed switch %s: %s", switch, outcome)

    def summary(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.outcomes.items())


def apply_speedups(
    pipe: Any,
    settings: Settings,
    device: torch.device,
    text_encoder_out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS,
) -> SpeedupReport:
    """Apply every switch in `settings` to `pipe` (a Flux2KleinPipeline already on `device`) whose text encoder
    provides `text_encoder_out_layers` (the model spec's)."""
    report = SpeedupReport()
    cuda = device.type == "cuda"

    if settings.truncate_text_encoder and settings.enhancer == "local":
        # The prompt enhancer runs the whole causal LM: the pipeline encodes through a cut view of its weights.
        total = encoder_layers(pipe.text_encoder)
        pipe.text_encoder = encoding_view(pipe.text_encoder, text_encoder_out_layers)
        kept = encoder_layers(pipe.text_encoder)
        report.note("truncate_text_encoder", f"on: {kept} of {total} layers, no logits")
        report.note("prompt_enhancer", f"local: all {total} layers and the LM head kept, encoding reads a view of them")
    elif settings.truncate_text_encoder:
        report.note("truncate_text_encoder", truncate_text_encoder(pipe.text_encoder, text_encoder_out_layers))
    if settings.fuse_qkv:
        report.note("fuse_qkv", fuse_qkv(pipe.transformer))
    if settings.fp8:
        eager = not settings.compile_transformer
        # Eagerly, every FP8 layer adds unfused activation-quantisation kernels around its GEMM.
        reason = "skipped: FP8 runs only in compiled transformer blocks (compile_transformer is off)"
        outcome = reason if eager else quantize_fp8(pipe.transformer, device)
        report.note("fp8", outcome, warn=outcome.startswith("skipped") and (cuda or eager))
    outcome = set_attention_backend(pipe.transformer, settings.attention_backend, device)
    report.note("attention_backend", outcome)
    if outcome.endswith("(auto)"):
        report.auto_attention = outcome.split()[0]
    if settings.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
        report.note("vae_channels_last", "on")
    if settings.cudnn_benchmark:
        if cuda:
            torch.backends.cudnn.benchmark = True
            report.note("cudnn_benchmark", "on")
        else:
            report.note("cudnn_benchmark", "skipped: CUDA only")
    if settings.compile_transformer:
        compiled = compile_transformer(pipe.transformer, device, settings.compile_mode, COMPILE_BACKEND)
        report.note("compile_transformer", compiled)
    if settings.compile_vae:
        report.note("compile_vae", compile_vae(pipe.vae, device, settings.compile_mode, COMPILE_BACKEND))
    if settings.prompt_cache_size > 0:
        install_prompt_cache(pipe, settings.prompt_cache_size)
        report.note("prompt_cache_size", f"on: LRU of {settings.prompt_cache_size} prompts")
    return report


# Transformer ---------------------------------------------------------------------------------------------


def fuse_qkv(transformer: Any) -> str:
    """One QKV matmul (and one for the text stream) per double-stream block; the unfused weights are freed.

    The single-stream blocks already fuse QKV with the MLP input projection.
    """
    transformer.fuse_qkv_projections()
    freed = 0
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            names = ["to_q", "to_k", "to_v"]
            if hasattr(module, "to_added_qkv"):
                names += ["add_q_proj", "add_k_proj", "add_v_proj"]
            for name in names:
                if isinstance(getattr(module, name, None), nn.Module):
                    freed += sum(p.numel() * p.element_size() for p in getattr(module, name).parameters())
                    delattr(module, name)
    return f"on: freed {freed / 2**20:.3g} MiB of unfused weights"


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """The linear layers FP8 pays off for: the blocks' token-wise projections, dims divisible by 16.

    Embedders, modulation (one row per image) and the output projection stay in bf16.
    """
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def fp8_config() -> Any:
    """torchao's float8 config: dynamic activations, per-row scales, and hands off the process's inductor config
    (by default torchao turns on coordinate-descent tuning for every later compilation: much slower compiles)."""
    import dataclasses

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    names = {f.name for f in dataclasses.fields(Float8DynamicActivationFloat8WeightConfig)}
    extra = {"set_inductor_config": False} if "set_inductor_config" in names else {}
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **extra)


@contextlib.contextmanager
def inductor_config_kept() -> Iterator[None]:
    """Whatever runs inside may change torch._inductor.config; every value it changed is put back afterwards, also
    when it raises (torchao's quantize_ sets its recommended options before checking the hardware)."""
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    try:
        yield
    finally:
        after = inductor_config.get_config_copy()
        changed = {k: v for k, v in before.items() if after.get(k) != v}
        if changed:
            log.info("restoring inductor options changed in passing: %s", sorted(changed))
            inductor_config.load_config(changed)


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 cannot run on `device`, or None."""
    if device.type != "cuda":
        return "FP8 needs CUDA (compute capability ≥ 8.9)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"FP8 needs compute capability ≥ 8.9, this GPU has {capability[0]}.{capability[1]}"
    import importlib.util

    return None if importlib.util.find_spec("torchao") else "torchao is not installed"


def quantize_fp8(transformer: Any, device: torch.device) -> str:
    """torchao float8 dynamic activation + float8 weight, per-row scales (CUDA compute capability ≥ 8.9); the
    process's inductor config is the same before and after."""
    unavailable = fp8_unavailable(device)
    if unavailable:
        return f"skipped: {unavailable}"
    try:
        from torchao.quantization import quantize_

        config = fp8_config()
    except ImportError:
        return "skipped: torchao is not installed"
    count = sum(1 for name, module in transformer.named_modules() if fp8_filter(module, name))
    with inductor_config_kept():
        quantize_(transformer, config, filter_fn=fp8_filter)
    return f"on: {count} linear layers in float8 (torchao, per-row)"


def attention_backend_works(backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a diffusers attention backend is installed and agrees with native SDPA on a small input."""
    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
            dispatch_attention_fn,
        )

        name = AttentionBackendName(backend)
        _check_attention_backend_requirements(name)
        generator = torch.Generator(device).manual_seed(0)
        q, k, v = (
            torch.randn(1, 256, 2, 128, device=device, dtype=dtype, generator=generator) for _ in range(3)
        )  # (batch, tokens, heads, head dim), the diffusers layout
        out = dispatch_attention_fn(q, k, v, backend=name)
        ref = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
        return bool(torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2))
    except Exception as exc:  # not installed, wrong GPU, wrong version: not usable
        log.info("attention backend %s is not usable here: %s", backend, exc)
        return False


def attention_candidates(device: torch.device) -> tuple[str, ...]:
    """What "auto" tries on `device`, fastest first; nothing but native SDPA off CUDA."""
    return CUDA_ATTENTION_CANDIDATES if device.type == "cuda" else ()


def set_attention_backend(transformer: Any, requested: str, device: torch.device) -> str:
    """Auto: the first of FA3, flash-attn 2, cuDNN SDPA that works here (CUDA); native SDPA on CPU.

    The backend is always set explicitly, "native" included: diffusers also makes the last backend set the
    process-wide default, which would otherwise leak into another pipeline in the same process. The probe runs
    eagerly; whether the backend also compiles in a full graph shows only in the warm-up
    (fall_back_to_native_attention).
    """
    if requested == "auto":
        candidates = attention_candidates(device)
        chosen = "native"
        outcome = "native (auto: no faster backend works here)" if candidates else "native (auto on CPU)"
        dtype = next(transformer.parameters()).dtype
        probe_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
        for candidate in candidates:
            if attention_backend_works(candidate, device, probe_dtype):
                chosen, outcome = candidate, f"{candidate} (auto)"
                break
    elif device.type != "cuda" and requested not in CPU_ATTENTION_BACKENDS:
        chosen, outcome = "native", f"skipped: {requested} needs CUDA; native on CPU"
    else:
        chosen = outcome = requested
    transformer.set_attention_backend(chosen)
    return outcome


def fall_back_to_native_attention(transformer: Any, report: SpeedupReport, error: BaseException) -> None:
    """The automatically chosen backend failed in the compiled warm-up: forget the compiled graphs and use native
    SDPA, and say so in the report (the caller warms up again, compiling with native attention)."""
    import torch._dynamo

    failed = report.auto_attention
    torch._dynamo.reset()
    transformer.set_attention_backend("native")
    report.auto_attention = None
    first_line = next(iter(str(error).strip().splitlines()), "")[:200]
    reason = f"{type(error).__name__}: {first_line}"
    report.note("attention_backend", f"native (auto: {failed} failed in the compiled warm-up, {reason})", warn=True)


# torch.compile -------------------------------------------------------------------------------------------


def _compile_kwargs(device: torch.device, mode: str, backend: str) -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT
    )
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": backend}
    if backend == "inductor" and mode != "default":
        if device.type != "cuda" and "reduce-overhead" in mode:
            log.info("compile mode %s uses CUDA graphs; default mode on %s", mode, device.type)
        else:
            kwargs["mode"] = mode
    return kwargs


def compile_transformer(
    transformer: Any, device: torch.device, mode: str = "default", backend: str = "inductor"
) -> str:
    """Regional compilation of the repeated blocks: static shapes, one graph per resolution (warm-up compiles)."""
    kwargs = _compile_kwargs(device, mode, backend)
    transformer.compile_repeated_blocks(**kwargs)
    return f"on: repeated blocks, {_describe(kwargs)}"


def compile_vae(vae: Any, device: torch.device, mode: str = "default", backend: str = "inductor") -> str:
    """Compile the VAE decoder (the part every request runs), static shapes."""
    kwargs = _compile_kwargs(device, mode, backend)
    vae.decoder.compile(**kwargs)
    return f"on: decoder, {_describe(kwargs)}"


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


# Warm-up -------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


@dataclass(frozen=True)
class WarmupShape:
    width: int
    height: int
    references: tuple[tuple[int, int], ...] = ()
    batch: int = 1  # images per call: another batch size is another compiled shape

    def __str__(self) -> str:
        sizes = "+".join(f"{w}x{h}" for w, h in ((self.width, self.height), *self.references))
        return sizes if self.batch == 1 else f"{sizes}*{self.batch}"


def parse_size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size WxH: {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16 or width < 64 or height < 64:
        raise ValueError(f"sizes are multiples of 16, at least 64: {text!r}")
    return width, height


def parse_warmup_shape(text: str) -> WarmupShape:
    """Text-to-image "1024x1024", or "1024x1024+1024x1024": the output size, then each reference's size; "*4" at
    the end for 4 images per call."""
    text, _, batch = text.partition("*")
    if batch and not (batch.strip().isdigit() and 1 <= int(batch) <= MAX_OUTPUTS):
        raise ValueError(f"images per call are 1–{MAX_OUTPUTS}: {batch!r}")
    sizes = [parse_size(part) for part in text.split("+")]
    return WarmupShape(sizes[0][0], sizes[0][1], tuple(sizes[1:]), int(batch or 1))


def warmup_shapes(settings: Settings) -> list[WarmupShape]:
    """The shapes run once at start. Unset: every aspect-ratio size of the API when anything is compiled
    (the resolution buckets text-to-image requests use), else none."""
    if settings.warmup_sizes is not None:
        return [parse_warmup_shape(text) for text in settings.warmup_sizes]
    if not (settings.compile_transformer or settings.compile_vae):
        return []
    from typing import get_args

    from models.klein import AspectRatio, size_for_aspect_ratio

    return [WarmupShape(*size_for_aspect_ratio(ratio)) for ratio in get_args(AspectRatio)]


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), for the worker's start-to-ready figure."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
