"""The image checker (docs/safety.md): a transformers image classifier loaded once per worker process from
KLEIN_SAFETY_MODEL, run on every decoded output of a pipeline call in one batch, before anything is encoded or
stored; and what each prediction's policy does with a flagged output (block, blur, flag)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter

from core import safety
from core.settings import Settings

log = logging.getLogger(__name__)
BLUR_DOWNSCALE = 16  # the blurred image is made from a 1/16-size copy: nothing of the detail survives
BLUR_RADIUS_SHARE = 8  # then a Gaussian blur of 1/8 of that copy's shorter side


class ContentBlocked(RuntimeError):
    """A prediction's output was flagged and its policy is `block`: it fails, nothing of it is stored."""


def checker_name(path: str) -> str:
    """How results and GET /v1/models name the checker: a hub id as is, a folder by its last part only (the
    operator's directory layout is nobody else's business)."""
    folder = Path(path)
    return folder.name if folder.is_dir() else path


class Checker:
    """`AutoModelForImageClassification` + its `AutoImageProcessor`, from a folder or a hub id (with the worker's
    HF_HUB_OFFLINE, never downloaded at run time). An output's score is the probability of the unsafe labels
    (KLEIN_SAFETY_LABELS, matched against config.id2label without regard to case) together."""

    def __init__(self, path: str, labels: list[str], threshold: float, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        started = time.perf_counter()
        self.name = checker_name(path)
        self.threshold = threshold
        self.device = device
        self.processor: Any = AutoImageProcessor.from_pretrained(path)
        self.model: Any = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
        id2label = {int(index): str(name) for index, name in self.model.config.id2label.items()}
        wanted = {label.casefold() for label in labels}
        self.unsafe = sorted(index for index, name in id2label.items() if name.casefold() in wanted)
        if not self.unsafe:
            raise ValueError(
                f"KLEIN_SAFETY_MODEL {self.name}: none of its labels {sorted(id2label.values())} is one of "
                f"KLEIN_SAFETY_LABELS {labels}"
            )
        self.labels = [id2label[index] for index in self.unsafe]
        self.load_s = time.perf_counter() - started

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Checker | None:
        if not settings.safety_model:
            log.warning("no safety checker: %s; every result says checked: false", safety.NOT_CONFIGURED)
            return None
        checker = cls(settings.safety_model, settings.safety_labels, settings.safety_threshold, device)
        log.info(
            "safety checker %s loaded in %.2f s: unsafe labels %s, threshold %g",
            checker.name,
            checker.load_s,
            checker.labels,
            checker.threshold,
        )
        return checker

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> list[float]:
        """The unsafe probability of each image, in one forward pass."""
        if not images:
            return []
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        logits = self.model(**{name: value.to(self.device) for name, value in inputs.items()}).logits
        scores: list[float] = logits.float().softmax(-1)[:, self.unsafe].sum(-1).tolist()
        return scores


def blurred(image: Image.Image) -> Image.Image:
    """The image blurred beyond recognition, at its own size."""
    small = image.convert("RGB").resize(
        (max(1, image.width // BLUR_DOWNSCALE), max(1, image.height // BLUR_DOWNSCALE)), Image.Resampling.BOX
    )
    small = small.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(small.size) / BLUR_RADIUS_SHARE)))
    return small.resize(image.size, Image.Resampling.BILINEAR)


@dataclass
class Review:
    """One prediction's outputs after the check: what may be stored, and the record kept with the prediction."""

    outputs: list[Image.Image]
    record: dict[str, Any]

    @property
    def blocked(self) -> bool:
        return bool(self.record.get("blocked"))


def review(checker: Checker | None, policies: list[str], outputs: list[list[Image.Image]]) -> list[Review]:
    """Check the outputs of a pipeline call's predictions (one forward pass for all whose policy is not "off"),
    then apply each one's policy to its own outputs: a flagged output is blurred (`blur`), kept (`flag`) or
    fails its prediction (`block`); the other predictions of the call are not touched."""
    if checker is None:
        pairs = zip(policies, outputs, strict=True)
        return [Review(images, safety.unchecked(policy, safety.NOT_CONFIGURED)) for policy, images in pairs]
    checked = [images for policy, images in zip(policies, outputs, strict=True) if policy != "off"]
    scores = iter(checker.scores([image for images in checked for image in images]))
    reviews = []
    for policy, images in zip(policies, outputs, strict=True):
        if policy == "off":
            reviews.append(Review(images, safety.unchecked(policy, safety.TURNED_OFF)))
            continue
        own = [next(scores) for _ in images]
        flagged = [score >= checker.threshold for score in own]
        record = safety.checked(policy, checker.name, flagged, own)
        if policy == "blur":
            images = [blurred(image) if flag else image for image, flag in zip(images, flagged, strict=True)]
        reviews.append(Review([] if record["blocked"] else images, record))
    return reviews
