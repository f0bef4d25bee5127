"""The worker's speed switches (models/optimize.py) on the tiny pipeline on CPU, the FLOP counter and the
GPU benchmark's CPU mode.

Every switch that can run on a CPU runs here and must give the baseline's images: bit-identical where
the computation is the same (text-encoder truncation, prompt cache), numerically close where kernels
change (fused QKV, channels-last VAE, another attention kernel, torch.compile). Switches that need CUDA
must be skipped with a reason, never fail. One test compiles with inductor for real (~40 s on a cold
compile cache, ~10 s warm); the others trace the same full graphs with torch.compile's eager backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_variant import BASELINE as variant_baseline
from models.klein import GenerationParams

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
TOKENS = 64  # text tokens in these tests (the worker's 512 only makes the tiny text encoder slower)
BASELINE: dict[str, Any] = variant_baseline | {"warmup_sizes": None}  # every switch off, as the benchmark's


def make(pipe: Any = None, **switches: Any) -> Any:
    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    settings = Settings(**(BASELINE | switches))
    return KleinPipeline("tiny", "cpu", settings, pipe=pipe if pipe is not None else build_tiny_pipeline())


def render(klein: Any, prompt: str = "a red fox in snow", seed: int = 7, size: int = SIZE, outputs: int = 1) -> Any:
    """Float pixels straight from the pipeline (the worker's call, before PIL rounding)."""
    import torch

    with torch.inference_mode():
        return klein.pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=2,
            guidance_scale=1.0,
            num_images_per_prompt=outputs,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            max_sequence_length=TOKENS,
        ).images


@pytest.fixture(scope="module")
def baseline() -> Any:
    return render(make())


def test_all_switches_off_is_the_plain_diffusers_pipeline(baseline: Any) -> None:
    import numpy as np
    import torch

    from models.tiny import build_tiny_pipeline

    plain = build_tiny_pipeline()
    plain.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        expected = plain(
            prompt="a red fox in snow",
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
            max_sequence_length=TOKENS,
        ).images
    assert np.array_equal(baseline, expected)


@pytest.mark.parametrize(
    ("switches", "exact"),
    [
        ({"truncate_text_encoder": True}, True),
        ({"prompt_cache_size": 8}, True),
        ({"fuse_qkv": True}, False),
        ({"vae_channels_last": True}, False),
        ({"attention_backend": "_native_math"}, False),
        ({"attention_backend": "auto"}, False),
        ({}, False),  # the settings' defaults, whatever they are
    ],
    ids=["truncate", "prompt-cache", "fuse-qkv", "channels-last", "math-attention", "auto-attention", "defaults"],
)
def test_each_cpu_switch_gives_the_baseline_images(baseline: Any, switches: dict[str, Any], exact: bool) -> None:
    import numpy as np

    from core.settings import Settings

    settings = BASELINE | switches if switches else {k: getattr(Settings(), k) for k in BASELINE}
    klein = make(**settings)
    for name, value in switches.items():
        assert not klein.speedups.outcomes[name].startswith("skipped"), klein.speedups.outcomes
        assert value is not None
    images = render(klein)
    if exact:
        assert np.array_equal(images, baseline)
    else:
        np.testing.assert_allclose(images, baseline, atol=2e-4)
    assert np.array_equal(render(klein), images)  # and deterministic


@pytest.mark.parametrize(
    "switches",
    [
        {"fp8": True},
        {"attention_backend": "_native_cudnn"},
        {"attention_backend": "_flash_3"},
        {"attention_backend": "flash"},
        {"cudnn_benchmark": True},
    ],
    ids=["fp8", "cudnn-attention", "fa3", "flash", "cudnn-benchmark"],
)
def test_cuda_only_switches_are_skipped_on_cpu(baseline: Any, switches: dict[str, Any]) -> None:
    import numpy as np

    klein = make(**switches)
    (name,) = switches
    assert klein.speedups.outcomes[name].startswith("skipped"), klein.speedups.outcomes
    assert np.array_equal(render(klein), baseline)


