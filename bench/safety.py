"""The image checker's cost per image (worker/safety.py), next to one image's generation time with the tiny pipeline.

    python -m bench.safety [--size 1024] [--iters 7] [--device cpu]

Each checker is saved as a folder and loaded the worker's way (`Checker`: AutoModelForImageClassification + its
image processor); the figure is `Checker.scores` on decoded `--size`² outputs, the processor's resize and
normalisation included, in batches of 1 and 4 (the worker checks a pipeline call's outputs in one pass). The tiny
classifier (32 px, one layer) is the tests'; `vit-base` has the reference checker's shape
(Falconsai/nsfw_image_detection: ViT-base, 224 px, 86 M parameters) with random weights, so its time is the real
one's. bench/gpu.py runs `measure` on the GPU as its own scenario.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.tiny_safety import save
from worker.safety import Checker

KINDS = ("tiny", "vit-base")
BATCHES = (1, 4)


def _images(size: int, count: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(count)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy())
        for _ in range(count)
    ]


def _p50_ms(call: Any, iters: int, sync: Any) -> float:
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(device: torch.device, size: int = 1024, iters: int = 7, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """Per kind and batch: the checker's ms per image (p50), its load time and parameter count."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="klein-safety-bench-") as folder:
        for kind in kinds:
            path = save(Path(folder) / kind, "random" if kind == "tiny" else "vit-base")
            checker = Checker(str(path), ["nsfw"], 0.5, device)
            parameters = sum(p.numel() for p in checker.model.parameters())
            for batch in BATCHES:
                images = _images(size, batch)
                checker.scores(images)  # warm
                ms = _p50_ms(functools.partial(checker.scores, images), iters, sync)
                rows.append(
                    {
                        "checker": kind,
                        "parameters": parameters,
                        "batch": batch,
                        "ms_per_image": ms / batch,
                        "load_s": checker.load_s,
                    }
                )
    return rows


def generation_ms(size: int, iters: int) -> float:
    """One image of the tiny pipeline at `size`², 4 steps, on CPU (the worker's call)."""
    from core.settings import Settings
    from models.klein import GenerationParams
    from models.klein_pipeline import KleinPipeline
    from models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(Path(tempfile.mkdtemp(prefix="klein-safety-bench-tiny-")))
    klein = KleinPipeline(str(folder), "cpu", Settings(warmup_sizes=[]))
    params = GenerationParams(
        prompt="a lighthouse",
        width=size,
        height=size,
        num_inference_steps=4,
        guidance_scale=1.0,
        seed=1,
        output_format="png",
        output_quality=100,
    )
    klein.generate(params)  # warm
    return _p50_ms(lambda: klein.generate(params), iters, lambda: None)


def table(rows: list[dict], device: torch.device, size: int) -> str:
    lines = [
        f"image checker on {device}, {size}² outputs (resize to the classifier's input included)\n",
        "| checker | parameters | batch | ms per image (p50) | load s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['checker']} | {r['parameters'] / 1e6:.2f} M | {r['batch']} | {r['ms_per_image']:.1f} | "
            f"{r['load_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(table(measure(device, args.size, args.iters), device, args.size))
    generation = generation_ms(args.size, args.iters)
    print(f"\none image of the tiny pipeline, CPU, {args.size}², 4 steps: {generation:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
