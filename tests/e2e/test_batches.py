"""Batch jobs end to end (docs/batch.md): the official `openai` client's Files and Batches calls against a stack of
its own (database, queue, API, GPU worker, webhook worker), the native `POST /v1/batches` and its webhook, the
batch class behind every interactive prediction, cancel, expiry, restarts, and the bounds."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import httpx
import openai
import pytest
import redis
from PIL import Image
from sqlalchemy import Engine, select

from core.db import make_sync_engine
from core.settings import Settings
from core.sweeper import Sweeper
from core.tables import batch_requests, predictions, usage_records
from core.tenants import IssuedKey
from ops.embedded import Service, start_api, start_webhook_worker, start_worker, wait_until
from ops.migrate import migrate
from tests.conftest import ADMIN_KEY, make_tenant
from tests.receiver import Receiver
from tests.stack import create_database, drop_database

ENV = {
    "KLEIN_BATCH_FEED_DEPTH": "2",
    "KLEIN_BATCH_MAX_LINES": "20",
    "KLEIN_BATCH_MAX_FILE_BYTES": "20000",
    "KLEIN_BATCH_MAX_IN_FLIGHT": "3",
    "KLEIN_BATCH_MIN_WINDOW_S": "1",
    "KLEIN_BATCH_URGENT_S": "0",
    "KLEIN_SWEEP_INTERVAL_S": "1",
    "KLEIN_REQUEUE_GRACE_S": "2",
    "KLEIN_LEASE_S": "3",
    "KLEIN_WORKER_METRICS_PORT": "0",
    "KLEIN_WEBHOOK_POLL_INTERVAL_S": "0.2",
}


@dataclass
class Batches:
    env: dict[str, str]
    settings: Settings
    engine: Engine
    logs: Any
    api: Service
    url: str
    worker: Service

    def start_worker(self, name: str) -> None:
        """A fresh GPU worker (its own log: readiness is read from it)."""
        self.worker = start_worker(self.env, self.logs / f"{name}.log", name)

    def restart_api(self) -> None:
        self.api, self.url = start_api(self.env, self.logs / "batch-api.log")

    def openai(self, tenant: IssuedKey) -> openai.OpenAI:
        return openai.OpenAI(api_key=tenant.key, base_url=f"{self.url}/v1", max_retries=0, timeout=60)

    def sweep(self) -> None:
        """One pass of the sweeper, as a worker's thread runs it (expiry, feeding, ends)."""
        client = redis.Redis.from_url(self.settings.redis_url)
        while Sweeper(self.settings, self.engine, client).sweep() is None:  # another sweeper held the lock
            time.sleep(0.1)


@pytest.fixture(scope="module")
def batch_stack(settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batches]:
    """A database and queue of its own, so that the session's worker (and its sweeper) never touch these."""
    run = secrets.token_hex(4)
    database = f"klein_batch_{run}"
    env = settings_env | ENV | {"KLEIN_DATABASE_URL": create_database(database), "KLEIN_QUEUE_NAME": f"batch-{run}"}
    with mock.patch.dict(os.environ, env):  # parsed as the processes parse it
        settings = Settings()
    migrate(settings.sync_database_url)
    engine = make_sync_engine(settings)
    logs = tmp_path_factory.mktemp("batch-logs")
    worker = start_worker(env, logs / "batch-worker.log", "batch-worker")
    webhooks = start_webhook_worker(env, logs / "batch-webhooks.log", "batch-webhooks")
    api, url = start_api(env, logs / "batch-api.log")
    stack = Batches(env, settings, engine, logs, api, url, worker)
    try:
        yield stack
    finally:
        for service in (stack.api, stack.worker, webhooks):
            service.stop()
        engine.dispose()
        drop_database(database)


def jsonl(*items: Any) -> bytes:
    return b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items)


def request(custom_id: str, **body: Any) -> dict[str, Any]:
    body = {"prompt": f"a lighthouse, {custom_id}", "size": "256x256", "num_inference_steps": 2} | body
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/images/generations", "body": body}


