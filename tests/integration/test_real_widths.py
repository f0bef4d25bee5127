"""The real FLUX.2 [klein] 4B widths through the worker's own load and generate path, on CPU, on every commit.

bench/real_model.py builds the released configs at cut depth (1 double + 1 single block, a 4-layer Qwen3 reading
hidden states 0-2; every width real: 3072-wide blocks, 24 heads × 128, a 2560-wide text encoder with its
151,936-entry embedding, the real VAE) with random weights, and saves them as a diffusers folder with the real
model_index.json. The worker's KleinPipeline loads it from disk as it loads the checkpoint, with every speed
switch that runs on a CPU, and generates: text-to-image at 256², an edit with one reference, a batch of two.
This is the test that fails when diffusers or transformers change under us. ≈ 60-90 s on 2 cores.
"""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.klein import GenerationParams

OUTPUTS: dict[str, Any] = {}  # pixels the tests compare across pipelines (one pipeline in memory at a time)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from bench.real_model import save_real_layout

    folder = tmp_path_factory.mktemp("klein-4b-cut")
    yield save_real_layout(folder)
    shutil.rmtree(folder, ignore_errors=True)  # 2.7 GB of bf16 weights


def params(size: int, outputs: int = 1, tokens: int = 512) -> GenerationParams:
    return GenerationParams(
        prompt="a lighthouse on a cliff at dusk",
        width=size,
        height=size,
        num_inference_steps=1,
        guidance_scale=1.0,
        seed=3,
        output_format="png",
        output_quality=80,
        num_outputs=outputs,
        max_sequence_length=tokens,
    )


def pixels(images: list[Any]) -> Any:
    import numpy as np

    return np.stack([np.asarray(image, dtype=int) for image in images])


def released(klein: Any) -> list[weakref.ref[Any]]:
    return [weakref.ref(x) for x in (klein, klein.pipe, klein.pipe.transformer, klein.pipe.text_encoder)]


def test_the_folder_has_the_real_layout(real_folder: Path) -> None:
    from models.registry import SPEC_FILE
    from models.tiny import MARKER

    index = json.loads((real_folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"][1] in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    transformer = json.loads((real_folder / "transformer" / "config.json").read_text())
    assert (transformer["num_attention_heads"], transformer["attention_head_dim"]) == (24, 128)
    assert (transformer["joint_attention_dim"], transformer["in_channels"]) == (7680, 128)
    text = json.loads((real_folder / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]) == (2560, 151936, 4)
    assert json.loads((real_folder / SPEC_FILE).read_text()) == {"text_encoder_out_layers": [0, 1, 2]}
    assert (real_folder / MARKER).exists()  # the API reports random weights


def test_the_worker_loads_and_generates_with_every_cpu_switch(real_folder: Path) -> None:
    import torch
    from PIL import Image

    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline

    # The worker's defaults: truncation, prompt cache, fused QKV, auto attention, channels-last VAE (cuDNN
    # benchmark and FP8 are CUDA-only, compilation is tested below).
    klein = KleinPipeline(str(real_folder), "cpu", Settings(warmup_sizes=[]))
    outcomes = klein.speedups.outcomes
    assert outcomes["truncate_text_encoder"] == "on: 3 of 4 layers, no logits"
    assert outcomes["fuse_qkv"].startswith("on: freed 216 MiB")
    assert outcomes["attention_backend"] == "native (auto on CPU)" and outcomes["vae_channels_last"] == "on"
    assert outcomes["cudnn_benchmark"] == "skipped: CUDA only" and "fp8" not in outcomes
    assert klein.pipe.hf_device_map == "cpu" and klein.pipe.transformer.dtype == torch.float32
    (block,) = klein.pipe.transformer.transformer_blocks
    assert block.attn.to_qkv.weight.shape == (9216, 3072) and block.attn.to_added_qkv.weight.shape == (9216, 3072)

    (image,) = klein.generate(params(256))  # text-to-image at 256², the worker's 512 text tokens
    assert image.size == (256, 256)
    (edit,) = klein.generate(params(64), [Image.new("RGB", (96, 64), (200, 90, 40))])
    assert edit.size == (64, 64)
    batch = klein.generate(params(64, outputs=2))
    assert [b.size for b in batch] == [(64, 64), (64, 64)]
    cache = klein.prompt_cache
    assert cache is not None and (cache.misses, cache.hits) == (1, 2)  # one prompt, encoded once
    OUTPUTS["switched"] = pixels(klein.generate(params(64)))
    assert all(0 <= v <= 255 for v in (OUTPUTS["switched"].min(), OUTPUTS["switched"].max()))

    refs = released(klein)
    del klein, cache, block
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)


def test_compiled_full_graphs_at_the_real_widths_match_the_switched_pipeline(
    real_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compilation, and truncation (bit-exact) to keep it short, the other switches off: the blocks and the VAE
    decoder trace as full graphs (torch.compile's eager backend, so seconds) at the real widths, warmed at start;
    the warmed shape then runs compiled (fail_on_recompile) and matches the switched pipeline's images."""
    import torch
    from torch._dynamo.utils import counters

    import models.optimize
    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline

    if "switched" not in OUTPUTS:
        pytest.skip("needs test_the_worker_loads_and_generates_with_every_cpu_switch")
    monkeypatch.setattr(models.optimize, "COMPILE_BACKEND", "eager")
    off: dict[str, Any] = {"attention_backend": "native", "fuse_qkv": False, "truncate_text_encoder": True}
    off |= {"prompt_cache_size": 0, "vae_channels_last": False, "cudnn_benchmark": False}
    settings = Settings(**off, compile_transformer=True, compile_vae=True, warmup_sizes=["64x64"])
    graphs = counters["stats"]["unique_graphs"]
    try:
        klein = KleinPipeline(str(real_folder), "cpu", settings)
        assert klein.startup.warmup_shapes == 1 and counters["stats"]["unique_graphs"] >= graphs + 3
        with torch.compiler.set_stance("fail_on_recompile"):  # raises unless every compiled graph serves it
            compiled = pixels(klein.generate(params(64)))
        assert int(abs(compiled - OUTPUTS["switched"]).max()) <= 2
        refs = released(klein)
        del klein
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)
