"""The GPU path's decisions, run on CPU with the tiny pipeline through the real code (issue 23, part 1).

Each test closes one defect found when the real 4B widths ran through the worker: a text encoder without the
hidden states the spec reads, pipelines kept alive between benchmark variants, compiled-or-eager cells,
weights loaded onto the device, the automatic attention backend failing under fullgraph compilation, torchao's
process-wide inductor options and eager FP8, and the guidance the distilled model ignores. What needs a GPU
(cuDNN attention itself, FP8 kernels, CUDA device maps) is reached here only up to the decision that leads there.
"""

from __future__ import annotations

import argparse
import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest

from bench.gpu_variant import BASELINE as variant_baseline
from models.klein import GenerationParams

SIZE = 64
BASELINE: dict[str, Any] = variant_baseline | {"warmup_sizes": []}  # every switch off, as the benchmark's


def settings(**switches: Any) -> Any:
    from core.settings import Settings

    return Settings(**(BASELINE | switches))


def params(size: int = SIZE, guidance: float = 1.0, outputs: int = 1, tokens: int = 64) -> GenerationParams:
    return GenerationParams(
        prompt="a red fox in snow",
        width=size,
        height=size,
        num_inference_steps=2,
        guidance_scale=guidance,
        seed=7,
        output_format="png",
        output_quality=80,
        num_outputs=outputs,
        max_sequence_length=tokens,
    )


def pixels(images: list[Any]) -> Any:
    import numpy as np

    return np.stack([np.asarray(image, dtype=int) for image in images])


def tiny_with_text_layers(layers: int) -> Any:
    """The tiny pipeline with a text encoder cut to `layers` layers, as a cut-depth model has."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    config = pipe.text_encoder.config.to_dict() | {"num_hidden_layers": layers}
    config.pop("layer_types", None)
    torch.manual_seed(1)
    pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    return pipe


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The compile switches trace the same full graphs with torch.compile's eager backend (seconds, not minutes)."""
    import torch

    import models.optimize

    monkeypatch.setattr(models.optimize, "COMPILE_BACKEND", "eager")
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


# 1. The text encoder's hidden states are the model spec's, checked at load ------------------------------------


def test_an_encoder_without_the_specs_hidden_states_fails_at_load_not_in_a_request(tmp_path: Path) -> None:
    import dataclasses

    from models.klein_pipeline import KleinPipeline
    from models.optimize import truncate_text_encoder
    from models.registry import FLUX_KLEIN_4B, SPEC_FILE, spec_for, write_spec_file

    with pytest.raises(ValueError, match=rf"has 2 layers .*\[9, 18, 27\] do not exist.*{SPEC_FILE}"):
        KleinPipeline("cut", "cpu", settings(), pipe=tiny_with_text_layers(2))
    # Truncation no longer reports "on: 2 of 2 layers" for hidden states the encoder does not have.
    with pytest.raises(ValueError, match="do not exist"):
        truncate_text_encoder(tiny_with_text_layers(2).text_encoder)
    wrong_width = dataclasses.replace(FLUX_KLEIN_4B, text_encoder_out_layers=(0, 1))
    with pytest.raises(ValueError, match="joint_attention_dim is 24"):
        KleinPipeline("cut", "cpu", settings(), pipe=tiny_with_text_layers(2), spec=wrong_width)

    # A cut-depth folder names its own layers; the worker's path (model path only) reads them.
    folder = tmp_path / "cut"
    tiny_with_text_layers(2).save_pretrained(folder)
    write_spec_file(folder, (0, 1, 2))
    assert spec_for(str(folder)).text_encoder_out_layers == (0, 1, 2)
    klein = KleinPipeline(str(folder), "cpu", settings(truncate_text_encoder=True, prompt_cache_size=4))
    assert klein.text_encoder_out_layers == (0, 1, 2)
    assert klein.speedups.outcomes["truncate_text_encoder"] == "on: 2 of 2 layers, no logits"
    (image,) = klein.generate(params())
    assert image.size == (SIZE, SIZE)
    assert all(key[2] == (0, 1, 2) for key in klein.prompt_cache.entries)  # type: ignore[union-attr]

    (folder / SPEC_FILE).write_text(json.dumps({"text_encoder_out_layers": [0, 1], "steps": 4}))
    with pytest.raises(ValueError, match="only text_encoder_out_layers"):
        spec_for(str(folder))
    (folder / SPEC_FILE).write_text(json.dumps({"text_encoder_out_layers": [-1]}))
    with pytest.raises(ValueError, match="≥ 0"):
        spec_for(str(folder))
    assert spec_for("black-forest-labs/FLUX.2-klein-4B") is FLUX_KLEIN_4B


