"""The worker on the real stack: failures end predictions, duplicates do nothing."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import bindparam, func, literal, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB

from core import events, lifecycle, quota, usage
from core.db import make_sync_engine
from core.ids import new_id
from core.queue import enqueue, queued_key
from core.tables import predictions
from core.tenants import IssuedKey
from models.klein import KleinInput
from tests.conftest import Stack
from tests.pgbouncer import THROUGH_PGBOUNCER
from worker.database import DB_ERRORS, first


def broker(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url)


def row(stack: Stack, prediction_id: str) -> Any:
    with stack.engine.connect() as conn:
        return conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().one()


def wait_for(stack: Stack, prediction_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = row(stack, prediction_id)
        if lifecycle.Status(current["status"]).terminal:
            return current
        time.sleep(0.1)
    raise AssertionError(f"{prediction_id} still {current['status']}")


def start_slow_prediction(stack: Stack, client: httpx.Client) -> str:
    """Submit a 50-step prediction and return its id once a worker is running it."""
    slow = {"prompt": "long", "num_inference_steps": 50}
    pid = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": slow}).json()["id"]
    deadline = time.monotonic() + 60
    while row(stack, pid)["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return str(pid)


def poison_prediction(stack: Stack, tenant: IssuedKey) -> str:
    """Store and enqueue a row whose parameters crash the pipeline (8 px is below one latent patch)."""
    inp = KleinInput(prompt="poison")
    params = inp.to_params(5).model_copy(update={"width": 8, "height": 8})
    pid = new_id()
    with stack.engine.begin() as conn:
        conn.execute(
            lifecycle.create(
                prediction_id=pid,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input=inp.model_dump(),
                params=params.model_dump(),
            )
        )
    enqueue(broker(stack), stack.settings, pid, "flux-klein-4b")
    return pid


def test_a_pipeline_error_fails_the_prediction_and_the_worker_keeps_serving(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    pid = poison_prediction(stack, tenant)
    failed = wait_for(stack, pid)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the worker could not generate this image") and "Error" not in failed["error"]
    assert pid in (stack.logs / "worker.log").read_text()  # what went wrong is in the operators' log
    assert failed["outputs"] == []

    status = client.get(f"/v1/predictions/status/{pid}").json()
    assert status["status"] == "failed" and status["error"] == failed["error"]
    assert "generation_url" not in status

    after = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json={"input": {"prompt": "ok"}}
    )
    assert after.json()["status"] == "succeeded"


def test_the_finish_is_announced_with_the_final_row_and_clears_the_slot_and_the_queued_mark(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    """Try-Sync answers from this event (api/services/predictions.py), so it must be the row as stored."""
    subscription = broker(stack).pubsub(ignore_subscribe_messages=True)
    subscription.subscribe(stack.settings.events_channel)
    answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": {"prompt": "news"}})
    pid = answer.json()["id"]
    deadline = time.monotonic() + 60
    announced = b""
    while not announced:
        assert time.monotonic() < deadline, "no completion event"
        message = subscription.get_message(timeout=1.0)
        if message is not None and events.parse(message["data"])[0] == pid:
            announced = events.parse(message["data"])[1]
    stored = dict(row(stack, pid))
    assert stored["status"] == "completed"
    assert events.final_row(announced) == {k: v for k, v in stored.items() if k not in ("input", "params", "webhook")}
    in_flight = broker(stack).get(quota.in_flight_key(stack.settings.queue_name, tenant.tenant_id))
    assert int(in_flight or 0) == 0
    assert not broker(stack).sismember(queued_key(stack.settings), pid)  # nothing left for the sweeper
    subscription.close()


def test_a_duplicate_delivery_of_a_completed_prediction_does_nothing(stack: Stack, client: httpx.Client) -> None:
    body = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json={"input": {"prompt": "once"}}
    ).json()
    before = row(stack, body["id"])
    log = stack.logs / "worker.log"
    skipped = log.read_text().count(f"prediction {body['id']} is finished")

    enqueue(broker(stack), stack.settings, body["id"], "flux-klein-4b")
    enqueue(broker(stack), stack.settings, body["id"], "flux-klein-4b")
    deadline = time.monotonic() + 30
    while log.read_text().count(f"prediction {body['id']} is finished") < skipped + 2:
        assert time.monotonic() < deadline, "worker never saw the duplicates"
        time.sleep(0.1)
    assert row(stack, body["id"]) == before  # same attempts, outputs, timings, timestamps


def test_canceling_a_running_prediction_stops_its_inference(stack: Stack, client: httpx.Client) -> None:
    pid = start_slow_prediction(stack, client)
    assert client.post(f"/v1/predictions/{pid}/cancel").json()["status"] == "canceled"
    log = stack.logs / "worker.log"
    deadline = time.monotonic() + 30
    while f"prediction {pid} changed state while running" not in log.read_text():
        assert time.monotonic() < deadline, "the worker never noticed the cancel"
        time.sleep(0.1)
    assert "Stop: canceled or taken over by another worker" in log.read_text()
    final = row(stack, pid)
    assert final["status"] == "canceled" and final["outputs"] == []


def test_a_worker_whose_prediction_was_taken_over_leaves_the_queued_mark(stack: Stack, client: httpx.Client) -> None:
    """The id then marks the prediction's new message (the sweeper's requeue, or another worker's run)."""
    pid = start_slow_prediction(stack, client)
    with stack.engine.begin() as conn:  # as if its lease had lapsed and another worker had claimed it
        conn.execute(predictions.update().where(predictions.c.id == pid).values(worker_id="another"))
    broker(stack).sadd(queued_key(stack.settings), pid)  # that run's message, as the sweeper's requeue marks it
    subscription = broker(stack).pubsub(ignore_subscribe_messages=True)
    subscription.subscribe(stack.settings.events_channel)
    deadline = time.monotonic() + 30
    while True:  # the worker's announcement closes its last round trip
        assert time.monotonic() < deadline, "the worker never noticed the takeover"
        message = subscription.get_message(timeout=1.0)
        if message is not None and events.parse(message["data"]) == (pid, b""):
            break
    subscription.close()
    try:
        assert broker(stack).sismember(queued_key(stack.settings), pid)
    finally:
        with stack.engine.begin() as conn:
            conn.execute(predictions.update().where(predictions.c.id == pid).values(status="canceled"))
        broker(stack).srem(queued_key(stack.settings), pid)


