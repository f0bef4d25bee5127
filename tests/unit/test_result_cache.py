"""The result cache's key and the served weights' identity (core/result_cache.py), and a request's wish
(api/services/result_cache.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from api.services.result_cache import wanted
from core.result_cache import cache_key, weights_identity

PARAMS: dict[str, Any] = {
    "prompt": "a fox",
    "width": 1024,
    "height": 1024,
    "num_inference_steps": 4,
    "guidance_scale": 1.0,
    "seed": 7,
    "output_format": "png",
    "output_quality": 80,
    "num_outputs": 1,
    "max_sequence_length": 512,
    "reference_keys": [],
    "loras": [],
    "safety": "block",
}


def key(params: dict[str, Any] | None = None, distilled: bool = True, **given: Any) -> str:
    arguments = {"model": "flux-klein-4b", "weights": "w1", "checker": "c", "reference_sha256s": []} | given
    return cache_key(
        arguments["model"],
        distilled,
        arguments["weights"],
        arguments["checker"],
        PARAMS | (params or {}),
        arguments["reference_sha256s"],
    )


def test_what_determines_the_output_changes_the_key() -> None:
    base = key()
    changed = [
        key({"seed": 8}),
        key({"prompt": "a fox "}),  # the prompt as written: a space is another token
        key({"width": 512}),
        key({"num_inference_steps": 3}),
        key({"output_format": "jpg"}),
        key({"num_outputs": 2}),
        key({"safety": "flag"}),
        key({"loras": [{"tenant_id": "t", "sha256": "a" * 64, "scale": 1.0}]}),
        key({"loras": [{"tenant_id": "t", "sha256": "a" * 64, "scale": 0.5}]}),
        key(model="flux-klein-4b-base"),
        key(weights="w2"),
        key(checker="other checker"),
        key(reference_sha256s=["b" * 64]),
        key({"guidance_scale": 3.0}, distilled=False),  # the base model runs classifier-free guidance
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_what_cannot_change_the_output_is_normalized_away() -> None:
    assert key({"guidance_scale": 3.0}) == key(), "the distilled model ignores guidance"
    assert key({"output_quality": 10}) == key(), "PNG is lossless"
    assert key({"output_format": "jpg", "output_quality": 10}) != key({"output_format": "jpg"})
    assert key({"reference_keys": ["t/p1/input_0.png"]}) == key({"reference_keys": ["t/p2/input_0.png"]})
    lora = {"sha256": "a" * 64, "scale": 1.0}
    assert key({"loras": [lora | {"tenant_id": "t"}]}) == key({"loras": [lora | {"tenant_id": "t"}]})


def test_the_weights_identity_follows_configs_by_content_and_weights_by_size_and_time(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    config, weights = tmp_path / "transformer" / "config.json", tmp_path / "transformer" / "model.safetensors"
    config.write_text('{"num_layers": 1}')
    weights.write_bytes(b"\0" * (5 * 2**20))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "download.lock").write_text("1")
    first = weights_identity(str(tmp_path), "torch.float32", False)
    (tmp_path / ".cache" / "download.lock").write_text("2")  # the download tool's own files do not count
    assert weights_identity(str(tmp_path), "torch.float32", False) == first
    assert weights_identity(str(tmp_path), "torch.bfloat16", False) != first
    assert weights_identity(str(tmp_path), "torch.float32", True) != first
    config.write_text('{"num_layers": 2}')
    assert weights_identity(str(tmp_path), "torch.float32", False) != first
    config.write_text('{"num_layers": 1}')
    assert weights_identity(str(tmp_path), "torch.float32", False) == first
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced: another time
    assert weights_identity(str(tmp_path), "torch.float32", False) != first


def request(headers: dict[str, str]) -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""})


@pytest.mark.parametrize(
    ("seed", "asked", "headers", "cacheable"),
    [
        (7, True, {}, True),
        (0, True, {}, True),
        (-1, True, {}, False),  # a random seed: never the same output
        (None, True, {}, False),
        (7, False, {}, False),  # `cache: false` in our inputs
        (7, True, {"X-Result-Cache": "off"}, False),
        (7, True, {"X-Result-Cache": " OFF "}, False),
        (7, True, {"X-Result-Cache": "false"}, False),
        (7, True, {"X-Result-Cache": "on"}, True),
    ],
)
def test_a_request_asks_for_the_cache_with_a_seed_and_without_an_opt_out(
    seed: int | None, asked: bool, headers: dict[str, str], cacheable: bool
) -> None:
    assert wanted(request(headers), seed, asked) is cacheable
