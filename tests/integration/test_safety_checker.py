"""The image checker as the worker runs it (worker/safety.py), on classifiers built in code and saved as folders,
loaded through the same AutoModelForImageClassification path as a real one: the per-output decision on known
inputs, each prediction's policy applied to its own outputs only, and folders that cannot serve refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from models.tiny_safety import save
from worker.safety import Checker, blurred, review

CPU = torch.device("cpu")
DARK, LIGHT = (20, 20, 20), (235, 235, 235)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkers")
    return {kind: save(root / kind, kind) for kind in ("random", "nsfw", "normal", "bright")}


def solid(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def noise(seed: int, size: int = 64) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_forcing_classifiers_decide_every_image_and_a_random_one_loads_honestly(folders: dict[str, Path]) -> None:
    images = [solid(DARK), solid(LIGHT), noise(1)]
    assert all(score > 0.99 for score in Checker(str(folders["nsfw"]), ["nsfw"], 0.5, CPU).scores(images))
    assert all(score < 0.01 for score in Checker(str(folders["normal"]), ["nsfw"], 0.5, CPU).scores(images))
    random = Checker(str(folders["random"]), ["NSFW"], 0.5, CPU)  # labels matched without regard to case
    assert random.name == "random" and random.labels == ["nsfw"]
    assert all(0.0 <= score <= 1.0 for score in random.scores(images))


def test_one_flagged_output_of_four_is_the_only_one_blurred_or_blocked(folders: dict[str, Path]) -> None:
    checker = Checker(str(folders["bright"]), ["nsfw"], 0.5, CPU)
    four = [solid(DARK), solid(DARK), solid(LIGHT), solid(DARK)]
    blur, flag, block, off = review(checker, ["blur", "flag", "block", "off"], [four, four, four, four])

    assert blur.record["flagged"] == [False, False, True, False] and not blur.blocked
    assert [image is original for image, original in zip(blur.outputs, four, strict=True)] == [True, True, False, True]
    assert blur.outputs[2].size == four[2].size
    assert flag.outputs == four and flag.record["flagged"] == [False, False, True, False]
    assert block.blocked and block.outputs == [] and block.record["flagged"] == [False, False, True, False]
    assert off.outputs == four and off.record == {
        "checked": False,
        "policy": "off",
        "model": None,
        "flagged": [],
        "reason": "the safety checker was turned off by the request",
    }
    clean = review(checker, ["block"], [[solid(DARK)]])[0]
    assert not clean.blocked and clean.record["flagged"] == [False]


def test_without_a_checker_nothing_is_checked_and_nothing_is_withheld() -> None:
    (only,) = review(None, ["block"], [[solid(LIGHT)]])
    assert only.outputs and only.record["checked"] is False and "KLEIN_SAFETY_MODEL unset" in only.record["reason"]


def test_blurred_leaves_no_detail() -> None:
    sharp = noise(2, 256)
    soft = blurred(sharp)
    assert soft.size == sharp.size

    def detail(image: Image.Image) -> float:
        grey = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32).reshape(256, 256)
        return float((grey[:, 1:] - grey[:, :-1]).abs().mean())

    assert detail(soft) < detail(sharp) / 20


def test_a_folder_without_the_unsafe_labels_is_refused_at_start(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"none of its labels \['normal', 'nsfw'\] is one of KLEIN_SAFETY_LABELS"):
        Checker(str(folders["random"]), ["porn"], 0.5, CPU)