@pytest.mark.skipif(THROUGH_PGBOUNCER, reason="transaction pooling drops the `options` startup parameter")
def test_claims_commit_without_waiting_for_the_disk_and_results_with(stack: Stack) -> None:
    for durable, expected in ((True, "on"), (False, "off")):
        engine = make_sync_engine(stack.settings, durable=durable)
        with engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == expected
        engine.dispose()


def test_a_claim_the_database_lost_is_queued_again(stack: Stack, client: httpx.Client) -> None:
    """After a database crash the row is `created` as before the claim, its message gone and its id still marked
    queued (which keeps the sweeper away): the worker that ran it queues it again."""
    pid = start_slow_prediction(stack, client)
    with stack.engine.begin() as conn:  # what crash recovery leaves when the claim's commit never reached the disk
        conn.execute(
            predictions.update()
            .where(predictions.c.id == pid)
            .values(
                status="created",
                worker_id=None,
                started_at=None,
                lease_expires_at=None,
                attempts=predictions.c.attempts - 1,
            )
        )
    final = wait_for(stack, pid, timeout=120)
    assert f"the claim of {pid} was lost" in (stack.logs / "worker.log").read_text()
    assert final["status"] == "completed" and final["attempts"] == 1
    assert not broker(stack).sismember(queued_key(stack.settings), pid)


@pytest.mark.skipif(THROUGH_PGBOUNCER, reason="PgBouncer keeps the server connections; clients do not own one")
def test_worker_statements_bind_json_and_drop_a_lost_connection(stack: Stack) -> None:
    engine = make_sync_engine(stack.settings, pre_ping=False).execution_options(isolation_level="AUTOCOMMIT")
    typeof = select(func.jsonb_typeof(bindparam("doc", type_=JSONB)).label("kind"), literal("x").label("carried"))
    with engine.connect() as conn:
        assert first(conn, typeof, {"doc": {"a": 1}}) == {"kind": "object", "carried": "x"}
        assert first(conn, typeof, {"doc": [1]}) == {"kind": "array", "carried": "x"}
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with stack.engine.connect() as other:  # the server ends the session, as a restart would
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DB_ERRORS):
            first(conn, typeof, {"doc": {}})
        assert conn.invalidated
    with engine.connect() as conn:  # the pool opened a new one
        assert first(conn, typeof, {"doc": {}}) == {"kind": "object", "carried": "x"}
    engine.engine.dispose()


def test_the_finish_binds_outputs_and_timings_as_jsonb() -> None:
    """The finish's JSON values are bound by their columns' types (a dict or list is never sent as text)."""
    completed = lifecycle.complete(bindparam("prediction_id"), "w", bindparam("final_outputs"), bindparam("t"))
    compiled = usage.finish_and_bill(completed, 0.1).compile(dialect=postgresql.psycopg.dialect())
    types = {name: type(bind.type) for bind, name in compiled.bind_names.items()}
    assert types["final_outputs"] is JSONB and types["t"] is JSONB
