"""The result cache on the real stack (docs/cache.md): an identical request with a seed is answered from the
tenant's earlier prediction's stored outputs, at once and without the GPU worker; what is not cached; deleting
and expiring the original; billing at the cache price; the webhook of an answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from standardwebhooks import Webhook

from core import result_cache, retention
from core.storage import make_s3_client
from core.tables import predictions, usage_records
from core.tenants import IssuedKey
from ops.embedded import Service, start_webhook_worker
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.images import data_uri, picture
from tests.receiver import Receiver

INPUT: dict[str, Any] = {
    "prompt": "a lighthouse on a cliff at dusk",
    "seed": 4242,
    "aspect_ratio": "1:1",
    "output_format": "png",
    "num_inference_steps": 1,
}
PRUNA = {"Model": "flux-klein-4b", "Try-Sync": "true"}


def run(client: httpx.Client, input: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = client.post("/v1/predictions", headers=PRUNA | (headers or {}), json={"input": input})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["status"] == "succeeded", body
    return body


def worker_completed(stack: Stack) -> float:
    """The session worker's count of predictions it completed (its own /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{stack.env['KLEIN_WORKER_METRICS_PORT']}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "klein_worker_predictions_total" and sample.labels.get("outcome") == "completed"
    )


def admin(stack: Stack, tenant: IssuedKey, **settings: Any) -> dict[str, Any]:
    answer = httpx.patch(
        f"{stack.api_url}/admin/v1/tenants/{tenant.tenant_id}", headers={"X-Admin-Key": ADMIN_KEY}, json=settings
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def billed(stack: Stack, prediction_id: str) -> tuple[Decimal, Decimal]:
    with stack.engine.connect() as conn:
        row = conn.execute(
            select(usage_records.c.price_per_image, usage_records.c.amount).where(
                usage_records.c.prediction_id == prediction_id
            )
        ).one()
    return row.price_per_image, row.amount


def test_an_identical_request_is_answered_from_the_cache_without_the_worker_and_billed_at_the_cache_price(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    shown = admin(stack, tenant, price_per_image=0.5, cache_price_per_image=0.01)
    assert shown["cache_price_per_image"] == 0.01 and shown["result_cache"] is None
    started = time.perf_counter()
    first = run(client, INPUT)
    generated_s = time.perf_counter() - started
    assert "cached" not in first and "cached" not in first["timings"]
    completed_before = worker_completed(stack)

    started = time.perf_counter()
    second = run(client, INPUT)
    cached_s = time.perf_counter() - started
    assert second["id"] != first["id"] and second["cached"] is True and second["cached_from"] == first["id"]
    assert second["timings"]["cached"] is True and second["timings"]["inference_ms"] == 0
    assert second["seed"] == first["seed"] and second["input"] == first["input"]
    assert cached_s < generated_s, (cached_s, generated_s)
    original_png, cached_png = (client.get(body["generation_url"]).content for body in (first, second))
    assert cached_png == original_png and cached_png[:4] == b"\x89PNG"
    assert client.get(second["get_url"]).json() == second, "the status endpoint shows what the answer showed"
    assert any("answered from the result cache" in line["message"] for line in second["logs"])
    with connect_sse(client, "GET", f"/v1/predictions/{second['id']}/stream") as stream:  # the playground follows it
        events = [(event.event, event.json()) for event in stream.iter_sse()]
    assert [name for name, _ in events][-2:] == ["output", "done"] and events[-1][1] == second, events

    # Without Try-Sync too: completed in the submit's answer, never queued.
    queued = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json={"input": INPUT})
    assert queued.status_code == 200 and queued.json()["status"] == "succeeded" and queued.json()["cached"] is True
    assert worker_completed(stack) == completed_before, "the GPU worker ran none of them"
    with stack.engine.connect() as conn:
        ran_by = conn.execute(select(predictions.c.worker_id).where(predictions.c.id == second["id"])).scalar_one()
    assert ran_by == result_cache.WORKER
    assert billed(stack, first["id"]) == (Decimal("0.5"), Decimal("0.5"))
    assert billed(stack, second["id"]) == (Decimal("0.01"), Decimal("0.01"))
    total = client.get("/v1/usage").json()["total"]
    assert total["predictions"] == 3 and total["amount"] == pytest.approx(0.52), total  # 0.5 + 2 × 0.01


def test_what_is_not_answered_from_the_cache(stack: Stack, tenant: IssuedKey, client: httpx.Client) -> None:
    first = run(client, INPUT)
    assert run(client, INPUT)["cached_from"] == first["id"]
    different = [
        INPUT | {"seed": 4243},  # another seed
        INPUT | {"seed": -1},  # a random seed: never cached
        INPUT | {"seed": -1},
        INPUT | {"output_format": "jpg"},  # another format
        INPUT | {"prompt": INPUT["prompt"] + "."},  # another prompt
        INPUT | {"cache": False},  # the client opts out in our inputs
    ]
    for input in different:
        assert "cached" not in run(client, input), input
    assert "cached" not in run(client, INPUT, {"X-Result-Cache": "off"}), "the header opts out in every dialect"
    # Quality means nothing to PNG, guidance nothing to the distilled model: the same output, answered.
    assert run(client, INPUT | {"output_quality": 10, "guidance": 3.0})["cached_from"] == first["id"]

    other = make_tenant(stack.engine)  # never another tenant's outputs
    with httpx.Client(base_url=stack.api_url, headers={"apikey": other.key}, timeout=180) as stranger:
        assert "cached" not in run(stranger, INPUT)

    assert admin(stack, tenant, result_cache=False)["result_cache"] is False  # the operator opts the tenant out
    assert "cached" not in run(client, INPUT)
    admin(stack, tenant, result_cache=None)
    assert run(client, INPUT)["cached"] is True


def test_references_count_by_content_whatever_way_they_came(stack: Stack, client: httpx.Client) -> None:
    image = picture()
    edit = {"prompt": "make it blue", "seed": 7, "output_format": "png", "aspect_ratio": "1:1"}
    first = run(client, edit | {"images": [data_uri(image)]})
    upload = client.post("/v1/files", files={"content": ("ref.png", image, "image/png")}).json()
    assert run(client, edit | {"images": [upload["url"]]})["cached_from"] == first["id"], "same bytes, as an upload"
    assert "cached" not in run(client, edit | {"images": [data_uri(picture(color=(10, 200, 30)))]})


def test_deleting_or_expiring_the_original_ends_its_answers_and_deleting_an_answer_keeps_the_original(
    stack: Stack, tenant: IssuedKey, client: httpx.Client
) -> None:
    original = run(client, INPUT)
    answer = run(client, INPUT)
    assert client.delete(f"/v1/predictions/{answer['id']}").status_code == 204
    assert client.get(answer["generation_url"]).status_code == 410
    assert client.get(original["generation_url"]).status_code == 200, "the answer's delete keeps the original's"

    later = run(client, INPUT)
    assert later["cached_from"] == original["id"]
    assert client.delete(f"/v1/predictions/{original['id']}").status_code == 204
    assert client.get(later["generation_url"]).status_code == 410, "never served after the original was deleted"
    assert "expired_at" in client.get(later["get_url"]).json()
    regenerated = run(client, INPUT)
    assert "cached" not in regenerated, "a deleted original answers nothing"

    # Past the original's retention (the reaper not yet by): not answered; the reaper expires its answers with it.
    answered = run(client, INPUT)
    assert answered["cached_from"] == regenerated["id"]
    with stack.engine.begin() as conn:
        conn.execute(
            update(predictions)
            .where(predictions.c.id == regenerated["id"])
            .values(completed_at=func.now() - timedelta(days=8))  # the default retention is 7 days
        )
    assert "cached" not in run(client, INPUT)
    s3 = make_s3_client(stack.settings)
    deadline = time.monotonic() + 60
    while client.get(answered["get_url"]).json().get("expired_at") is None:
        assert time.monotonic() < deadline, "the reaper did not expire the answer with its original"
        retention.reap(stack.settings, stack.engine, s3)
    assert client.get(answered["generation_url"]).status_code == 410


@pytest.fixture(scope="module")
def webhook_worker(stack: Stack) -> Iterator[Service]:
    env = stack.env | {"KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.1"}
    worker = start_webhook_worker(env, stack.logs / "cache-webhooks.log", "cache-webhooks")
    yield worker
    worker.stop()


def test_an_answer_sends_its_webhook_events_as_a_run_does(client: httpx.Client, webhook_worker: Service) -> None:
    receiver = Receiver().start()
    try:
        run(client, INPUT)
        events = ["start", "output", "completed"]
        body = {"input": INPUT, "webhook": receiver.url, "webhook_events_filter": events}
        answer = client.post("/v1/predictions", headers={"Model": "flux-klein-4b"}, json=body).json()
        assert answer["cached"] is True
        got = receiver.wait_for(3)
        secret = client.get("/v1/webhooks/default/secret").json()["key"]
        payloads = sorted((Webhook(secret).verify(r.body, r.headers) for r in got), key=lambda p: p["status"])
        assert [p["status"] for p in payloads] == ["processing", "succeeded", "succeeded"]
        assert payloads[-1] == client.get(answer["get_url"]).json(), "the completed payload is the status view"
    finally:
        receiver.stop()
