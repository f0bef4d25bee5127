"""Several API processes as one platform: what one replica leaves behind when it dies, another picks up."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select, update

from core import lifecycle
from core.ids import new_id
from core.tables import predictions
from core.tenants import IssuedKey
from ops.embedded import start_api, wait_until
from tests.conftest import Stack
from tests.images import data_uri, picture


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: storage stalled mid-request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_replica_killed_between_reserving_a_key_and_storing_its_prediction_does_not_hold_the_key(
    stack: Stack, tenant: IssuedKey, black_hole: str, tmp_path: Path
) -> None:
    # A replica whose storage stalls while it stores a reference image: it has reserved the key, nothing more.
    doomed, doomed_url = start_api(
        stack.env | {"KLEIN_S3_ENDPOINT_URL": black_hole, "KLEIN_IDEMPOTENCY_LEASE_S": "2"},
        tmp_path / "doomed.log",
        ready_path="/healthz",
    )
    headers = {"apikey": tenant.key, "Model": "flux-klein-4b", "Idempotency-Key": "order-7"}
    body = {"input": {"prompt": "a kite", "images": [data_uri(picture())], "seed": 5}}

    def submit_to_the_doomed() -> None:
        with contextlib.suppress(httpx.HTTPError):  # it is killed mid-request
            httpx.post(f"{doomed_url}/v1/predictions", headers=headers, json=body, timeout=60)

    hanging = threading.Thread(target=submit_to_the_doomed, daemon=True)
    broker = redis.Redis.from_url(stack.env["KLEIN_REDIS_URL"])
    digest = hashlib.sha256(b"order-7").hexdigest()
    reservation = f"{stack.env['KLEIN_QUEUE_NAME']}:{{{tenant.tenant_id}}}:idempotency:{digest}"
    try:
        hanging.start()
        wait_until(lambda: broker.exists(reservation) == 1, 60, "the key reserved by the doomed replica")
        time.sleep(3)  # longer than the lease: the live holder renews it (lease / 3)
        assert broker.exists(reservation) == 1, "a live holder keeps its lease"
        assert doomed.process is not None
        doomed.process.kill()  # SIGKILL mid-request: no cleanup runs
    finally:
        doomed.stop()

    # The retry, on the other replica, creates the prediction once the lease lapses (not 24 h of 409s).
    started = time.monotonic()
    retry = httpx.post(f"{stack.api_url}/v1/predictions", headers=headers, json=body, timeout=60)
    assert retry.status_code == 201, retry.text
    assert time.monotonic() - started < 2 + 5
    again = httpx.post(f"{stack.api_url}/v1/predictions", headers=headers, json=body, timeout=60)
    assert again.json()["id"] == retry.json()["id"]  # and from then on the key names it
    assert broker.ttl(reservation) > 3600
    with stack.engine.connect() as conn:
        count = select(func.count()).select_from(predictions).where(predictions.c.tenant_id == tenant.tenant_id)
        assert conn.execute(count).scalar_one() == 1


def test_a_poller_through_two_replicas_never_sees_its_queue_position_go_back(
    stack: Stack, tenant: IssuedKey, tmp_path: Path
) -> None:
    other, other_url = start_api(stack.env, tmp_path / "second-replica.log")
    ids = [new_id() for _ in range(8)]
    params = {"prompt": "q", "width": 256, "height": 256, "num_inference_steps": 4, "guidance_scale": 1.0}
    for prediction_id in ids:  # stored (one transaction each: one created_at each), not enqueued: no worker takes them
        with stack.engine.begin() as conn:
            conn.execute(
                lifecycle.create(
                    prediction_id=prediction_id,
                    tenant_id=tenant.tenant_id,
                    api_key_id=tenant.key_id,
                    model="flux-klein-4b",
                    input={"prompt": "q"},
                    params=params | {"seed": 1, "output_format": "png", "output_quality": 80},
                )
            )
    last = ids[-1]
    seen: list[int] = []
    try:
        with httpx.Client(headers={"apikey": tenant.key}, timeout=30) as http:
            replicas = [stack.api_url, other_url]
            for ahead in ids[:-1]:  # those ahead leave one by one while the client polls through both replicas
                with stack.engine.begin() as conn:
                    conn.execute(update(predictions).where(predictions.c.id == ahead).values(status="canceled"))
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    url = replicas[len(seen) % 2]
                    seen.append(http.get(f"{url}/v1/predictions/status/{last}").json()["queue_position"])
    finally:
        other.stop()
        with stack.engine.begin() as conn:
            conn.execute(update(predictions).where(predictions.c.id.in_(ids)).values(status="canceled"))
    backwards = [(a, b) for a, b in itertools.pairwise(seen) if b > a]
    assert backwards == [], f"{len(backwards)} of {len(seen)} reads went back: {backwards[:5]}"
    assert seen[-1] < seen[0]  # it did move forward
