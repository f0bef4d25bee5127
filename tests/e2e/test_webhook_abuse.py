"""Webhooks against receivers that never finish answering and tenants that rotate their secret again and again,
on the real stack with real webhook workers: an attempt ends by its deadline, a delivery is never being sent
twice at once, one tenant's slow receivers leave another tenant's delivery prompt, and a delivery carries two
signatures at most."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update
from standardwebhooks import Webhook, WebhookVerificationError

from core.tables import webhook_deliveries
from core.tenants import IssuedKey
from ops.embedded import start_webhook_worker
from tests.conftest import Stack, make_tenant
from tests.receiver import Receiver, Trickler

INPUT = {"prompt": "a lighthouse on a cliff at dusk", "aspect_ratio": "1:1", "num_inference_steps": 4}
WEBHOOK_ENV = {
    "KLEIN_WEBHOOK_TIMEOUT_S": "2",
    "KLEIN_WEBHOOK_RETRY_BASE_S": "0.4",
    "KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1",
}


@contextmanager
def webhook_worker(stack: Stack, name: str, **env: str) -> Iterator[None]:
    worker = start_webhook_worker(stack.env | WEBHOOK_ENV | env, stack.logs / f"{name}.log", name)
    try:
        yield
    finally:
        worker.stop()


@pytest.fixture
def settle(engine: Engine) -> Iterator[list[str]]:
    """Tenants whose unfinished deliveries are marked failed after the test, so that no later webhook worker
    spends its threads retrying them."""
    tenant_ids: list[str] = []
    yield tenant_ids
    with engine.begin() as conn:
        conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.tenant_id.in_(tenant_ids), webhook_deliveries.c.status.in_(["pending", "sending"])
            )
            .values(status="failed", lease_expires_at=None)
        )


def submit_and_cancel(client: httpx.Client, webhook: str) -> dict[str, Any]:
    """A prediction ended at once (its `completed` event is due now, whatever the GPU worker's pace)."""
    body = {"input": INPUT, "webhook": webhook}
    answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body)
    assert answer.status_code == 201, answer.text
    canceled = client.post(f"/v1/predictions/{answer.json()['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    return answer.json()


def deliveries(client: httpx.Client, **filters: str) -> list[dict[str, Any]]:
    answer = client.get("/v1/webhooks/deliveries", params=filters)
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


def wait_for_deliveries(client: httpx.Client, count: int, final: bool = False, timeout_s: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = deliveries(client)
        if len(found) >= count and (not final or all(d["status"] in ("delivered", "failed", "gone") for d in found)):
            return found
        time.sleep(0.1)
    raise AssertionError(f"not {count} {'final ' if final else ''}deliveries after {timeout_s} s: {found}")


def test_an_attempt_ends_by_its_deadline_and_is_never_in_flight_twice(
    stack: Stack, client: httpx.Client, tenant: IssuedKey, settle: list[str]
) -> None:
    """The first attempt's status line trickles in, the second's body does: each is cut at the 2 s deadline
    (httpx's timeout alone, per read, never fires), and the lease (longer) never lets a second attempt start
    while one is open."""
    settle.append(tenant.tenant_id)
    trickler = Trickler(slow=lambda n: "head" if n == 0 else "body", for_s=12).start()
    try:
        with webhook_worker(stack, "webhooks-deadline"):
            submit_and_cancel(client, trickler.url)
            connections = trickler.wait_ended(2, timeout_s=25)
            for connection in connections:
                lasted = (connection.closed or 0) - connection.opened
                assert connection.hung_up and lasted < 3.0, ("cut at the deadline", lasted, connections)
            assert trickler.most_open_at_once() == 1, connections
            (final,) = wait_for_deliveries(client, 1, final=True, timeout_s=10)
    finally:
        trickler.stop()
    first, second = final["attempts"][:2]
    assert first["status_code"] is None and first["error"] == "no answer within 2 s", first
    assert second["status_code"] == 200 and second["response_head"].startswith("x"), second
    assert all(attempt["latency_ms"] < 2600 for attempt in (first, second)), final["attempts"]
    assert final["status"] == "delivered", "the status came before the deadline cut the body short"


def test_one_tenants_slow_receivers_leave_another_tenants_webhook_prompt(
    stack: Stack, engine: Engine, client: httpx.Client, tenant: IssuedKey, settle: list[str]
) -> None:
    """Four sender threads, two a tenant: eight receivers of one tenant that each hold an attempt for its
    whole 8 s deadline take two threads, and another tenant's webhook is sent at once."""
    other = make_tenant(engine)
    settle.extend([tenant.tenant_id, other.tenant_id])
    trickler = Trickler(for_s=20).start()
    fast = Receiver().start()
    limits = {
        "KLEIN_WEBHOOK_TIMEOUT_S": "8",
        "KLEIN_WEBHOOK_CONCURRENCY": "4",
        "KLEIN_WEBHOOK_TENANT_CONCURRENCY": "2",
    }
    try:
        with (
            webhook_worker(stack, "webhooks-fair", **limits),
            httpx.Client(base_url=stack.api_url, headers={"apikey": other.key}, timeout=60) as http,
        ):
            for _ in range(8):
                submit_and_cancel(client, trickler.url)
            wait_for_deliveries(client, 8)
            prediction = submit_and_cancel(http, fast.url)
            fast.wait_for(1, timeout_s=30)
            (delivered,) = wait_for_deliveries(http, 1, final=True, timeout_s=10)
            slow_ones = deliveries(client)
    finally:
        trickler.stop()
        fast.stop()
    assert delivered["prediction_id"] == prediction["id"] and delivered["status"] == "delivered"
    waited = _at(delivered["attempts"][0]["at"]) - _at(delivered["created_at"])
    assert waited.total_seconds() < 3.0, f"the other tenant's webhook waited {waited} for a thread"
    assert trickler.most_open_at_once() <= 2, ("one tenant's share of the threads", trickler.connections)
    for delivery in slow_ones:
        assert trickler.most_open_at_once(delivery["id"]) <= 1


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_many_rotations_sign_with_the_current_and_the_previous_secret_only(
    stack: Stack, client: httpx.Client, tenant: IssuedKey, settle: list[str]
) -> None:
    settle.append(tenant.tenant_id)
    keys = [client.get("/v1/webhooks/default/secret").json()["key"]]
    for _ in range(12):
        rotated = client.post("/v1/webhooks/default/secret/rotate")
        assert rotated.status_code == 200, rotated.text
        keys.append(rotated.json()["key"])
    shown = client.get("/v1/webhooks/default/secret").json()
    assert shown["key"] == keys[-1] and shown["previous_key"] == keys[-2]
    receiver = Receiver().start()
    try:
        with webhook_worker(stack, "webhooks-rotated"):
            submit_and_cancel(client, receiver.url)
            (got,) = receiver.wait_for(1)
    finally:
        receiver.stop()
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(keys[-1]).verify(got.body, got.headers)  # raises unless signed by it
    Webhook(keys[-2]).verify(got.body, got.headers)
    for retired in keys[:-2]:
        with pytest.raises(WebhookVerificationError):
            Webhook(retired).verify(got.body, got.headers)
