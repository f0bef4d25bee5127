"""Image classifiers for the safety checker's tests and benchmarks, built offline (docs/safety.md).

Saved with `save_pretrained` beside a `ViTImageProcessor`, as a real checker folder is (the reference,
Falconsai/nsfw_image_detection, is a ViT-base with id2label {0: normal, 1: nsfw}), so the worker loads them
through the same `AutoModelForImageClassification` path:

- `random`: a tiny ViT (32 px, patches of 8, width 32, one layer) with random weights, for honest load tests;
- `nsfw` / `normal`: the same with a classifier bias that decides every image (the decision path's tests);
- `bright`: the tiny ViT whose bias is set halfway between what it makes of an all-black and an all-white image,
  so that dark images read `normal` and light ones `nsfw` (a per-image decision with known inputs);
- `vit-base`: the reference's shape (224 px, patches of 16, 12 layers of 768) with random weights, for the bench.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Kind = Literal["random", "nsfw", "normal", "bright", "vit-base"]
KINDS: tuple[str, ...] = ("random", "nsfw", "normal", "bright", "vit-base")
LABELS = {0: "normal", 1: "nsfw"}
FORCING_BIAS = 50.0  # logits of random weights on normalised pixels stay within a few units


def build(kind: Kind, seed: int = 0) -> tuple[Any, Any]:
    """(model, image processor) of `kind`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    base = kind == "vit-base"
    size = 224 if base else 32
    config = ViTConfig(
        image_size=size,
        patch_size=16 if base else 8,
        hidden_size=768 if base else 32,
        num_hidden_layers=12 if base else 1,
        num_attention_heads=12 if base else 2,
        intermediate_size=3072 if base else 64,
        id2label=LABELS,
        label2id={name: index for index, name in LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    processor = ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_resize=True
    )
    with torch.no_grad():
        bias = model.classifier.bias
        if kind == "nsfw":
            bias.copy_(torch.tensor([0.0, FORCING_BIAS]))
        elif kind == "normal":
            bias.copy_(torch.tensor([FORCING_BIAS, 0.0]))
        elif kind == "bright":
            _calibrate_on_brightness(model, processor)
    return model, processor


def _calibrate_on_brightness(model: Any, processor: Any) -> None:
    """Bias the classifier so that the nsfw-minus-normal logit is 0 halfway between black and white, with white
    on the nsfw side (the classifier's rows are swapped if random weights put it on the other)."""
    import torch
    from PIL import Image

    def margin(colour: int) -> float:
        pixels = processor(images=[Image.new("RGB", (32, 32), (colour,) * 3)], return_tensors="pt")
        logits = model(**pixels).logits[0]
        return float(logits[1] - logits[0])

    black, white = margin(0), margin(255)
    if white < black:
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
        black, white = -black, -white
    if white - black < 1e-3:
        raise RuntimeError("these random weights do not tell black from white; build with another seed")
    model.classifier.bias[1] -= torch.tensor((black + white) / 2)


def save(directory: Path, kind: Kind = "random", seed: int = 0) -> Path:
    """The classifier of `kind` saved as a checker folder; returns the folder."""
    model, processor = build(kind, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
