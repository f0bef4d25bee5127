"""A worker's LoRA adapters by tenant and content hash (LoraRef.adapter_name: a tenant never gets another
tenant's copy, so how fast it comes tells nothing of what others ran): in memory (LRU by bytes) over its disk
(LRU by bytes) over storage, where the API put them (api/services/loras.py). Read with safetensors (never a
pickle), checked against the transformer, and prepared for its layout once (models/lora.prepare)."""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors

from core import lora
from core.settings import Settings
from models.klein import LoraRef

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

Tensors = Mapping[str, torch.Tensor]


@dataclass
class Loaded:
    tensors: Tensors
    source: str  # "memory", "disk" or "storage"
    seconds: float


class LoraCache:
    def __init__(
        self,
        settings: Settings,
        s3: S3Client,
        targets: Mapping[str, tuple[int, int]],
        prepare: Callable[[Tensors], dict[str, torch.Tensor]],
    ) -> None:
        self.settings, self.s3, self.targets, self.prepare = settings, s3, targets, prepare
        self.folder = Path(settings.lora_cache_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        # By LoraRef.adapter_name (tenant and hash): → (tensors, bytes) in memory, → bytes on disk, least recently
        # used first; on disk what an earlier process left too, oldest first.
        self.memory: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        self.disk: OrderedDict[str, int] = OrderedDict((p.stem, p.stat().st_size) for p in files)

    def get(self, ref: LoraRef) -> Loaded:
        started, name = time.perf_counter(), ref.adapter_name
        if name in self.memory:
            self.memory.move_to_end(name)
            return Loaded(self.memory[name][0], "memory", time.perf_counter() - started)
        path = self.folder / f"{name}.safetensors"
        if name in self.disk and path.is_file():
            data, source = path.read_bytes(), "disk"
            self.disk.move_to_end(name)
            os.utime(path)  # for the next process's order
        else:
            data, source = self._fetch(ref), "storage"
            self._keep_on_disk(name, path, data)
        problems = lora.misfits(lora.pairs(lora.read_header(data)), self.targets)
        if problems:
            raise lora.LoraError(f"LoRA {ref.sha256[:12]} does not fit this model: " + "; ".join(problems[:3]))
        tensors = self.prepare(load_safetensors(data))
        self._keep_in_memory(name, tensors, len(data))
        return Loaded(tensors, source, time.perf_counter() - started)

    def _fetch(self, ref: LoraRef) -> bytes:
        data = self.s3.get_object(Bucket=self.settings.s3_bucket, Key=ref.key)["Body"].read()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise lora.LoraError(f"LoRA {ref.sha256[:12]}: the stored file does not match its hash")
        return data

    def _keep_on_disk(self, name: str, path: Path, data: bytes) -> None:
        """Written whole (a rename), then the least recently used files go until the folder fits its bytes."""
        limit = self.settings.lora_disk_cache_bytes
        if len(data) > limit:
            return
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
        self.disk[name] = len(data)
        while sum(self.disk.values()) > limit:
            old, _ = self.disk.popitem(last=False)
            (self.folder / f"{old}.safetensors").unlink(missing_ok=True)

    def _keep_in_memory(self, name: str, tensors: dict[str, torch.Tensor], size: int) -> None:
        limit = self.settings.lora_memory_cache_bytes
        if size > limit:
            return
        self.memory[name] = (tensors, size)
        while sum(size for _, size in self.memory.values()) > limit:
            self.memory.popitem(last=False)
