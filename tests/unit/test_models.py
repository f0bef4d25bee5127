"""The model registry, input schema and resolution rules; the tiny pipeline's save/load round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.klein import KleinInput, LoraRef, loaded_by, size_for_aspect_ratio
from models.registry import FLUX_KLEIN_4B, resolve


@pytest.mark.parametrize(
    ("aspect_ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1360, 768)),
        ("9:16", (768, 1360)),
        ("21:9", (1568, 672)),
        ("3:2", (1248, 832)),
        ("4:5", (912, 1152)),
    ],
)
def test_aspect_ratios_give_about_one_megapixel_in_multiples_of_16(aspect_ratio: str, size: tuple[int, int]) -> None:
    width, height = size_for_aspect_ratio(aspect_ratio)
    assert (width, height) == size
    assert width % 16 == 0 and height % 16 == 0
    assert 0.9 < width * height / 2**20 < 1.1


def test_defaults_follow_the_distilled_model() -> None:
    params = KleinInput(prompt="a cat").to_params(seed=9)
    assert (params.num_inference_steps, params.guidance_scale, params.seed) == (4, 1.0, 9)
    assert (params.output_format, params.output_quality, params.width, params.height) == ("jpg", 80, 1024, 1024)


def test_input_is_strict() -> None:
    with pytest.raises(ValidationError):
        KleinInput.model_validate({"prompt": "a", "num_inference_steps": "4"})
    with pytest.raises(ValidationError):
        KleinInput.model_validate({"prompt": "a", "typo": 1})


def test_every_alias_resolves_to_one_spec() -> None:
    for name in ("flux-klein-4b", "FLUX-2-klein-4b", "flux2-klein-4b", "black-forest-labs/flux-2-klein-4b"):
        assert resolve(name) is FLUX_KLEIN_4B
    assert resolve("wavespeed-ai/flux-2-klein-4b") is FLUX_KLEIN_4B
    assert resolve("flux-dev") is None


def test_tiny_pipeline_round_trips_through_from_pretrained(tiny_model: Path) -> None:
    import torch
    from diffusers import Flux2KleinPipeline

    from models.tiny import build_tiny_pipeline

    built, loaded = build_tiny_pipeline(), Flux2KleinPipeline.from_pretrained(tiny_model)
    for name in ("transformer", "text_encoder", "vae"):
        expected, actual = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert loaded.tokenizer.decode(loaded.tokenizer("héllo")["input_ids"]) == "héllo"


def test_a_lora_is_stored_cached_and_loaded_under_its_tenants_name() -> None:
    """Issue 29, item 9: one LoRA's object, cache entries and pipeline adapter were shared by every tenant (named
    by hash alone), so a tenant's timing told whether another had used it. The pipeline keeps a loaded set only
    for the same names (models/lora.Adapters): another tenant's set is unloaded and its own copy loaded."""
    sha256 = "ab" * 32
    ours, theirs = (
        LoraRef(tenant_id="tenant-a", sha256=sha256, scale=1.0),
        LoraRef(tenant_id="b", sha256=sha256, scale=1.0),
    )
    assert ours.key == f"loras/tenant-a/{sha256}.safetensors" and theirs.key == f"loras/b/{sha256}.safetensors"
    assert ours.adapter_name != theirs.adapter_name
    assert loaded_by(ours.adapter_name) == ("tenant-a", sha256)  # the worker's affinity reads the tenant back


def test_the_api_process_never_imports_torch() -> None:
    code = "import sys, api.app; api.app.create_app(); print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_apis_reference_limits_are_the_pipelines() -> None:
    """core.images checks references at submit with the limits diffusers' Klein pipeline applies in the worker."""
    import inspect

    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from core import images

    defaults = inspect.signature(Flux2ImageProcessor.check_image_input).parameters
    assert defaults["max_aspect_ratio"].default == images.MAX_ASPECT_RATIO
    assert defaults["min_side_length"].default == images.MIN_SIDE


def test_a_short_admin_key_is_refused_at_start() -> None:
    """The right admin key always works, even from a throttled address: only its length stops guessing."""
    from core.settings import MIN_ADMIN_KEY_LENGTH, Settings

    with pytest.raises(ValidationError, match="KLEIN_ADMIN_API_KEY must be at least"):
        Settings(admin_api_key="x" * (MIN_ADMIN_KEY_LENGTH - 1))
    key = Settings(admin_api_key="x" * MIN_ADMIN_KEY_LENGTH).admin_api_key
    assert key is not None and key.get_secret_value() == "x" * MIN_ADMIN_KEY_LENGTH