# 2. A dropped pipeline is freed: no cycle through the prompt cache, nothing kept by the benchmark ----------------


def test_the_prompt_cache_makes_no_reference_cycle() -> None:
    """The cache holds its pipeline weakly: dropping the last reference frees the pipeline at once. (diffusers' own
    hook registry ties the transformer to itself after a call, so the modules need the gc pass release() makes.)"""
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    klein = KleinPipeline("tiny", "cpu", settings(prompt_cache_size=4), pipe=build_tiny_pipeline())
    klein.generate(params())
    cache = klein.prompt_cache
    assert cache is not None and cache.misses == 1
    refs = [weakref.ref(x) for x in (klein, klein.pipe, cache)]
    modules = [weakref.ref(x) for x in (klein.pipe.transformer, klein.pipe.text_encoder, klein.pipe.vae)]
    del cache
    gc.collect()
    gc.disable()
    try:
        del klein
        assert [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()
    gc.collect()
    assert [ref() for ref in modules] == [None] * len(modules)


def bench_args(**overrides: Any) -> argparse.Namespace:
    base = {"device": "cpu", "tiny": True, "cut_depth": False, "model": None, "iters": 1, "warmup": 0}
    return argparse.Namespace(**(base | {"peak_tflops": 800.0, "breakdown": 1} | overrides))


def test_each_benchmark_variant_releases_its_pipeline_before_the_next(eager_compile: Any) -> None:
    from bench.flops import FlopCounter, Scenario
    from bench.gpu_variant import ALL_ON, Variant, run_variant
    from core.settings import Settings
    from models.tiny import build_tiny_pipeline

    scenarios = [Scenario("t2i", "t2i", SIZE, SIZE, steps=1), Scenario("edit", "edit", SIZE, SIZE, ((SIZE, SIZE),), 1)]
    counter = FlopCounter.for_pipeline(build_tiny_pipeline())
    flops = {s.key: counter.scenario(s) for s in scenarios}
    for variant in (Variant("baseline", {}), Variant("all (bf16)", ALL_ON)):  # all (bf16) compiles, caches prompts
        refs: list[weakref.ref[Any]] = []

        def keep(klein: Any, refs: list[weakref.ref[Any]] = refs) -> None:
            refs.extend(weakref.ref(x) for x in (klein, klein.pipe, klein.pipe.transformer, klein.pipe.vae))

        record = run_variant(bench_args(breakdown=0), variant, Settings(), scenarios, flops, on_pipeline=keep)
        assert record["status"] == "done", record
        assert refs and [ref() for ref in refs] == [None] * len(refs), variant.name


# 3. Compiled or eager: warmed shapes only, each cell checked ------------------------------------------------------


def test_benchmark_warms_exactly_the_measured_shapes_and_marks_each_cell(tmp_path: Path, eager_compile: Any) -> None:
    from bench.flops import FlopCounter, Scenario
    from bench.gpu_measure import runs_compiled, shape_of
    from bench.gpu_variant import Variant, run_variant
    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    scenarios = [Scenario("t2i", "t2i", SIZE, SIZE, steps=1), Scenario("batch2", "b", SIZE, SIZE, batch=2, steps=1)]
    counter = FlopCounter.for_pipeline(build_tiny_pipeline())
    flops = {s.key: counter.scenario(s) for s in scenarios}
    path = tmp_path / "variant.json"
    compiled = Variant("compile", {"compile_transformer": True, "compile_vae": True})
    record = run_variant(bench_args(), compiled, Settings(), scenarios, flops, path=path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(record, default=str))  # written, incl. the end
    assert [(r["key"], r["compiled"]) for r in record["results"]] == [("t2i", True), ("batch2", True)]
    assert all(r["warmup_s"] > 0 for r in record["results"])  # one warm-up per measured shape, batch included
    assert record["start_s"] >= sum(r["warmup_s"] for r in record["results"])
    parts = record["results"][0]["breakdown"]  # one more call, timed per part, compiled graphs untouched
    assert {"text_encoder_ms", "transformer_ms", "vae_decode_ms", "total_ms"} <= set(parts)
    assert parts["transformer_ms"] > 0 and parts["total_ms"] >= parts["transformer_ms"]
    eager = run_variant(bench_args(), Variant("baseline", {}), Settings(), scenarios[:1], flops)
    assert eager["results"][0]["compiled"] is False and eager["results"][0]["warmup_s"] is None

    # A shape that was not warmed is reported eager: batch 2 after warming batch 1 only.
    warm = settings(compile_transformer=True, warmup_sizes=[str(shape_of(scenarios[0]))])
    klein = KleinPipeline("tiny", "cpu", warm, pipe=build_tiny_pipeline())
    assert runs_compiled(klein, [params(tokens=512)], [])  # warm-ups run the worker's 512 text tokens
    assert not runs_compiled(klein, [params(tokens=512, outputs=2)], [])
    assert not runs_compiled(klein, [params(tokens=64)], [])  # a shorter max_sequence_length is another shape


def test_warmup_shapes_carry_the_batch_size() -> None:
    from models.optimize import WarmupShape, parse_warmup_shape

    assert parse_warmup_shape("512x512*4") == WarmupShape(512, 512, (), 4)
    assert str(parse_warmup_shape("1024x1024+768x512*2")) == "1024x1024+768x512*2"
    assert str(WarmupShape(512, 512)) == "512x512"
    for bad in ("512x512*0", "512x512*5", "512x512*x"):
        with pytest.raises(ValueError):
            parse_warmup_shape(bad)


# 4. Weights load straight onto the device ---------------------------------------------------------------------------


def test_weights_are_loaded_with_a_device_map(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    import torch
    from diffusers import Flux2KleinPipeline

    from models.klein_pipeline import KleinPipeline, load_pipeline

    klein = KleinPipeline(str(tiny_model), "cpu", settings())
    assert klein.pipe.hf_device_map == "cpu"  # diffusers' per-model device_map path, not load-then-move
    # CUDA, decision only (no GPU here): diffusers takes the device type; an index is the current device meanwhile.
    calls: list[Any] = []

    def current_device(index: int) -> Any:
        calls.append(("device", index))
        return contextlib.nullcontext()

    monkeypatch.setattr(Flux2KleinPipeline, "from_pretrained", lambda path, **kw: calls.append(("load", path, kw)))
    monkeypatch.setattr(torch.cuda, "device", current_device)
    load_pipeline("/models/klein", torch.bfloat16, torch.device("cuda:1"))
    load_pipeline("/models/klein", torch.bfloat16, torch.device("cuda"))
    assert calls == [
        ("device", 1),
        ("load", "/models/klein", {"dtype": torch.bfloat16, "device_map": "cuda"}),
        ("load", "/models/klein", {"dtype": torch.bfloat16, "device_map": "cuda"}),
    ]


# 5. The automatic attention backend, failing under fullgraph compilation, falls back to native -----------------------


@pytest.fixture
def math_attention_breaks_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, "auto" tries _native_math (as it tries cuDNN first on CUDA), which here breaks the graph when traced:
    fullgraph=True then fails at the compiled warm-up, as a backend that does not compile would."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    import models.optimize

    name = AttentionBackendName._NATIVE_MATH
    original = _AttentionBackendRegistry._backends[name]

    def breaking(**kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        return original(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, breaking)
    monkeypatch.setattr(models.optimize, "attention_candidates", lambda device: ("_native_math",))


def test_auto_attention_failing_in_the_compiled_warm_up_falls_back_to_native(
    math_attention_breaks_graphs: None, eager_compile: Any
) -> None:
    import torch

    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    expected = pixels(KleinPipeline("tiny", "cpu", settings(), pipe=build_tiny_pipeline()).generate(params()))
    compiled = settings(attention_backend="auto", compile_transformer=True, warmup_sizes=[f"{SIZE}x{SIZE}"])
    klein = KleinPipeline("tiny", "cpu", compiled, pipe=build_tiny_pipeline())
    outcome = klein.speedups.outcomes["attention_backend"]
    assert outcome.startswith("native (auto: _native_math failed in the compiled warm-up"), outcome
    assert klein.speedups.auto_attention is None and klein.startup.warmup_shapes == 1
    assert abs(pixels(klein.generate(params())) - expected).max() <= 1

    # Without compilation the probe's choice stands; a backend named explicitly is never replaced.
    eager = KleinPipeline("tiny", "cpu", settings(attention_backend="auto"), pipe=build_tiny_pipeline())
    assert eager.speedups.outcomes["attention_backend"] == "_native_math (auto)"
    named = settings(attention_backend="_native_math", compile_transformer=True, warmup_sizes=[f"{SIZE}x{SIZE}"])
    torch._dynamo.reset()  # the graphs compiled above (native attention) would otherwise serve these blocks
    with pytest.raises(Exception, match=r"graph_break|Unsupported|graph break"):
        KleinPipeline("tiny", "cpu", named, pipe=build_tiny_pipeline())


# 6. FP8: only compiled, and torchao's inductor options kept out of the process ---------------------------------------


def test_fp8_never_runs_eagerly() -> None:
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    eager = KleinPipeline("tiny", "cpu", settings(fp8=True), pipe=build_tiny_pipeline())
    assert eager.speedups.outcomes["fp8"].startswith("skipped: FP8 runs only in compiled transformer blocks")


def test_fp8_setup_leaves_the_inductor_config_as_it_was() -> None:
    import torch._inductor.config as inductor_config

    from models.optimize import inductor_config_kept

    before = inductor_config.get_config_copy()
    with pytest.raises(AssertionError), inductor_config_kept():  # what torchao's quantize_ does off SM ≥ 8.9
        inductor_config.coordinate_descent_tuning = True
        inductor_config.coordinate_descent_check_all_directions = True
        raise AssertionError("Float8 dynamic quantization requires CUDA compute capability ≥8.9")
    assert inductor_config.get_config_copy() == before


def test_torchaos_float8_setup_leaves_the_inductor_config_as_it_was() -> None:
    """torchao 0.18 (a dev dependency, as on the GPU machines) quantizes on CPU too, up to the SM ≥ 8.9 check."""
    import contextlib

    import torch._inductor.config as inductor_config
    from torch import nn
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from models.optimize import fp8_config, inductor_config_kept

    assert fp8_config().set_inductor_config is False
    before = inductor_config.get_config_copy()
    torchao_default = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())  # sets the options
    with contextlib.suppress(AssertionError, RuntimeError), inductor_config_kept():  # raises off SM ≥ 8.9
        quantize_(nn.Sequential(nn.Linear(64, 64)), torchao_default)
    assert inductor_config.get_config_copy() == before


# 7. Guidance ----------------------------------------------------------------------------------------------------------


def test_guidance_changes_nothing_for_the_distilled_model() -> None:
    from models.klein import KleinInput
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    klein = KleinPipeline("tiny", "cpu", settings(), pipe=build_tiny_pipeline())
    reference = pixels(klein.generate(params(guidance=1.0)))
    for guidance in (0.0, 3.5, 20.0):
        assert (pixels(klein.generate(params(guidance=guidance))) == reference).all()
    description = KleinInput.model_json_schema()["properties"]["guidance"]["description"]
    assert "ignored" in description and "same image" in description
