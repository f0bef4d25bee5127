"""A worker's LoRA cache on real S3: memory over disk over storage, each bounded in bytes, least recently used
first out; a file over a bound is never kept; the stored bytes are checked against their hash and the model;
each tenant's copy is its own."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core import lora
from core.settings import Settings
from core.storage import ensure_bucket, make_s3_client
from models.klein import LoraRef
from tests.e2e.test_lora import tiny_lora
from worker.loras import LoraCache

TARGETS = {f"transformer_blocks.0.attn.{m}": (32, 32) for m in ("to_q", "to_k", "to_v", "to_out.0")}


TENANT = "tenant-a"


def stored(settings: Settings, data: bytes, tenant_id: str = TENANT) -> LoraRef:
    ref = LoraRef(tenant_id=tenant_id, sha256=hashlib.sha256(data).hexdigest(), scale=1.0)
    make_s3_client(settings).put_object(Bucket=settings.s3_bucket, Key=ref.key, Body=data)
    return ref


def test_the_cache_keeps_within_its_bytes_and_serves_from_the_nearest_tier(settings: Settings, tmp_path: Path) -> None:
    ensure_bucket(make_s3_client(settings), settings.s3_bucket)
    adapters = [tiny_lora(seed) for seed in (10, 11, 12)]
    size = len(adapters[0])
    tight = settings.model_copy(
        update={
            "lora_cache_dir": str(tmp_path),
            "lora_disk_cache_bytes": 2 * size,  # two files fit
            "lora_memory_cache_bytes": size,  # one set of tensors fits
        }
    )
    cache = LoraCache(tight, make_s3_client(settings), TARGETS, lambda tensors: dict(tensors))
    refs = [stored(settings, data) for data in adapters]

    assert cache.get(refs[0]).source == "storage"
    assert cache.get(refs[0]).source == "memory"
    assert cache.get(refs[1]).source == "storage"  # memory now holds refs[1] only
    assert cache.get(refs[0]).source == "disk"
    assert cache.get(refs[2]).source == "storage"  # the disk drops its least recently used file (refs[1])
    on_disk = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert on_disk == sorted(f"lora_{TENANT}_{r.sha256}.safetensors" for r in (refs[0], refs[2]))
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 2 * size  # nothing partial left either
    assert len(cache.memory) == 1

    huge = stored(settings, tiny_lora(13, rank=64))  # larger than both bounds: used, never kept
    assert cache.get(huge).source == "storage" and cache.get(huge).source == "storage"
    assert not (tmp_path / f"{huge.adapter_name}.safetensors").exists() and huge.adapter_name not in cache.memory


def test_the_cache_refuses_a_file_that_is_not_what_was_stored_or_does_not_fit(
    settings: Settings, tmp_path: Path
) -> None:
    cache = LoraCache(
        settings.model_copy(update={"lora_cache_dir": str(tmp_path)}),
        make_s3_client(settings),
        TARGETS,
        lambda tensors: dict(tensors),
    )
    ensure_bucket(make_s3_client(settings), settings.s3_bucket)
    swapped = stored(settings, tiny_lora(20))
    make_s3_client(settings).put_object(Bucket=settings.s3_bucket, Key=swapped.key, Body=tiny_lora(21))
    with pytest.raises(lora.LoraError, match="does not match its hash"):
        cache.get(swapped)
    misfit = stored(settings, tiny_lora(22, width=48))
    with pytest.raises(lora.LoraError, match="does not fit this model"):
        cache.get(misfit)
    assert list(tmp_path.glob("*.safetensors")) == [tmp_path / f"{misfit.adapter_name}.safetensors"]


def test_a_tenant_never_gets_another_tenants_cached_copy(settings: Settings, tmp_path: Path) -> None:
    """Issue 29, item 9: the cache was keyed by hash alone, so a LoRA another tenant had just run came from
    memory (20–39 ms to "applied") where a new one came from storage (69–140 ms): timing told a tenant what
    others ran. Each tenant's copy is read from its own object and cached on its own."""
    ensure_bucket(make_s3_client(settings), settings.s3_bucket)
    cache = LoraCache(
        settings.model_copy(update={"lora_cache_dir": str(tmp_path)}),
        make_s3_client(settings),
        TARGETS,
        lambda tensors: dict(tensors),
    )
    data = tiny_lora(23)
    theirs, ours = stored(settings, data, "tenant-b"), stored(settings, data, "tenant-a")
    assert theirs.key != ours.key and ours.key.startswith("loras/tenant-a/")
    assert cache.get(theirs).source == "storage"
    assert cache.get(ours).source == "storage"  # not B's copy from memory or disk
    assert cache.get(ours).source == "memory" and cache.get(theirs).source == "memory"
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == sorted(f"{ref.adapter_name}.safetensors" for ref in (theirs, ours))
