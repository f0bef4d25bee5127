"""LoRA adapters as files: the safetensors header, read and checked without torch (the API checks every LoRA it
accepts with it, off its event loop), and what a LoRA must fit. Workers load the tensors (models/lora.py).

Accepted: safetensors only (never a pickle), keys in diffusers'/peft's layout, `[transformer.]<module>.lora_A.weight`
(rank × in) and `.lora_B.weight` (out × rank), optionally `.alpha` (one number); `base_model.model.` prefixes are
read too. The file must be exactly what its header says: each entry a float tensor whose `data_offsets` hold
dtype × shape bytes, the tensors back to back from the header's end to the file's end (no gap, no overlap, no
trailing bytes), every weight finite.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

# A rank-N LoRA of every linear layer of the 4B klein transformer (111 layers: A, B and alpha each) has a
# 44 KB header whatever N is; 1 MiB leaves room for metadata and refuses headers that only cost parsing.
MAX_HEADER_BYTES = 2**20
MAX_RANK = 512
# The element types a LoRA's tensors may have, with numpy's view of them for the finiteness scan (bfloat16 is
# read as uint16: its exponent bits all set is an Inf or a NaN).
DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
BF16_EXPONENT = 0x7F80
SCAN_BYTES = 4 << 20  # read, hashed and checked per step of the finiteness scan
WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>[\w.]+?)\.lora_(?P<part>A|B)\.weight$")
ALPHA_KEY = re.compile(r"^(?:base_model\.model\.|transformer\.)?(?P<module>[\w.]+?)\.alpha$")
# Each attention's q, k and v projections, which a worker may run fused (KLEIN_FUSE_QKV): a LoRA names them apart.
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


CONTENT_TYPE = "application/vnd.safetensors"  # an uploaded LoRA's, in /v1/files


def looks_like_safetensors(first: bytes, size: int) -> bool:
    """Whether a file of `size` bytes starting with `first` (9 bytes or more) is framed as safetensors: a
    little-endian header length, then its JSON object."""
    return size > 9 and first[8:9] == b"{" and struct.unpack("<Q", first[:8])[0] < size


def object_key(tenant_id: str, sha256: str) -> str:
    """Where a tenant's LoRA is stored: once per tenant and content, never shared with another tenant (whether
    it is there already would tell what that tenant ran)."""
    return f"loras/{tenant_id}/{sha256}.safetensors"


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


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int  # in the file's data, after the header
    end: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Inspected:
    """A file that proved to be a well-formed LoRA with finite weights."""

    layers: dict[str, Pair]
    sha256: str
    size: int


def inspect(file: IO[bytes]) -> Inspected:
    """The LoRA's layers, hash and size, read from `file` in steps of SCAN_BYTES (LoraError unless it is a
    well-formed LoRA with finite weights). Blocking reads and CPU work proportional to the file: callers on an
    event loop run it in a thread (hashlib and numpy let go of the GIL)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    header, head = _read_header(file, size)
    layers = pairs(header)
    digest = hashlib.sha256(head)
    for name, tensor in sorted(header.items(), key=lambda item: (item[1].start, item[1].end)):
        _scan(file, name, tensor, digest)  # back to back from the header's end: one pass over the file
    return Inspected(layers, digest.hexdigest(), size)


def read_header(data: bytes) -> dict[str, Tensor]:
    """The safetensors header of a file held in memory, each entry checked against the file."""
    return _read_header(io.BytesIO(data), len(data))[0]


def header_length(first: bytes) -> int:
    """The header's length from a file's first 9 bytes; LoraError unless they start a safetensors header of at
    most MAX_HEADER_BYTES. Anything else (a pickle, a zip from torch.save) is refused without being interpreted."""
    (length,) = struct.unpack("<Q", first[:8])
    if first[8:9] != b"{":
        raise LoraError("not a safetensors file (LoRAs are accepted as .safetensors only, never pickles)")
    if length > MAX_HEADER_BYTES:
        raise LoraError(f"its safetensors header is {length} bytes; at most {MAX_HEADER_BYTES} are read")
    return length


def read_head(head: bytes) -> tuple[int, dict[str, Pair]]:
    """The size and the layers of the file whose first bytes, its header included, are `head`: what the header
    says they are (LoraError unless it is a LoRA's header)."""
    length = header_length(head)
    header = parse_header(head[8 : 8 + length])
    return 8 + length + _data_end(header), pairs(header)


def _read_header(file: IO[bytes], size: int) -> tuple[dict[str, Tensor], bytes]:
    """The header of a file of `size` bytes, checked against it, and the bytes read (the file's first)."""
    first = file.read(9)
    if len(first) < 9:
        raise LoraError("not a safetensors file (too short)")
    length = header_length(first)
    if 8 + length > size:
        raise LoraError("not a safetensors file (LoRAs are accepted as .safetensors only, never pickles)")
    head = first + file.read(8 + length - 9)
    header = parse_header(head[8:])
    named, body = _data_end(header), size - 8 - length
    if named > body:
        raise LoraError(f"its tensors lie outside the file (truncated?): {named} bytes named, {body} present")
    if named < body:
        raise LoraError(f"the file has {body - named} bytes after its last tensor (padding is not accepted)")
    return header, head


