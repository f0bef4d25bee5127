"""Deadlines on the real stack (core/deadlines.py): `deadline_s` in our input, Replicate's `Cancel-After` and fal's
`X-Fal-Request-Timeout`. A prediction not started by its deadline ends canceled, "deadline exceeded", with the
GPU worker stopped (SIGSTOP) and after it resumes, never run and never billed; one running past it is canceled
at the next step; malformed values are refused in each dialect's shape, nothing stored."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from core import lifecycle, quota
from core.deadlines import DEADLINE_EXCEEDED
from core.ids import new_id
from core.queue import enqueue
from core.sweeper import Sweeper
from core.tables import predictions, usage_records
from core.tenants import IssuedKey
from models.klein import KleinInput
from ops.embedded import Service, start_webhook_worker
from tests.conftest import Stack
from tests.receiver import Receiver

MODEL = {"Model": "flux-klein-4b"}
FAL_APP = "fal-ai/flux-2/klein/4b"
REPLICATE_MODEL = "/v1/models/black-forest-labs/flux-2-klein-4b/predictions"


@pytest.fixture(scope="module")
def webhook_worker(stack: Stack) -> Iterator[Service]:
    env = stack.env | {"KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1", "KLEIN_WEBHOOK_RETRY_BASE_S": "0.4"}
    worker = start_webhook_worker(env, stack.logs / "deadline-webhooks.log", "deadline-webhooks")
    yield worker
    worker.stop()


@contextlib.contextmanager
def gpu_worker_stopped(stack: Stack) -> Iterator[None]:
    """The session's GPU worker frozen (its sweeper thread with it): nothing claims, nothing sweeps."""
    assert stack.worker.process is not None
    os.kill(stack.worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(stack.worker.process.pid, signal.SIGCONT)


def row(stack: Stack, prediction_id: str) -> Any:
    with stack.engine.connect() as conn:
        return conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().one()


def billed(stack: Stack, prediction_id: str) -> int:
    with stack.engine.connect() as conn:
        query = select(func.count()).where(usage_records.c.prediction_id == prediction_id)
        return int(conn.execute(query).scalar_one())


def stored(stack: Stack, tenant: IssuedKey) -> int:
    with stack.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(predictions.c.tenant_id == tenant.tenant_id)).scalar_one())


