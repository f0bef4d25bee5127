"""The GPU worker of `bench.scale`: the real `worker.app` on the tiny pipeline, waiting at three gates per
prediction (bench/scale_gates.py): `claim` before the task's body (the broker fetch is done, the claim is not),
`run` after the claim (before the pipeline), `finish` after the pipeline (before encode, upload and the row's
update); `done` is marked after the task. Run as `celery -A bench.scale_worker worker` by the benchmark."""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_prerun

import worker.runtime
from bench.scale_gates import from_env
from models.klein_pipeline import KleinPipeline

gates = from_env()


class GatedPipeline(KleinPipeline):
    def generate_batch(self, *args: Any, **kwargs: Any) -> Any:
        gates.reach("run")
        result = super().generate_batch(*args, **kwargs)
        gates.reach("finish")
        return result


def _prerun(**_: Any) -> None:
    gates.in_task = True
    gates.reach("claim")


def _postrun(**_: Any) -> None:
    gates.in_task = False
    gates.mark("done")


if not hasattr(worker.runtime, "KleinPipeline"):
    raise RuntimeError("bench.scale_worker: worker.runtime no longer uses KleinPipeline; update the gates")
worker.runtime.KleinPipeline = GatedPipeline  # type: ignore[misc]
task_prerun.connect(_prerun, weak=False)
task_postrun.connect(_postrun, weak=False)

from worker.app import app  # noqa: E402 - after the gates are in place

__all__ = ["app"]
