"""LoRA costs on the tiny pipeline, in-process: loading an adapter into the pipeline (first use), switching back
to the base model, and the per-image overhead of an active adapter, side by side with the base model's time.

    python -m bench.lora [--rank 8] [--size 512] [--iters 5]

The tiny transformer is 32 wide, so these are the platform's own costs (diffusers' adapter API, peft layers), not
a GPU's: on the real 4B model an adapter's load time grows with its bytes and its overhead with rank × width
(to be measured on a GPU: rank 16-64 adapters on the attention projections).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from core.settings import Settings
from models.klein import GenerationParams
from models.klein_pipeline import KleinPipeline
from models.tiny import save_tiny_pipeline


def adapter(rank: int, seed: int) -> bytes:
    """A rank-`rank` LoRA on the tiny double block's q, k and v projections (32 wide), random weights."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("to_q", "to_k", "to_v"):
        key = f"transformer.transformer_blocks.0.attn.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 32, generator=generator)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, rank, generator=generator)
    return save(tensors)


def timed(call: object, iters: int) -> float:
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=9)
    args = parser.parse_args()

    folder = save_tiny_pipeline(Path(tempfile.mkdtemp(prefix="klein-lora-bench-")))
    klein = KleinPipeline(str(folder), "cpu", Settings(warmup_sizes=[]))
    params = GenerationParams(
        prompt="a lighthouse",
        width=args.size,
        height=args.size,
        num_inference_steps=4,
        guidance_scale=1.0,
        seed=1,
        output_format="png",
        output_quality=100,
    )
    data = adapter(args.rank, 1)
    prepared = klein.prepare_lora(load(data))
    klein.generate(params)  # warm

    # Interleaved, base then LoRA, so that a busy machine's drift falls on both alike.
    base, with_lora, loads = [], [], []
    for _ in range(args.iters):
        klein.adapters.use([])
        base.append(timed(lambda: klein.generate(params), 1))
        loads.append(klein.adapters.use([("bench", prepared, 1.0)]) * 1000)
        with_lora.append(timed(lambda: klein.generate(params), 1))
    base_ms, with_lora_ms = statistics.median(base), statistics.median(with_lora)
    rescale_ms = timed(lambda: klein.adapters.use([("bench", prepared, 0.5)]), args.iters)
    unload_ms = timed(lambda: (klein.adapters.use([]), klein.adapters.use([("bench", prepared, 1.0)])), 1)

    print(
        f"\ntiny pipeline, CPU, {args.size}², 4 steps; a rank-{args.rank} LoRA on q/k/v of the double block "
        f"({len(data)} bytes; fused q/k/v: {any('to_qkv' in k for k in prepared)})\n"
    )
    print("| figure | ms (p50) |\n| --- | --- |")
    print(f"| one image, base model | {base_ms:.1f} |")
    print(
        f"| one image, LoRA active | {with_lora_ms:.1f} ({with_lora_ms - base_ms:+.1f}, "
        f"{100 * (with_lora_ms / base_ms - 1):+.1f} %) |"
    )
    print(f"| load into the pipeline (first use: load_lora_weights + set_adapters) | {statistics.median(loads):.1f} |")
    print(f"| same LoRA, another scale (set_adapters) | {rescale_ms:.2f} |")
    print(f"| unload and load again | {unload_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