def until(check: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return found


def start_deadline_passed(stack: Stack, prediction_id: str) -> bool:
    """By the database's clock, as the claim and the sweeper judge it."""
    with stack.engine.connect() as conn:
        query = select(predictions.c.start_deadline_at <= func.now()).where(predictions.c.id == prediction_id)
        return bool(conn.execute(query).scalar_one())


def in_flight(stack: Stack, tenant: IssuedKey) -> int:
    client = redis.Redis.from_url(stack.settings.redis_url)
    return int(client.get(quota.in_flight_key(stack.settings.queue_name, tenant.tenant_id)) or 0)


def never_ran(stack: Stack, prediction_id: str) -> None:
    final = row(stack, prediction_id)
    assert final["status"] == "canceled" and final["error"] == DEADLINE_EXCEEDED
    assert final["attempts"] == 0 and final["started_at"] is None and final["outputs"] == []
    assert billed(stack, prediction_id) == 0


def test_predictions_not_started_by_their_deadline_end_canceled_with_the_worker_stopped_and_never_run(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, webhook_worker: Service
) -> None:
    receiver = Receiver().start()
    bearer = {"Authorization": f"Bearer {tenant.key}"}
    fal_key = {"Authorization": f"Key {tenant.key}"}
    try:
        with gpu_worker_stopped(stack):
            body = {"input": {"prompt": "late", "deadline_s": 1}, "webhook": receiver.url}
            ours = client.post("/v1/predictions", headers=MODEL, json=body)
            assert ours.status_code == 201, ours.text
            assert ours.json()["input"]["deadline_s"] == 1
            replicate = client.post(
                REPLICATE_MODEL, headers=bearer | {"Cancel-After": "1s"}, json={"input": {"prompt": "late"}}
            )
            assert replicate.status_code == 201, replicate.text
            fal = client.post(f"/{FAL_APP}", headers=fal_key | {"X-Fal-Request-Timeout": "1.5"}, json={"prompt": "x"})
            assert fal.status_code == 200, fal.text
            ids = [ours.json()["id"], replicate.json()["id"], fal.json()["request_id"]]
            for prediction_id in ids:
                assert row(stack, prediction_id)["start_deadline_at"] is not None
            assert row(stack, ids[0])["deadline_at"] == row(stack, ids[0])["start_deadline_at"]
            assert row(stack, ids[2])["deadline_at"] is None  # fal's: a time-to-start deadline only

            # No worker and no sweeper runs: reading the status past the deadline says canceled.
            status = until(
                lambda: (b := client.get(f"/v1/predictions/status/{ids[0]}").json())["status"] == "canceled" and b,
                "our prediction canceled",
            )
            assert status["error"] == DEADLINE_EXCEEDED and status["started_at"] is None
            shown = until(
                lambda: (
                    (b := client.get(f"/v1/predictions/{ids[1]}", headers=bearer).json())["status"] == "canceled" and b
                ),
                "Replicate's prediction canceled",
            )
            assert shown["error"] == DEADLINE_EXCEEDED and shown["output"] is None
            fal_status = until(
                lambda: (
                    (s := client.get(f"/fal-ai/flux-2/requests/{ids[2]}/status", headers=fal_key)).status_code == 200
                    and s.json()
                ),
                "fal's request completed",
            )
            assert fal_status["status"] == "COMPLETED" and fal_status["error"] == DEADLINE_EXCEEDED
            result = client.get(f"/fal-ai/flux-2/requests/{ids[2]}", headers=fal_key)
            assert result.status_code == 504 and result.headers["X-Fal-Request-Timeout-Type"] == "user"
            assert DEADLINE_EXCEEDED in result.json()["detail"]
            wavespeed = client.get(f"/api/v3/predictions/{ids[0]}/result").json()["data"]
            assert wavespeed["status"] == "failed" and wavespeed["error"] == DEADLINE_EXCEEDED
            assert in_flight(stack, tenant) == 0  # their slots are back

            # The webhook fires as for a cancel, while the GPU worker is still stopped.
            (hook,) = receiver.wait_for(1)
            payload = orjson.loads(hook.body)
            assert payload["id"] == ids[0] and payload["status"] == "canceled"
            assert payload["error"] == DEADLINE_EXCEEDED

        # Resumed, the worker takes their messages and runs none of them.
        log = stack.logs / "worker.log"
        until(
            lambda: all(f"prediction {pid} is finished or held" in log.read_text() for pid in ids),
            "the worker skipped all three",
        )
        for prediction_id in ids:
            never_ran(stack, prediction_id)
    finally:
        receiver.stop()


def test_a_worker_cancels_what_it_may_no_longer_start_and_the_sweeper_what_no_worker_takes(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    broker = redis.Redis.from_url(stack.settings.redis_url)
    lock = f"{stack.settings.queue_name}:sweeper-lock"
    # The claim: a message for a prediction already past its deadline (the session's sweeper kept away by its lock).
    until(lambda: broker.set(lock, "this test", nx=True, px=60_000), "the sweeper lock")
    try:
        late = queued(stack, tenant, start_deadline_s=-1)
        enqueue(broker, stack.settings, late, "flux-klein-4b")
        log = stack.logs / "worker.log"
        until(lambda: f"prediction {late} canceled: {DEADLINE_EXCEEDED} before" in log.read_text(), "the claim")
        never_ran(stack, late)
    finally:
        broker.delete(lock)

    # The sweeper: queued, never enqueued, no worker running; a sweep pass cancels it and announces it.
    with gpu_worker_stopped(stack):
        waiting = queued(stack, tenant, start_deadline_s=0.2)
        until(lambda: start_deadline_passed(stack, waiting), "the deadline passed")
        events = broker.pubsub(ignore_subscribe_messages=True)
        events.subscribe(stack.settings.events_channel)
        sweeper = Sweeper(stack.settings, stack.engine, broker)
        report = until(sweeper.sweep, "a sweep pass")  # None while a frozen sweeper's lock is held
        assert report.deadline_canceled >= 1
        never_ran(stack, waiting)
        until(lambda: (m := events.get_message(timeout=1.0)) and m["data"] == waiting.encode(), "the announcement")
        events.close()
    assert in_flight(stack, tenant) == 0


def queued(stack: Stack, tenant: IssuedKey, start_deadline_s: float) -> str:
    """A stored queued prediction (not enqueued) of `tenant` holding its slot, due `start_deadline_s` from now."""
    prediction_id = new_id()
    inp = KleinInput(prompt="queued")
    with stack.engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=prediction_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input=inp.model_dump(),
                params=inp.to_params(7).model_dump(),
            )
        )
        due = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, start_deadline_s)
        conn.execute(update(predictions).where(predictions.c.id == prediction_id).values(start_deadline_at=due))
    slots = quota.in_flight_key(stack.settings.queue_name, tenant.tenant_id)
    redis.Redis.from_url(stack.settings.redis_url).incr(slots)
    return prediction_id


