"""LoRA adapters as files: the safetensors header, read without torch (the API checks uploads with it), and
what a LoRA must fit. Workers load the tensors (models/lora.py).

Accepted: safetensors only (never a pickle), keys in diffusers'/peft's layout, `[transformer.]<module>.lora_A.weight`
(rank × in) and `.lora_B.weight` (out × rank), optionally `.alpha`; `base_model.model.` prefixes are read too.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_HEADER_BYTES = 16 * 2**20
MAX_RANK = 512
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>[\w.]+?)\.lora_(?P<part>A|B)\.weight$")
ALPHA_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>[\w.]+?)\.alpha$")
# Each attention's q, k and v projections, which a worker may run fused (KLEIN_FUSE_QKV): a LoRA names them apart.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


CONTENT_TYPE = "application/vnd.safetensors"  # an uploaded LoRA's, in /v1/files


def looks_like_safetensors(data: bytes) -> bool:
    """The first bytes of a safetensors file: a little-endian header length, then its JSON object."""
    return len(data) > 9 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] < len(data)


def targets_key(queue_name: str, model: str) -> str:
    """Where a model's workers publish the layers a LoRA may name (models/lora.targets), for the API's checks."""
    return f"{queue_name}:lora-targets:{model}"


class LoraError(ValueError):
    """Not a LoRA this platform can apply; the message says why, for the client."""


@dataclass(frozen=True)
class Pair:
    rank: int
    in_features: int
    out_features: int


def read_header(data: bytes) -> dict[str, Any]:
    """The safetensors header: {name: {"dtype", "shape", "data_offsets"}}. Anything else (a pickle, a zip from
    torch.save, a truncated file) is refused without being interpreted."""
    if len(data) < 8:
        raise LoraError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data) or data[8:9] != b"{":
        raise LoraError("not a safetensors file (LoRAs are accepted as .safetensors only, never pickles)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise LoraError("not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    body = len(data) - 8 - size
    for name, entry in header.items():
        start, end = entry.get("data_offsets", (0, -1))
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body):
            raise LoraError(f"tensor {name} lies outside the file (truncated?)")
    return dict(header)


def pairs(header: dict[str, Any]) -> dict[str, Pair]:
    """module → its LoRA's (rank, in, out), from a header; a key that is no LoRA weight is an error."""
    found: dict[str, dict[str, list[int]]] = {}
    for name, entry in header.items():
        if ALPHA_KEY.match(name):
            continue
        key = WEIGHT_KEY.match(name)
        if key is None:
            raise LoraError(f"unsupported key {name!r}: expected <module>.lora_A.weight / .lora_B.weight (diffusers)")
        shape = entry.get("shape")
        if entry.get("dtype") not in FLOAT_DTYPES or not isinstance(shape, list) or len(shape) != 2:
            raise LoraError(f"{name}: expected a 2-d float tensor, got {entry.get('dtype')} {shape}")
        found.setdefault(key["module"], {})[key["part"]] = shape
    if not found:
        raise LoraError("no LoRA weights in the file")
    result = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise LoraError(f"{module}: lora_A and lora_B are both needed")
        (rank, in_features), (out_features, rank_b) = parts["A"], parts["B"]
        if rank != rank_b or not 0 < rank <= MAX_RANK:
            raise LoraError(f"{module}: lora_A {parts['A']} and lora_B {parts['B']} disagree on a rank ≤ {MAX_RANK}")
        result[module] = Pair(rank, in_features, out_features)
    return result


def misfits(lora: dict[str, Pair], targets: Mapping[str, tuple[int, int]]) -> list[str]:
    """Why `lora` does not fit a transformer whose LoRA targets are `targets` (module → (in, out)); [] if it does."""
    problems = []
    for module, pair in sorted(lora.items()):
        target = targets.get(module)
        if target is None:
            problems.append(f"{module}: no such layer in this model")
        elif (pair.in_features, pair.out_features) != tuple(target):
            problems.append(f"{module}: {pair.in_features}→{pair.out_features}, the layer is {target[0]}→{target[1]}")
    return problems
