"""The GPU workers as operators see them: announced with their model and state, and drained (core/workers.py)."""

from __future__ import annotations

import socket
from typing import Any

import httpx

from core import lifecycle, progress, workers
from core.ids import new_id
from core.queue import model_queue, queued_key, task_message
from core.tenants import IssuedKey
from models.klein import KleinInput
from ops.embedded import start_worker, wait_until
from tests.conftest import ADMIN_KEY, Stack
from tests.e2e.test_worker import broker, row, wait_for

MODEL = "flux-klein-4b"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def admin(stack: Stack, path: str, method: str = "GET") -> Any:
    answer = httpx.request(method, f"{stack.api_url}/admin/v1{path}", headers=ADMIN, timeout=30)
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def worker_named(stack: Stack, node: str) -> dict[str, Any] | None:
    return next((worker for worker in admin(stack, "/workers")["data"] if worker["node"] == node), None)


def queued(stack: Stack, tenant: IssuedKey, queue: str, size: int, steps: int) -> str:
    """A prediction of `size`² pixels and `steps` steps whose message is on `queue`."""
    inp = KleinInput(prompt="drained", num_inference_steps=steps)
    params = inp.to_params(7).model_copy(update={"width": size, "height": size})
    pid = new_id()
    with stack.engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=pid,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model=MODEL,
                input=inp.model_dump(),
                params=params.model_dump(),
            )
        )
    key, message = task_message(queue, pid, 0)
    client = broker(stack)
    client.sadd(queued_key(stack.settings), pid)
    client.lpush(key, message)
    return pid


def test_a_drained_worker_finishes_its_prediction_takes_no_new_ones_and_is_not_counted_live(
    stack: Stack, tenant: IssuedKey
) -> None:
    """A second worker of the model, which also consumes a queue of its own (so that it, not the session's worker,
    runs the first prediction), is drained while it runs it: the prediction completes, the next ones go to the
    session's worker, and the fleet counts the drained one as draining, not live."""
    host = socket.gethostname()
    own_queue = f"{stack.env['KLEIN_QUEUE_NAME']}.drain-test"
    env = stack.env | {"KLEIN_WORKER_METRICS_PORT": "0"}
    queues = f"{model_queue(stack.env['KLEIN_QUEUE_NAME'], MODEL)},{own_queue}"
    extra = start_worker(env, stack.logs / "drained-worker.log", "drained", queue=queues)
    try:
        wait_until(lambda: worker_named(stack, f"drained@{host}") is not None, 30, "the worker's announcement")
        session_worker = worker_named(stack, f"test-worker@{host}")
        assert session_worker is not None and session_worker["model"] == MODEL
        assert admin(stack, "/queue")["models"][MODEL]["live_workers"] == 2

        running = queued(stack, tenant, own_queue, 1024, 50)  # long enough to outlast the drain's announcement
        wait_until(lambda: row(stack, running)["status"] == "processing", 60, "the held prediction's claim")
        drained = admin(stack, f"/workers/drained@{host}/drain", "POST")
        assert drained["state"] == "draining" and drained["node"] == f"drained@{host}"

        def counted_draining() -> bool:
            fleet = admin(stack, "/queue")["models"][MODEL]
            return fleet["draining_workers"] == 1 and fleet["live_workers"] == 1

        wait_until(counted_draining, 10, "the drained worker counted as draining")
        listed = worker_named(stack, f"drained@{host}")
        assert listed is not None and listed["state"] == "draining"
        assert listed["busy"] and row(stack, running)["status"] == "processing", "drained while it ran"

        finished = wait_for(stack, running)
        assert finished["status"] == "completed" and finished["worker_id"] == drained["worker"]
        model_queue_name = model_queue(stack.env["KLEIN_QUEUE_NAME"], MODEL)
        after = [queued(stack, tenant, model_queue_name, 256, 1) for _ in range(2)]  # as a submit queues them
        for pid in after:
            done = wait_for(stack, pid)
            assert done["status"] == "completed" and done["worker_id"] == session_worker["worker"]
        assert worker_named(stack, f"drained@{host}")["state"] == "draining"  # type: ignore[index]
        log = stack.logs / "drained-worker.log"
        assert "draining: taking no new predictions" in log.read_text()

        # Its own queue it still consumes (the drain cancelled its model's): a message arriving there is handed
        # back untouched, and that queue cancelled too.
        handed_back = queued(stack, tenant, own_queue, 256, 1)
        wait_until(lambda: f"draining: {handed_back} handed back" in log.read_text(), 30, "the message handed back")
        wait_until(lambda: broker(stack).llen(own_queue) == 1, 10, "the message back in its queue")
        assert row(stack, handed_back)["status"] == "created" and row(stack, handed_back)["attempts"] == 0

        unknown = httpx.post(f"{stack.api_url}/admin/v1/workers/nobody@nowhere/drain", headers=ADMIN)
        assert unknown.status_code == 404 and "nobody@nowhere" in unknown.json()["error"]
        assert httpx.get(f"{stack.api_url}/admin/v1/workers").status_code == 401
    finally:
        extra.stop()
        forget_worker(stack, f"drained@{host}")
        broker(stack).delete(own_queue)


def forget_worker(stack: Stack, node: str) -> None:
    """The stopped worker's entries, which would otherwise stay FORGET_S (later tests count the fleet)."""
    client, settings = broker(stack), stack.settings
    gone = [w.worker for w in workers.read(client.hgetall(workers.registry_key(settings)))[0] if w.node == node]
    if gone:
        pipe = client.pipeline(transaction=False)
        workers.forget(pipe, settings, gone)
        pipe.zrem(workers.draining_key(settings, MODEL), *gone)
        pipe.zrem(progress.workers_key(settings, MODEL), *gone)
        pipe.execute()