def worker_counter(stack: Stack, outcome: str, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.env['KLEIN_WORKER_METRICS_PORT']}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "klein_worker_predictions_total" and (labels["outcome"], labels["reason"]) == (
                outcome,
                reason,
            ):
                return float(sample.value)
    return 0.0


def test_a_prediction_running_past_its_deadline_is_canceled_at_the_next_step_unbilled(
    stack: Stack, client: httpx.Client
) -> None:
    before = worker_counter(stack, "canceled", "deadline")
    idle = client.post("/v1/predictions", headers=MODEL | {"Try-Sync": "true"}, json={"input": {"prompt": "first"}})
    assert idle.json()["status"] == "succeeded"  # the worker is free: it starts the next one at once
    slow = {"prompt": "long", "num_inference_steps": 50, "deadline_s": 2}
    pid = client.post("/v1/predictions", headers=MODEL, json={"input": slow}).json()["id"]
    final = until(lambda: (r := row(stack, pid))["status"] in ("completed", "failed", "canceled") and r, "the end", 120)
    assert final["status"] == "canceled" and final["error"] == DEADLINE_EXCEEDED
    assert final["started_at"] is not None and final["outputs"] == []  # it ran, then stopped
    assert billed(stack, pid) == 0
    assert "Stop: deadline exceeded" in (stack.logs / "worker.log").read_text()
    status = client.get(f"/v1/predictions/status/{pid}").json()
    assert status["status"] == "canceled" and status["error"] == DEADLINE_EXCEEDED
    assert worker_counter(stack, "canceled", "deadline") == before + 1


@pytest.mark.parametrize("value", ["soon", "-5s", "0s", "25h", "5x", "1h-3m", ""])
def test_a_malformed_cancel_after_is_replicates_422_and_stores_nothing(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, value: str
) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}", "Cancel-After": value}
    answer = client.post(REPLICATE_MODEL, headers=headers, json={"input": {"prompt": "x"}})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "Cancel-After" in answer.json()["detail"]
    assert stored(stack, tenant) == 0


@pytest.mark.parametrize("value", ["soon", "-1", "0", "0.05", "1e9", "nan", "inf"])
def test_a_malformed_fal_request_timeout_is_fals_422_and_stores_nothing(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, value: str
) -> None:
    headers = {"Authorization": f"Key {tenant.key}", "X-Fal-Request-Timeout": value}
    answer = client.post(f"/{FAL_APP}", headers=headers, json={"prompt": "x"})
    assert answer.status_code == 422, answer.text
    (detail,) = answer.json()["detail"]
    assert detail["loc"] == ["header", "X-Fal-Request-Timeout"]
    assert stored(stack, tenant) == 0


@pytest.mark.parametrize("value", [-1, 0, 0.01, 1e9, "5", True])
def test_a_malformed_deadline_s_is_refused_by_pruna_and_openai_and_stores_nothing(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, value: Any
) -> None:
    ours = client.post("/v1/predictions", headers=MODEL, json={"input": {"prompt": "x", "deadline_s": value}})
    assert ours.status_code == 422, ours.text
    assert "input.deadline_s" in ours.json()["error"]
    if isinstance(value, int | float) and not isinstance(value, bool):  # OpenAI's body is not strict: "5" is 5
        openai = client.post("/v1/images/generations", json={"prompt": "x", "deadline_s": value})
        assert openai.status_code == 422, openai.text
        assert openai.json()["error"]["param"] == "deadline_s"
    assert stored(stack, tenant) == 0