def parse_header(raw: bytes) -> dict[str, Tensor]:
    """A safetensors header's JSON, each entry checked; the tensors must lie back to back from 0."""
    try:
        parsed = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        reason = str(exc) if isinstance(exc, LoraError) else "its header is not JSON"
        raise LoraError(f"not a safetensors file ({reason})") from None
    if not isinstance(parsed, dict):
        raise LoraError("not a safetensors file (its header is not a JSON object)")
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise LoraError("__metadata__ must map names to strings")
    header = {name: _entry(name, entry) for name, entry in parsed.items()}
    _data_end(header)
    return header


def _no_duplicates(items: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(items)
    if len(found) != len(items):
        raise LoraError("its header names a tensor twice")
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, entry: Any) -> Tensor:
    if not isinstance(entry, dict):
        raise LoraError(f"tensor {name}: expected an object with dtype, shape and data_offsets, got {entry!r:.40}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LoraError(f"tensor {name}: dtype {dtype!r:.20} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise LoraError(f"tensor {name}: shape must be a list of non-negative integers, got {shape!r:.40}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)):
        raise LoraError(f"tensor {name}: data_offsets must be two non-negative integers, got {offsets!r:.40}")
    tensor = Tensor(dtype, tuple(shape), offsets[0], offsets[1])
    if tensor.end - tensor.start != tensor.elements * DTYPES[dtype].itemsize:
        raise LoraError(
            f"tensor {name}: data_offsets {offsets} hold {tensor.end - tensor.start} bytes, "
            f"but {dtype} {list(shape)} takes {tensor.elements * DTYPES[dtype].itemsize}"
        )
    return tensor


def _data_end(header: Mapping[str, Tensor]) -> int:
    """Where the tensors end, once they proved to lie back to back from 0: no gap, no overlap."""
    position = 0
    for name, tensor in sorted(header.items(), key=lambda item: (item[1].start, item[1].end)):
        if tensor.start != position:
            where = "overlaps the tensor before it" if tensor.start < position else "leaves a gap before it"
            raise LoraError(f"tensor {name}: data_offsets [{tensor.start}, {tensor.end}] {where}")
        position = tensor.end
    return position


def pairs(header: Mapping[str, Tensor]) -> dict[str, Pair]:
    """module → its LoRA's (rank, in, out), from a header; a key that is no LoRA weight is an error."""
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in header.items():
        if ALPHA_KEY.match(name):
            if tensor.elements != 1:
                raise LoraError(f"{name}: an alpha is one number, got shape {list(tensor.shape)}")
            continue
        key = WEIGHT_KEY.match(name)
        if key is None:
            raise LoraError(f"unsupported key {name!r}: expected <module>.lora_A.weight / .lora_B.weight (diffusers)")
        if len(tensor.shape) != 2:
            raise LoraError(f"{name}: expected a 2-d float tensor, got {tensor.dtype} {list(tensor.shape)}")
        found.setdefault(key["module"], {})[key["part"]] = tensor.shape
    if not found:
        raise LoraError("no LoRA weights in the file")
    result = {}
    for module, parts in found.items():
        if set(parts) != {"A", "B"}:
            raise LoraError(f"{module}: lora_A and lora_B are both needed")
        (rank, in_features), (out_features, rank_b) = parts["A"], parts["B"]
        if rank != rank_b or not 0 < rank <= MAX_RANK or not (in_features and out_features):
            shapes = f"lora_A {list(parts['A'])} and lora_B {list(parts['B'])}"
            raise LoraError(f"{module}: {shapes} disagree on a rank ≤ {MAX_RANK}")
        result[module] = Pair(rank, in_features, out_features)
    return result


def _scan(file: IO[bytes], name: str, tensor: Tensor, digest: hashlib._Hash) -> None:
    """The tensor's bytes, next in `file`, into `digest`; LoraError if it holds an Inf or a NaN (it would turn
    every image black). Read in steps of whole elements, at most SCAN_BYTES each."""
    dtype = DTYPES[tensor.dtype]
    step = SCAN_BYTES // dtype.itemsize * dtype.itemsize
    left = tensor.end - tensor.start
    while left:
        chunk = file.read(min(step, left))
        if not chunk:
            raise LoraError("the file ended inside a tensor")
        left -= len(chunk)
        digest.update(chunk)
        values = np.frombuffer(chunk, dtype)
        if tensor.dtype == "BF16":
            finite = not np.any((values & BF16_EXPONENT) == BF16_EXPONENT)
        else:
            finite = bool(np.isfinite(values).all())
        if not finite:
            raise LoraError(f"tensor {name} holds Inf or NaN values")


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
