"""The GPU worker: `celery -A worker.app worker -Q <queue>`.

The pipeline is loaded once per process, after the fork (worker_process_init), together
with every client the task uses; the solo pool then runs one prediction at a time.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from core.queue import PREDICT_TASK, make_celery
from core.settings import get_settings
from worker.runtime import WorkerRuntime

settings = get_settings()
app = make_celery(settings)
_runtime: WorkerRuntime | None = None


@worker_process_init.connect
def _start_runtime(**_: Any) -> None:
    global _runtime
    _runtime = WorkerRuntime.start(settings)


@app.task(name=PREDICT_TASK)
def predict(prediction_id: str) -> None:
    global _runtime
    if _runtime is None:  # not started through the worker signal (e.g. a direct call)
        _runtime = WorkerRuntime.start(settings)
    _runtime.run(prediction_id)
