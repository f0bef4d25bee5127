"""The GPU worker: `celery -A worker.app worker -Q <queue>`.

The pipeline is loaded once per process, after the fork (worker_process_init), together
with every client the task uses; the solo pool then runs one prediction at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.signals import task_postrun, task_prerun, worker_process_init

from core import logs, tracing
from core.queue import PREDICT_TASK, REQUEST_ID_HEADER, make_celery, model_queue
from core.settings import get_settings
from worker import celery_logs, exposition, metrics

if TYPE_CHECKING:  # imported once the logging is set up (celery_logs): torch and diffusers log as they load
    from worker.runtime import WorkerRuntime

settings = get_settings()
app = make_celery(settings)
# Without -Q the worker consumes its model's queue: flux-klein-4b's is KLEIN_QUEUE_NAME, another's "<name>.<id>".
app.conf.task_default_queue = model_queue(settings.queue_name, settings.model_id)
_runtime: WorkerRuntime | None = None
celery_logs.install(settings, model_libraries=True)


@task_prerun.connect
def _bind_task(task: Any = None, args: Any = (), **_: Any) -> None:
    """Every line of a task names its prediction, and the submit's request id when its message carries one."""
    logs.clear()
    if args:
        logs.bind(prediction_id=args[0])
    request_id = task.request.get(REQUEST_ID_HEADER) if task is not None else None
    if request_id:
        logs.bind(request_id=request_id)


@task_postrun.connect
def _unbind_task(**_: Any) -> None:
    logs.clear()


@worker_process_init.connect
def _start_runtime(**_: Any) -> None:
    global _runtime
    from worker.runtime import WorkerRuntime

    tracing.configure("klein-worker", celery=True, s3=True)  # after the fork, as its threads must be
    # The pipeline's state is readable while it loads; a port already taken ends the worker.
    exposition.serve(settings.worker_metrics_port, "KLEIN_WORKER_METRICS_PORT", settings.worker_metrics_host)
    metrics.register_gpu_collector()
    _runtime = WorkerRuntime.start(settings)


@app.task(name=PREDICT_TASK)
def predict(prediction_id: str) -> None:
    global _runtime
    if _runtime is None:  # not started through the worker signal (e.g. a direct call)
        from worker.runtime import WorkerRuntime

        _runtime = WorkerRuntime.start(settings)
    _runtime.run(prediction_id)
