"""Webhooks against tenants that rotate their secret again and again, on the real stack with real webhook
workers: a delivery carries two signatures at most."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update
from standardwebhooks import Webhook, WebhookVerificationError

from core.tables import webhook_deliveries
from core.tenants import IssuedKey
from ops.embedded import start_webhook_worker
from tests.conftest import Stack
from tests.receiver import Receiver

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