def tiny_with_deep_text_encoder(layers: int = 36) -> Any:
    """The tiny pipeline with a text encoder deeper than the 28 layers the pipeline reads (like Qwen3-4B's 36)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    config = pipe.text_encoder.config.to_dict() | {"num_hidden_layers": layers}
    config.pop("layer_types", None)
    torch.manual_seed(1)
    pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    return pipe


def test_text_encoder_truncation_is_bit_exact() -> None:
    import numpy as np
    import torch

    from models.optimize import SkippedLogits, truncate_text_encoder

    full, truncated = make(tiny_with_deep_text_encoder()), make(tiny_with_deep_text_encoder())
    assert len(truncated.pipe.text_encoder.model.layers) == 36
    assert truncate_text_encoder(truncated.pipe.text_encoder) == "on: 28 of 36 layers, no logits"
    te = truncated.pipe.text_encoder
    assert len(te.model.layers) == te.config.num_hidden_layers == len(te.config.layer_types) == 28
    assert isinstance(te.lm_head, SkippedLogits) and te.lm_head.original_layers == 36

    cpu = torch.device("cpu")
    with torch.inference_mode():
        for images_per_prompt in (1, 3):
            a, ids_a = full.pipe.encode_prompt("a red fox", cpu, images_per_prompt, max_sequence_length=TOKENS)
            b, ids_b = truncated.pipe.encode_prompt("a red fox", cpu, images_per_prompt, max_sequence_length=TOKENS)
            assert torch.equal(a, b) and torch.equal(ids_a, ids_b)
        tokens = torch.arange(20).unsqueeze(0)
        out = te(input_ids=tokens, output_hidden_states=True, use_cache=False)
        reference = full.pipe.text_encoder(input_ids=tokens, output_hidden_states=True, use_cache=False)
    assert out.logits.numel() == 0 and reference.logits.shape[-1] == te.config.vocab_size
    assert all(torch.equal(out.hidden_states[k], reference.hidden_states[k]) for k in (0, 9, 18, 27))
    assert np.array_equal(render(full), render(truncated))
    # Through the settings switch too, and idempotent.
    switched = make(tiny_with_deep_text_encoder(), truncate_text_encoder=True)
    assert switched.speedups.outcomes["truncate_text_encoder"] == "on: 28 of 36 layers, no logits"
    assert truncate_text_encoder(switched.pipe.text_encoder) == "on: 28 of 28 layers, no logits"
    assert np.array_equal(render(switched), render(full))


def test_prompt_cache_hits_return_identical_embeddings(baseline: Any) -> None:
    import numpy as np
    import torch

    from models.optimize import PromptCache

    plain, cached = make(), make(prompt_cache_size=2)
    cache = cached.prompt_cache
    assert isinstance(cache, PromptCache) and plain.prompt_cache is None
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for images_per_prompt in (1, 2, 1):
            expected = plain.pipe.encode_prompt("a cat", device=cpu, num_images_per_prompt=images_per_prompt)
            got = cached.pipe.encode_prompt("a cat", device=cpu, num_images_per_prompt=images_per_prompt)
            assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
        assert (cache.hits, cache.misses, len(cache)) == (2, 1, 1)
        # Another sequence length is another entry; precomputed embeddings bypass the cache.
        short = cached.pipe.encode_prompt("a cat", device=cpu, max_sequence_length=64)[0]
        assert short.shape[1] == 64 and (cache.misses, len(cache)) == (2, 2)
        cached.pipe.encode_prompt(None, device=cpu, prompt_embeds=short)
        assert (cache.hits, cache.misses) == (2, 2)
        # LRU: a third prompt evicts the least recently used entry.
        cached.pipe.encode_prompt("a dog", device=cpu)
        assert len(cache) == 2
        cached.pipe.encode_prompt("a cat", device=cpu)  # evicted: a miss
        assert (cache.hits, cache.misses) == (2, 4)

    first = render(cached)
    hits = cache.hits
    assert np.array_equal(render(cached), first) and cache.hits == hits + 1
    assert np.array_equal(first, baseline)
    assert np.array_equal(render(cached, outputs=2), render(plain, outputs=2))


def test_fuse_qkv_fuses_and_frees_the_unfused_weights(baseline: Any) -> None:
    import numpy as np

    klein = make(fuse_qkv=True)
    assert klein.speedups.outcomes["fuse_qkv"].startswith("on: freed")
    (block,) = klein.pipe.transformer.transformer_blocks
    assert block.attn.fused_projections and hasattr(block.attn, "to_qkv") and hasattr(block.attn, "to_added_qkv")
    assert not any(hasattr(block.attn, name) for name in ("to_q", "to_k", "to_v", "add_q_proj"))
    np.testing.assert_allclose(render(klein), baseline, atol=2e-4)


def test_fp8_quantises_only_the_blocks_token_projections() -> None:
    from models.optimize import fp8_filter

    klein = make(fuse_qkv=True)
    chosen = [name for name, module in klein.pipe.transformer.named_modules() if fp8_filter(module, name)]
    assert "transformer_blocks.0.attn.to_qkv" in chosen
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in chosen
    assert not any(name.startswith(("x_embedder", "context_embedder", "proj_out", "time_")) for name in chosen)


def test_compile_traces_the_blocks_and_vae_decoder_as_full_graphs(baseline: Any) -> None:
    """fullgraph=True fails on any graph break; the eager backend checks that in seconds on CPU."""
    import numpy as np
    import torch

    from models.optimize import compile_transformer, compile_vae

    klein = make()
    cpu = torch.device("cpu")
    try:
        assert "fullgraph=True" in compile_transformer(klein.pipe.transformer, cpu, backend="eager")
        assert "dynamic=False" in compile_vae(klein.pipe.vae, cpu, backend="eager")
        np.testing.assert_allclose(render(klein), baseline, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_inductor_compile_at_start_serves_without_compiling_again() -> None:
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    params = GenerationParams(
        prompt="a red fox in snow",
        width=SIZE,
        height=SIZE,
        num_inference_steps=2,
        guidance_scale=1.0,
        seed=7,
        output_format="png",
        output_quality=80,
    )
    expected = np.asarray(make().generate(params)[0], dtype=int)
    try:
        klein = make(compile_transformer=True, compile_vae=True, warmup_sizes=[f"{SIZE}x{SIZE}"])
        assert klein.startup.warmup_shapes == 1 and klein.startup.warmup_s > 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 3  # a double block, a single block, the VAE decoder
        image = np.asarray(klein.generate(params)[0], dtype=int)
        assert counters["stats"]["unique_graphs"] == graphs  # the warmed shape: compiled code, no compilation
        assert np.abs(image - expected).max() <= 1
        # A shape that was not warmed up runs eagerly rather than compiling inside a request.
        render(klein, size=2 * SIZE)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


def test_warmup_shapes_follow_the_settings() -> None:
    from core.settings import Settings
    from models.optimize import WarmupShape, parse_warmup_shape, warmup_shapes

    assert warmup_shapes(Settings(compile_transformer=False, compile_vae=False, warmup_sizes=None)) == []
    buckets = warmup_shapes(Settings(compile_transformer=True, warmup_sizes=None))
    assert WarmupShape(1024, 1024) in buckets and WarmupShape(1360, 768) in buckets and len(buckets) == 11
    assert warmup_shapes(Settings(warmup_sizes=["512x512", "1024x1024+768x512"])) == [
        WarmupShape(512, 512),
        WarmupShape(1024, 1024, ((768, 512),)),
    ]
    assert str(parse_warmup_shape("1024x1024+768x512")) == "1024x1024+768x512"
    for bad in ("1024", "1000x1000", "32x32", "axb"):
        with pytest.raises(ValueError):
            parse_warmup_shape(bad)


def test_worker_start_warms_up_and_reports_its_times(tiny_model: Path) -> None:
    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline

    settings = Settings(warmup_sizes=[f"{SIZE}x{SIZE}", f"{SIZE}x{SIZE}+{SIZE}x{SIZE}"])
    klein = KleinPipeline(str(tiny_model), "cpu", settings)  # from disk, the worker's path
    startup = klein.startup
    assert startup.warmup_shapes == 2 and startup.warmup_s > 0 and startup.load_s > 0
    assert startup.ready_s >= startup.load_s + startup.warmup_s
    assert startup.process_s is None or startup.process_s >= startup.ready_s
    params = GenerationParams(
        prompt="a cat",
        width=SIZE,
        height=SIZE,
        num_inference_steps=2,
        guidance_scale=1.0,
        seed=1,
        output_format="png",
        output_quality=80,
    )
    (image,) = klein.generate(params)
    assert image.size == (SIZE, SIZE)


def test_flop_counter_on_the_real_configs_matches_the_field_notes() -> None:
    from bench.flops import SCENARIOS, FlopCounter

    counter = FlopCounter.real()
    params = counter.parameters()
    assert round(params["transformer"] / 1e9, 3) == 3.876
    assert round(params["text_encoder"] / 1e9, 3) == 4.022  # 4.411 with the tied LM head counted again
    assert round(params["vae"] / 1e6) == 84
    t2i_1024, t2i_512, edit = (counter.scenario(s) for s in SCENARIOS[:3])
    assert t2i_1024.transformer_step == pytest.approx(34.8e12, rel=0.01)
    assert t2i_1024.vae_decode == pytest.approx(10.5e12, rel=0.01)
    assert t2i_1024.text_encoder_as_shipped == pytest.approx(4.3e12, rel=0.02)
    assert t2i_1024.total_as_shipped == pytest.approx(154e12, rel=0.01)
    assert t2i_1024.text_encoder < 0.75 * t2i_1024.text_encoder_as_shipped  # 28 of 36 layers, no logits
    assert t2i_512.total_as_shipped == pytest.approx(48e12, rel=0.03)
    assert 2 < edit.transformer_step / t2i_1024.transformer_step < 2.4  # a 1024² reference doubles the tokens
    assert edit.vae_encode > 0 and t2i_1024.vae_encode == 0
    assert t2i_1024.floor_s(800) == pytest.approx(t2i_1024.total / 800e12)


def test_flop_counter_scales_with_tokens_and_pixels() -> None:
    from bench.flops import FlopCounter, Scenario
    from models.tiny import build_tiny_pipeline

    counter = FlopCounter.for_pipeline(build_tiny_pipeline())
    one, two, four = (counter.transformer_step(n) for n in (256, 512, 1024))
    assert 1.0 < two / one < 4.0 and 1.0 < four / two < 4.0  # linear layers ∝ tokens, attention ∝ (tokens + 512)²
    assert counter.transformer_step(256, batch=2) == pytest.approx(2 * one)
    assert counter.vae_decode(128, 128) == pytest.approx(4 * counter.vae_decode(64, 64), rel=0.05)
    small, big = counter.scenario(Scenario("a", "a", 64, 64)), counter.scenario(Scenario("b", "b", 128, 128, steps=8))
    assert big.transformer == 8 * big.transformer_step and big.total > small.total


def test_real_pipeline_builds_on_meta() -> None:
    import torch

    from bench.real_model import build_real_pipeline

    pipe = build_real_pipeline("meta", torch.bfloat16)
    assert pipe.transformer.config.num_single_layers == 20 and pipe.text_encoder.config.num_hidden_layers == 36
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.tokenizer.pad_token_id < pipe.text_encoder.config.vocab_size == 151936


def test_fp8_numerical_difference_path_runs_on_cpu() -> None:
    from bench.gpu_fp8 import emulate_fp8, numerical_difference

    klein = make()
    report = numerical_difference(klein.pipe, lambda pipe: emulate_fp8(pipe.transformer), SIZE, SIZE)
    assert report["variant"].startswith("emulated: ") and report["finite"]
    assert 0 < report["transformer_relative_error"] < 0.1 and 0 < report["image_relative_error"] < 0.1


def test_gpu_benchmark_cpu_mode_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--iters", "2", "--warmup", "0", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| scenario | p50 s | p90 s | images/s |" in result.stdout
    report = json.loads(out.read_text())
    assert [r["key"] for r in report["results"]] == ["t2i-1024", "t2i-512", "edit-1024", "edit2-1024", "batch4-512"]
    for row in report["results"]:
        assert row["p50_s"] > 0 and row["tflop"] > 0 and 0 < row["floor_fraction"] < 1
    assert report["startup"]["ready_s"] >= 0
    checker = report["safety_checker"]  # its own scenario: the tiny classifier on CPU (bench/safety.py)
    assert [(r["checker"], r["batch"]) for r in checker] == [("tiny", 1), ("tiny", 4)], checker
    assert all(r["ms_per_image"] > 0 for r in checker)
