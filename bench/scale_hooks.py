"""The webhook worker of `bench.scale`: the real `worker.webhooks`, marking `hookdone` after each task
(bench/scale_gates.py). The benchmark starts it on an idle queue and adds the webhooks' queue to it (Celery's
`add_consumer`) when the webhook phase begins, so that no prompt is fetched while the GPU worker is measured."""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun

from bench.scale_gates import from_env

gates = from_env()


def _postrun(**_: Any) -> None:
    gates.mark("hookdone")


task_postrun.connect(_postrun, weak=False)

from worker.webhooks import app  # noqa: E402 - after the marks are in place

__all__ = ["app"]
