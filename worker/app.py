"""The GPU worker: `celery -A worker.app worker -Q <queue>`.

The pipeline is loaded once per process, after the fork (worker_process_init), together
with every client the task uses; the solo pool then runs one prediction at a time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject
from celery.signals import task_postrun, task_prerun, worker_process_init

from core import logs, tracing, workers
from core.enhance_jobs import ENHANCE_TASK
from core.queue import PREDICT_TASK, REQUEST_ID_HEADER, make_celery, model_queue
from core.settings import get_settings

# metrics and sweep_metrics imported here: the worker's series exist from its start (its loading state)
from worker import celery_logs, exposition, gpu, metrics, sweep_metrics  # noqa: F401

if TYPE_CHECKING:  # imported once the logging is set up (celery_logs): torch and diffusers log as they load
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)
settings = get_settings()
app = make_celery(settings)
# Without -Q the worker consumes its model's queue: flux-klein-4b's is KLEIN_QUEUE_NAME, another's "<name>.<id>".
app.conf.task_default_queue = model_queue(settings.queue_name, settings.model_id)
_runtime: WorkerRuntime | None = None
_node = ""  # the Celery node name (-n), for the drain (core/workers.py)
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
def _start_runtime(sender: Any = None, **_: Any) -> None:
    global _runtime, _node
    from worker.runtime import WorkerRuntime

    _node = sender if isinstance(sender, str) else ""  # the solo pool sends the node name
    tracing.configure("klein-worker", celery=True, s3=True)  # after the fork, as its threads must be
    # The pipeline's state is readable while it loads; a port already taken ends the worker.
    port, host = settings.worker_metrics_port, settings.worker_metrics_host
    exposition.serve(port, "KLEIN_WORKER_METRICS_PORT", host, labels={"model": settings.model_id})
    gpu.register_collector()
    _runtime = WorkerRuntime.start(settings, _node)


@app.task(name=PREDICT_TASK, bind=True)
def predict(task: Any, prediction_id: str) -> None:
    global _runtime
    if _runtime is None:  # not started through the worker signal (e.g. a direct call)
        from worker.runtime import WorkerRuntime

        _runtime = WorkerRuntime.start(settings, _node)
    if _runtime.heartbeat.draining.is_set():
        # Drained, but the message came before the node read its cancel_consumer: back to its queue for another
        # worker, untouched, and the queue it came from cancelled here too (in case the command was lost).
        queue = (task.request.delivery_info or {}).get("routing_key") or app.conf.task_default_queue
        log.info("draining: %s handed back to %s", prediction_id, queue)
        workers.stop_consuming(settings, queue, _node)
        raise Reject("draining", requeue=True)
    _runtime.run(prediction_id)


@app.task(name=ENHANCE_TASK)
def enhance(job_id: str) -> None:
    """A standalone prompt enhancement (worker/enhance.py), on the same queue and GPU as the model's predictions."""
    global _runtime
    if _runtime is None:
        from worker.runtime import WorkerRuntime

        _runtime = WorkerRuntime.start(settings, _node)
    _runtime.enhancements.run(job_id)
