"""Fault injection on a private stack: killed workers, restarted Redis and PostgreSQL, lost storage, time limits.

Every accepted prediction must end completed or failed with a reason — never stuck, never lost,
never billed twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from core import quota, tenants
from core.lifecycle import Status
from core.sweeper import Sweeper
from core.tables import predictions, usage_records
from tests.private_stack import PrivateStack

SLOW = {"prompt": "slow", "num_inference_steps": 50, "output_format": "png"}  # seconds on the tiny CPU pipeline


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[PrivateStack]:
    stack = PrivateStack(
        tmp_path_factory.mktemp("faults"),
        tiny_model,
        overrides={
            "KLEIN_LEASE_S": "2",
            "KLEIN_SWEEP_INTERVAL_S": "0.5",
            "KLEIN_REQUEUE_GRACE_S": "1",
            "KLEIN_S3_MAX_ATTEMPTS": "2",
            "KLEIN_TRY_SYNC_TIMEOUT_S": "4",
        },
    ).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def api(faults: PrivateStack) -> Iterator[str]:
    first = faults.worker("bootstrap")  # creates the bucket the API's readiness check looks for
    _, url = faults.api()
    first.stop()
    yield url


@pytest.fixture
def key(faults: PrivateStack) -> str:
    tenant_id, create = tenants.create_tenant(f"t-{time.time_ns()}")
    issued, issue = tenants.issue_key(tenant_id)
    with faults.engine.begin() as conn:
        conn.execute(create)
        conn.execute(issue)
    return issued.key


def submit(api: str, key: str, input: dict[str, Any], sync: bool = False) -> httpx.Response:
    headers = {"apikey": key, "Model": "flux-klein-4b"} | ({"Try-Sync": "true"} if sync else {})
    return httpx.post(f"{api}/v1/predictions", headers=headers, json={"input": input}, timeout=60)


def row(faults: PrivateStack, prediction_id: str) -> Any:
    with faults.engine.connect() as conn:
        return conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().one()


def wait_for(faults: PrivateStack, prediction_id: str, statuses: set[str], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            current = row(faults, prediction_id)
        except Exception:  # the database may be down on purpose
            time.sleep(0.2)
            continue
        if current["status"] in statuses:
            return current
        time.sleep(0.1)
    raise AssertionError(f"{prediction_id} never reached {statuses}")


def bills(faults: PrivateStack, prediction_id: str) -> int:
    with faults.engine.connect() as conn:
        query = select(func.count()).select_from(usage_records).where(usage_records.c.prediction_id == prediction_id)
        return int(conn.execute(query).scalar_one())


def stored_objects(faults: PrivateStack, prefix: str) -> list[str]:
    from core.storage import make_s3_client

    listing = make_s3_client(faults.settings).list_objects_v2(Bucket=faults.settings.s3_bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def test_a_worker_killed_mid_inference_is_replaced_and_the_prediction_completes_once(
    faults: PrivateStack, api: str, key: str
) -> None:
    doomed = faults.worker("doomed")
    pid = submit(api, key, SLOW).json()["id"]
    running = wait_for(faults, pid, {"processing"})
    assert doomed.process is not None and f":{doomed.process.pid}:" in running["worker_id"]
    doomed.process.send_signal(signal.SIGKILL)
    rescuer = faults.worker("rescuer")
    try:
        done = wait_for(faults, pid, {"completed", "failed"})
        assert done["status"] == "completed", done["error"]
        assert done["attempts"] == 2 and done["worker_id"] != running["worker_id"]
        assert bills(faults, pid) == 1
        assert stored_objects(faults, f"{done['tenant_id']}/{pid}/") == [f"{done['tenant_id']}/{pid}/output.png"]
    finally:
        rescuer.stop()


def test_sigterm_finishes_the_prediction_in_hand_and_takes_no_new_one(faults: PrivateStack, api: str, key: str) -> None:
    worker = faults.worker("graceful")
    first = submit(api, key, SLOW).json()["id"]
    held = wait_for(faults, first, {"processing"})
    second = submit(api, key, {"prompt": "next"}).json()["id"]
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(180) == 0
    done = row(faults, first)
    assert done["status"] == "completed" and done["worker_id"] == held["worker_id"]
    assert row(faults, second)["status"] == "created"
    successor = faults.worker("successor")
    try:
        assert wait_for(faults, second, {"completed", "failed"})["status"] == "completed"
    finally:
        successor.stop()


def test_redis_restart_loses_nothing_and_try_sync_falls_back(faults: PrivateStack, api: str, key: str) -> None:
    queued = [submit(api, key, {"prompt": f"queued {i}"}).json()["id"] for i in range(2)]
    waiting: dict[str, httpx.Response] = {}
    waiter = threading.Thread(target=lambda: waiting.setdefault("answer", submit(api, key, {"prompt": "w"}, True)))
    waiter.start()
    time.sleep(0.5)
    faults.restart_redis()  # the queue and the counters are gone: this Redis keeps nothing
    waiter.join(30)
    assert waiting["answer"].status_code == 201 and waiting["answer"].json()["status"] == "starting"
    after = submit(api, key, {"prompt": "after the restart"})
    assert after.status_code == 201, after.text
    worker = faults.worker("after-redis")
    try:
        for pid in [*queued, waiting["answer"].json()["id"], after.json()["id"]]:
            assert wait_for(faults, pid, {"completed", "failed"})["status"] == "completed"
        assert httpx.get(f"{api}/readyz").status_code == 200
    finally:
        worker.stop()


def test_postgres_restart_gives_503_then_recovers(faults: PrivateStack, api: str, key: str) -> None:
    worker = faults.worker("through-postgres")
    try:
        pid = submit(api, key, SLOW).json()["id"]
        wait_for(faults, pid, {"processing"})
        faults.stop_postgres()
        try:
            down = httpx.get(f"{api}/v1/predictions/status/{pid}", headers={"apikey": key})
            assert down.status_code == 503 and "database unavailable" in down.json()["error"]
            assert "Traceback" not in down.text
            assert httpx.get(f"{api}/readyz").json()["checks"]["database"].startswith("error")
            # An API process started now comes up (live, not ready) and answers 503 as well.
            _, late_api = faults.api(ready_path="/healthz")
            late = httpx.get(f"{late_api}/v1/predictions/status/{pid}", headers={"apikey": key})
            assert late.status_code == 503 and "database unavailable" in late.json()["error"]
            time.sleep(2)
        finally:
            faults.start_postgres()
        done = wait_for(faults, pid, {"completed", "failed"})
        assert done["status"] == "completed" and bills(faults, pid) == 1
        for url in (api, late_api):
            status = httpx.get(f"{url}/v1/predictions/status/{pid}", headers={"apikey": key})
            assert status.status_code == 200 and status.json()["status"] == "succeeded"
    finally:
        worker.stop()


def test_storage_outage_fails_the_prediction_cleanly_then_recovers(faults: PrivateStack, api: str, key: str) -> None:
    worker = faults.worker("through-s3")
    try:
        faults.s3.stop()
        try:
            pid = submit(api, key, {"prompt": "no storage"}).json()["id"]
            failed = wait_for(faults, pid, {"completed", "failed"})
            assert failed["status"] == "failed" and failed["error"].startswith("storage unavailable after 2 attempts")
            assert failed["outputs"] == [] and bills(faults, pid) == 0
            assert httpx.get(f"{api}/readyz").status_code == 503
        finally:
            faults.s3.start()
        back = submit(api, key, {"prompt": "storage is back"}).json()["id"]
        assert wait_for(faults, back, {"completed", "failed"})["status"] == "completed"
    finally:
        worker.stop()


def test_a_prediction_over_its_time_limit_fails_with_a_timeout(faults: PrivateStack, api: str, key: str) -> None:
    worker = faults.worker("impatient", KLEIN_TASK_TIME_LIMIT_S="1")
    try:
        pid = submit(api, key, SLOW).json()["id"]
        done = wait_for(faults, pid, {"completed", "failed"})
        assert done["status"] == "failed" and done["error"] == "timed out after 1 s"
    finally:
        worker.stop()


def test_a_prediction_whose_workers_keep_dying_fails_after_the_attempt_limit(
    faults: PrivateStack, api: str, key: str
) -> None:
    pid = submit(api, key, {"prompt": "cursed"}).json()["id"]
    with faults.engine.begin() as conn:  # as if three workers had died holding it
        conn.execute(
            predictions.update()
            .where(predictions.c.id == pid)
            .values(status=Status.PROCESSING, attempts=3, worker_id="gone", lease_expires_at=func.now())
        )
    sweeper = Sweeper(faults.settings, faults.engine, redis.Redis.from_url(faults.settings.redis_url))
    deadline = time.monotonic() + 15
    while (report := sweeper.sweep()) is None:  # a stopped worker's sweeper may still hold the lock briefly
        assert time.monotonic() < deadline, "the sweeper lock was never free"
        time.sleep(0.2)
    assert report.failed_lapsed == 1
    failed = row(faults, pid)
    assert failed["status"] == "failed" and "lost 3 times" in failed["error"]
    status = httpx.get(f"{api}/v1/predictions/status/{pid}", headers={"apikey": key}).json()
    assert status["status"] == "failed" and status["error"] == failed["error"]


def test_a_redis_stall_leaks_no_in_flight_slot(faults: PrivateStack, api: str) -> None:
    """Redis frozen for 8 s (SIGSTOP) during submits: those answered 503 may still take their slots when it
    resumes. The API gives back what it could not prove it kept, and the sweeper sets any counter that still
    disagrees to the tenant's rows within one pass."""
    tenant_id, create = tenants.create_tenant(f"stall-{time.time_ns()}")
    issued, issue = tenants.issue_key(tenant_id)
    with faults.engine.begin() as conn:
        conn.execute(create)
        conn.execute(issue)
    broker = redis.Redis.from_url(faults.settings.redis_url)
    counter = quota.in_flight_key(faults.settings.queue_name, tenant_id)

    def in_flight_rows() -> int:
        with faults.engine.connect() as conn:
            query = select(func.count()).where(
                predictions.c.tenant_id == tenant_id, predictions.c.status.in_([Status.CREATED, Status.PROCESSING])
            )
            return int(conn.execute(query).scalar_one())

    redis_pid = int(broker.info("server")["process_id"])
    answers: list[httpx.Response] = []
    submitters = [
        threading.Thread(target=lambda i=i: answers.append(submit(api, issued.key, {"prompt": f"stall {i}"})))
        for i in range(6)
    ]
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        for thread in submitters:
            thread.start()
        time.sleep(8)
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    for thread in submitters:
        thread.join(60)
    assert sorted({a.status_code for a in answers}) == [503] and len(answers) == 6
    assert in_flight_rows() == 0  # a 503 stored nothing

    worker = faults.worker("after-stall")  # its sweeper reconciles every 0.5 s
    try:
        deadline = time.monotonic() + 10
        while int(broker.get(counter) or 0) != in_flight_rows():
            assert time.monotonic() < deadline, f"counter {broker.get(counter)!r}, rows {in_flight_rows()}"
            time.sleep(0.1)
        broker.incrby(counter, 6)  # drift the API could not have undone (e.g. a crash between the two)
        time.sleep(faults.settings.sweep_interval_s * 3)  # a pass, and the lock's turn
        assert int(broker.get(counter) or 0) == in_flight_rows() == 0
        assert submit(api, issued.key, {"prompt": "after the stall"}, sync=True).json()["status"] == "succeeded"
    finally:
        worker.stop()
