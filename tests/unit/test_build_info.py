"""core/build.py: the labels of `klein_build_info`, each process's one series of it."""

from __future__ import annotations

import platform
from importlib import metadata

import pytest
from prometheus_client import REGISTRY

from core.build import build_labels


def test_the_revision_is_the_images_build_argument_else_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLEIN_REVISION", "3f2c9e1\n")
    assert build_labels() == {"version": metadata.version("klein-serve"), "revision": "3f2c9e1",
                              "python": platform.python_version()}  # fmt: skip
    monkeypatch.setenv("KLEIN_REVISION", "  ")
    assert build_labels()["revision"] == "unknown"
    monkeypatch.delenv("KLEIN_REVISION")
    assert build_labels()["revision"] == "unknown"


def test_one_series_of_value_one() -> None:
    import api.infra.metrics  # noqa: F401  (both tiers' metrics in one registry: still one series)
    import worker.webhook_metrics  # noqa: F401

    (family,) = [family for family in REGISTRY.collect() if family.name == "klein_build_info"]
    assert [sample.value for sample in family.samples] == [1.0]