def create(client: openai.OpenAI, *lines: Any, window: str = "24h", **extra: Any) -> Any:
    uploaded = client.files.create(file=("requests.jsonl", jsonl(*lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/images/generations",
        completion_window=window,  # type: ignore[arg-type]  # the client's type knows only 24h; ours takes others
        **extra,
    )


def ended(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    final: dict[str, Any] = {}

    def done() -> bool:
        final["batch"] = client.batches.retrieve(batch_id)
        return final["batch"].status in ("completed", "cancelled", "expired", "failed")

    wait_until(done, timeout, f"batch {batch_id}")
    return final["batch"]


def counts(batch: Any) -> Any:
    assert batch.request_counts is not None
    return batch.request_counts


def lines_of(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    text = client.files.content(file_id).text
    return {line["custom_id"]: line for line in map(json.loads, text.splitlines())}


def rows_of(engine: Engine, batch_id: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(predictions).where(predictions.c.batch_id == batch_id)).all())


def test_a_batch_runs_each_line_and_a_bad_line_fails_alone(batch_stack: Batches, engine: Engine) -> None:
    tenant = make_tenant(batch_stack.engine)
    admin = {"X-Admin-Key": ADMIN_KEY}
    priced = httpx.patch(
        f"{batch_stack.url}/admin/v1/tenants/{tenant.tenant_id}", headers=admin, json={"batch_price_per_image": 0.25}
    )
    assert priced.status_code == 200 and priced.json()["batch_price_per_image"] == 0.25
    client = batch_stack.openai(tenant)
    uploaded = client.files.create(file=("in.jsonl", jsonl(request("a"))), purpose="batch")
    assert (uploaded.purpose, uploaded.object, uploaded.filename) == ("batch", "file", "in.jsonl")
    assert client.files.retrieve(uploaded.id).bytes == len(jsonl(request("a")))
    assert client.files.content(uploaded.id).content == jsonl(request("a"))
    batch = create(
        client,
        request("a"),
        request("b", response_format="b64_json", output_format="png"),
        request("c", seed=7),
        request("bad-steps", num_inference_steps=99),
        b"{not json",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress" and batch.metadata == {"job": "nightly"}
    assert batch.endpoint == "/v1/images/generations" and counts(batch).total == 5
    final = ended(client, batch.id)
    assert final.status == "completed", final
    assert (counts(final).total, counts(final).completed, counts(final).failed) == (5, 3, 2)
    assert final.completed_at is not None and final.expires_at - final.created_at == 24 * 3600

    outputs = lines_of(client, final.output_file_id)
    assert set(outputs) == {"a", "b", "c"}
    for line in outputs.values():
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["id"] == f"batch_req_{line['response']['request_id']}"
    url = outputs["a"]["response"]["body"]["data"][0]["url"]
    image = Image.open(io.BytesIO(httpx.get(url, timeout=30).content))  # a signed link: no key needed
    assert image.size == (256, 256)
    b64 = outputs["b"]["response"]["body"]["data"][0]["b64_json"]
    assert Image.open(io.BytesIO(base64.b64decode(b64))).format == "PNG"
    assert outputs["c"]["response"]["body"]["seed"] == 7

    errors = lines_of(client, final.error_file_id)
    assert set(errors) == {"bad-steps", ""}
    bad = errors["bad-steps"]["response"]
    assert bad["status_code"] == 422 and "num_inference_steps" in bad["body"]["error"]["message"]
    assert "line 5: not a JSON object" in errors[""]["response"]["body"]["error"]["message"]

    assert batch.id in [listed.id for listed in client.batches.list()]
    with batch_stack.engine.connect() as conn:
        billed = conn.execute(
            select(usage_records.c.batch, usage_records.c.amount).where(usage_records.c.tenant_id == tenant.tenant_id)
        ).all()
    assert sorted(billed) == [(True, 0.25)] * 3  # the tenant's batch price, recorded as batch work
    usage = httpx.get(f"{batch_stack.url}/v1/usage", headers={"apikey": tenant.key}).json()
    assert [(day["batch"], day["images"], day["amount"]) for day in usage["days"]] == [(True, 3, 0.75)]


def test_interactive_work_runs_before_a_queued_batch_and_cancel_and_expiry_stop_what_has_not_started(
    batch_stack: Batches,
) -> None:
    """With the GPU worker stopped: a batch is queued, then interactive predictions; started again, the worker
    runs every interactive one before any of the batch's. A cancel stops the lines that have not started, an
    expired window too; the bound on batches in progress answers 429 in OpenAI's shape."""
    tenant, other = make_tenant(batch_stack.engine), make_tenant(batch_stack.engine)
    client = batch_stack.openai(tenant)
    batch_stack.worker.stop()
    queued = create(client, *(request(f"q{i}") for i in range(5)))
    canceled = create(client, *(request(f"c{i}") for i in range(4)))
    expiring = create(client, *(request(f"e{i}") for i in range(3)), window="2s")
    with pytest.raises(openai.RateLimitError) as refused:  # the fourth batch in progress
        create(client, request("x"))
    assert "3 batches in progress" in refused.value.response.json()["error"]["message"]
    assert [listed.id for listed in client.batches.list(limit=2)] == [expiring.id, canceled.id, queued.id]  # 2 pages

    interactive = httpx.Client(base_url=batch_stack.url, headers={"apikey": other.key, "Model": "flux-klein-4b"})
    ids = [
        interactive.post("/v1/predictions", json={"input": {"prompt": f"now {i}", "aspect_ratio": "1:1"}}).json()["id"]
        for i in range(3)
    ]

    stopped = client.batches.cancel(canceled.id)  # nothing of it runs: it ends at once
    assert stopped.status == "cancelled" and stopped.cancelling_at is not None and stopped.cancelled_at is not None
    assert (counts(stopped).completed, counts(stopped).failed) == (0, 4)
    assert {line["error"]["code"] for line in lines_of(client, stopped.error_file_id).values()} == {"batch_cancelled"}
    assert stopped.output_file_id is None

    # expires_at is in whole seconds, rounded down: the stored moment is up to a second later
    wait_until(lambda: time.time() > expiring.expires_at + 1.5, 10, "the window's end")
    batch_stack.sweep()
    expired = client.batches.retrieve(expiring.id)
    assert expired.status == "expired" and expired.expired_at is not None, expired
    assert (counts(expired).completed, counts(expired).failed) == (0, 3)
    assert {line["error"]["code"] for line in lines_of(client, expired.error_file_id).values()} == {"batch_expired"}
    assert rows_of(batch_stack.engine, canceled.id) == rows_of(batch_stack.engine, expiring.id) == []  # never ran

    batch_stack.start_worker("batch-worker-after-stop")
    final = ended(client, queued.id)
    assert final.status == "completed" and counts(final).completed == 5
    with batch_stack.engine.connect() as conn:
        started = conn.execute(select(predictions.c.started_at).where(predictions.c.id.in_(ids))).scalars().all()
    batch_started = [row.started_at for row in rows_of(batch_stack.engine, queued.id)]
    assert len(started) == 3 and None not in started
    assert max(started) < min(batch_started), "an interactive prediction waited behind a batch's"


def test_native_batch_and_its_completion_webhook(batch_stack: Batches) -> None:
    tenant = make_tenant(batch_stack.engine)
    receiver = Receiver().start()
    http = httpx.Client(base_url=batch_stack.url, headers={"apikey": tenant.key, "Model": "flux-klein-4b"}, timeout=60)
    try:
        refused = http.post(
            "/v1/batches", json={"inputs": [{"prompt": "ok"}, {"prompt": "x", "num_inference_steps": 0}]}
        )
        assert refused.status_code == 422 and "inputs.1.num_inference_steps" in refused.json()["error"]
        assert http.get("/v1/batches").json()["data"] == []  # nothing stored for a refused request

        inputs = [{"prompt": "a red fox", "aspect_ratio": "1:1"}, {"prompt": "a blue fox", "seed": 11}]
        created = http.post("/v1/batches", json={"inputs": inputs, "webhook": receiver.url, "metadata": {"k": "v"}})
        assert created.status_code == 201, created.text
        batch = created.json()
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 2

        (hook,) = receiver.wait_for(1, 120)
        payload = json.loads(hook.body)
        assert payload["id"] == batch["id"] and payload["status"] == "completed"
        assert payload["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        assert hook.headers["webhook-signature"].startswith("v1,") and hook.headers["webhook-id"]
        lines = [json.loads(line) for line in http.get(payload["output_url"]).text.splitlines()]
        assert [line["custom_id"] for line in lines] == ["0", "1"]
        bodies = [line["response"]["body"] for line in lines]
        assert [body["status"] for body in bodies] == ["succeeded", "succeeded"] and bodies[1]["seed"] == 11
        assert http.get(bodies[0]["generation_url"]).status_code == 200
        assert len(receiver.received) == 1
    finally:
        receiver.stop()


def test_a_restart_of_every_process_mid_batch_loses_nothing(batch_stack: Batches) -> None:
    tenant = make_tenant(batch_stack.engine)
    client = batch_stack.openai(tenant)
    batch = create(client, *(request(f"r{i}", num_inference_steps=6) for i in range(8)))

    def some_done() -> bool:
        return bool(counts(client.batches.retrieve(batch.id)).completed >= 1)

    wait_until(some_done, 120, "the batch's first image")
    for service in (batch_stack.worker, batch_stack.api):
        assert service.process is not None
        service.process.kill()  # no drain, no goodbye
        service.process.wait()
    batch_stack.restart_api()
    batch_stack.start_worker("batch-worker-after-kill")
    client = batch_stack.openai(tenant)
    final = ended(client, batch.id, 180)
    assert final.status == "completed" and counts(final).completed == 8, final
    assert set(lines_of(client, final.output_file_id)) == {f"r{i}" for i in range(8)}
    with batch_stack.engine.connect() as conn:
        fed = conn.execute(select(batch_requests.c.prediction_id).where(batch_requests.c.batch_id == batch.id)).all()
    assert len({row.prediction_id for row in fed}) == 8  # one prediction per line, never two


def test_bounds_and_wrong_requests_answer_in_openais_error_shape(batch_stack: Batches) -> None:
    tenant = make_tenant(batch_stack.engine)
    client = batch_stack.openai(tenant)
    with pytest.raises(openai.BadRequestError) as too_many:
        client.files.create(file=("big.jsonl", jsonl(*(request(f"l{i}") for i in range(21)))), purpose="batch")
    assert "21 requests, at most 20" in too_many.value.response.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", jsonl(request("x", prompt="y" * 25_000))), purpose="batch")
    assert too_big.value.status_code == 413 and "20000 bytes" in too_big.value.response.json()["error"]["message"]
    uploaded = client.files.create(file=("in.jsonl", jsonl(request("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as endpoint:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "endpoint" in endpoint.value.response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="nope", endpoint="/v1/images/generations", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("nope")
    stranger = batch_stack.openai(make_tenant(batch_stack.engine))
    with pytest.raises(openai.NotFoundError):  # another tenant's file reads as absent
        stranger.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h")
    with batch_stack.engine.connect() as conn:
        assert conn.execute(select(predictions.c.id).where(predictions.c.tenant_id == tenant.tenant_id)).all() == []
