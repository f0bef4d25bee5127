"""LoRA adapters on the pipeline's transformer, with diffusers' own adapter API (peft layers, never fused into the
weights): what a LoRA may target, its tensors in the layout the loaded transformer has, and which set is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from core.lora import ALPHA_KEY, FUSED, WEIGHT_KEY


def targets(transformer: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer a LoRA may name, module → (in, out), as the model was trained: a fused q/k/v projection
    (models/optimize.fuse_qkv) counts as its three parts."""
    found = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            for part in FUSED[leaf]:
                found[f"{parent}.{part}"] = (module.in_features, module.out_features // 3)
        else:
            found[name] = (module.in_features, module.out_features)
    return found


def prepare(tensors: Mapping[str, torch.Tensor], fused: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter for `load_lora_weights`: keys `transformer.<module>.lora_A/B.weight`, alpha folded into B
    (scale alpha / rank), and, for a transformer running fused q/k/v, each attention's q/k/v LoRAs as one LoRA of
    the fused layer (A stacked, B block-diagonal: the same product). New tensors: the cache's stay untouched."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    alpha: dict[str, float] = {}
    for name, tensor in tensors.items():
        if match := ALPHA_KEY.match(name):
            alpha[match["module"]] = float(tensor.reshape(-1)[0])
        elif match := WEIGHT_KEY.match(name):
            (a if match["part"] == "A" else b)[match["module"]] = tensor.to(dtype)
    for module, value in alpha.items():
        if module in b:
            b[module] = b[module] * (value / a[module].shape[0])
    if fused:
        for fused_name, parts in FUSED.items():
            for parent in sorted({m.rpartition(".")[0] for m in a if m.rpartition(".")[2] in parts}):
                present = [f"{parent}.{part}" for part in parts]
                out = next(b[m].shape[0] for m in present if m in b)
                ranks = [a[m].shape[0] if m in a else 0 for m in present]
                stacked_b = torch.zeros(3 * out, sum(ranks), dtype=dtype)
                column = 0
                for index, (m, rank) in enumerate(zip(present, ranks, strict=True)):
                    if rank:
                        stacked_b[index * out : (index + 1) * out, column : column + rank] = b.pop(m)
                        column += rank
                a[f"{parent}.{fused_name}"] = torch.cat([a.pop(m) for m in present if m in a])
                b[f"{parent}.{fused_name}"] = stacked_b
    prepared = {f"transformer.{m}.lora_A.weight": t.contiguous() for m, t in a.items()}
    return prepared | {f"transformer.{m}.lora_B.weight": t.contiguous() for m, t in b.items()}


class Adapters:
    """The adapter set loaded in one pipeline: a prediction with the same set only changes the scales; any other
    set (none included) unloads every adapter first, so the transformer is exactly the base model again."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.loaded: tuple[str, ...] = ()

    def use(self, adapters: Sequence[tuple[str, Mapping[str, torch.Tensor], float]]) -> float:
        """Make `adapters` ((name, prepared tensors, scale), …) the active set; seconds spent loading."""
        started = time.perf_counter()
        names = tuple(name for name, _, _ in adapters)
        if names != self.loaded:
            if self.loaded:
                self.pipe.unload_lora_weights()
                self.loaded = ()
            for name, tensors, _ in adapters:
                self.pipe.load_lora_weights(dict(tensors), adapter_name=name)
            self.loaded = names
        if adapters:
            self.pipe.set_adapters(list(names), adapter_weights=[scale for _, _, scale in adapters])
        return time.perf_counter() - started
