"""The official `fal-client` from PyPI, pointed at our server over TLS with only `FAL_QUEUE_RUN_HOST` (and the
key) changed: fal's queue API (submit, status with logs, result, cancel, subscribe) and its errors."""

from __future__ import annotations

import base64
import io
import itertools
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from httpx_sse import connect_sse
from PIL import Image
from sqlalchemy import select, update
from standardwebhooks import Webhook

from core import lifecycle
from core.ids import new_id
from core.quota import LOWEST_PRIORITY, queue_priority
from core.tables import predictions
from core.tenants import IssuedKey
from ops.embedded import start_webhook_worker
from tests.conftest import Stack
from tests.e2e.conftest import TlsApi
from tests.e2e.test_events import WEBHOOK_ENV
from tests.images import picture
from tests.receiver import Receiver

APP = "fal-ai/flux-2/klein/4b"
SMALL = {"image_size": "square", "num_inference_steps": 2}  # 512×512: quick on the CPU worker


@pytest.fixture(scope="module")
def fal(tls_api: TlsApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """`fal_client` as a user sets it up for a self-hosted server: FAL_QUEUE_RUN_HOST and FAL_RUN_HOST (read when it
    is imported), and the test CA trusted through SSL_CERT_FILE (a real deployment has a real certificate)."""
    host = urlsplit(tls_api.url).netloc
    ca_file = tmp_path_factory.mktemp("fal-ca") / "ca.pem"
    ca_file.write_text("".join(ssl.DER_cert_to_PEM_cert(der) for der in tls_api.ca.get_ca_certs(binary_form=True)))
    saved = {name: os.environ.get(name) for name in ("FAL_QUEUE_RUN_HOST", "FAL_RUN_HOST", "SSL_CERT_FILE")}
    os.environ |= {"FAL_QUEUE_RUN_HOST": host, "FAL_RUN_HOST": f"{host}/fal-run", "SSL_CERT_FILE": str(ca_file)}
    import fal_client

    queue_url = fal_client.client.QUEUE_URL_FORMAT
    assert queue_url == f"https://{host}/", "fal_client was imported before the host was set"
    try:
        yield fal_client
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture
def client(fal: ModuleType, tenant: IssuedKey) -> Any:
    return fal.SyncClient(key=tenant.key)


@pytest.fixture
def http(tls_api: TlsApi, tenant: IssuedKey) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Key {tenant.key}"}
    with httpx.Client(base_url=tls_api.url, headers=headers, verify=tls_api.ca, timeout=120) as http:
        yield http


def test_subscribe_with_logs_sees_the_queue_and_gives_fals_result(
    fal: ModuleType, tenant: IssuedKey, tls_api: TlsApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", tenant.key)  # the module-level client reads it, as users set it
    updates: list[Any] = []
    input = {"prompt": "a red fox in snow", "num_images": 2, "seed": 7, "output_format": "jpeg"} | SMALL
    result = fal.subscribe(APP, arguments=input, with_logs=True, on_queue_update=updates.append)

    kinds = [type(update) for update in updates]
    assert kinds[-1] is fal.Completed and kinds.count(fal.Completed) == 1
    order = {fal.Queued: 0, fal.InProgress: 1, fal.Completed: 2}
    assert [order[kind] for kind in kinds] == sorted(order[kind] for kind in kinds)
    assert all(u.position >= 0 for u in updates if isinstance(u, fal.Queued))
    messages = [entry["message"] for entry in updates[-1].logs]
    assert messages[0] == "queued" and len(messages) > 1, messages
    assert updates[-1].error is None and updates[-1].metrics["inference_time"] > 0

    assert result["seed"] == 7 and result["prompt"] == input["prompt"] and result["timings"]["inference"] > 0
    assert len(result["images"]) == 2 and len(result["has_nsfw_concepts"]) == 2
    for image in result["images"]:
        assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/jpeg")
        decoded = Image.open(io.BytesIO(httpx.get(image["url"], verify=tls_api.ca).content))  # a signed link
        assert decoded.format == "JPEG" and decoded.size == (512, 512)


def test_an_edit_submitted_polled_and_fetched_with_sync_mode(client: Any, fal: ModuleType) -> None:
    reference = "data:image/png;base64," + base64.b64encode(picture(768, 512)).decode()
    input = {"prompt": "make it night", "image_urls": [reference], "sync_mode": True, "output_format": "webp"}
    handle = client.submit(f"{APP}/edit", arguments=input | {"num_inference_steps": 2})
    assert handle.status_url.endswith(f"/fal-ai/flux-2/requests/{handle.request_id}/status")
    for _ in handle.iter_events(with_logs=True):
        pass
    assert isinstance(client.status(APP, handle.request_id, with_logs=True), fal.Completed)

    result = client.result(APP, handle.request_id)
    (image,) = result["images"]
    header, _, data = image["url"].partition(",")
    assert header == "data:image/webp;base64"
    decoded = Image.open(io.BytesIO(base64.b64decode(data)))
    # no image_size: the input image's ratio at about a megapixel, as fal does
    assert decoded.format == "WEBP" and decoded.size == (image["width"], image["height"])
    assert image["width"] > image["height"]


def test_queued_running_and_canceled_as_fal_reports_them(
    stack: Stack, client: Any, fal: ModuleType, tenant: IssuedKey
) -> None:
    request_id = new_id()
    params = {"prompt": "a lake", "width": 256, "height": 256, "num_inference_steps": 4, "guidance_scale": 1.0}
    with stack.engine.begin() as conn:  # stored, not enqueued: it waits for the test's reads
        conn.execute(
            lifecycle.create(
                prediction_id=request_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input={"prompt": "a lake", "app_id": APP},
                params=params | {"seed": 1, "output_format": "png", "output_quality": 90},
            )
        )
    queued = client.status(APP, request_id, with_logs=True)
    assert isinstance(queued, fal.Queued) and queued.position >= 0

    with stack.engine.begin() as conn:
        conn.execute(update(predictions).where(predictions.c.id == request_id).values(status="processing"))
    running = client.status(APP, request_id, with_logs=True)
    assert isinstance(running, fal.InProgress) and running.logs[0]["message"] == "queued"
    assert client.status(APP, request_id).logs is None  # logs only when asked for

    client.cancel(APP, request_id)
    canceled = client.status(APP, request_id)
    assert isinstance(canceled, fal.Completed) and canceled.error
    with pytest.raises(fal.FalClientHTTPError) as again:
        client.cancel(APP, request_id)
    assert again.value.status_code == 400 and again.value.response.json() == {"status": "ALREADY_COMPLETED"}
    with pytest.raises(fal.FalClientHTTPError) as result:
        client.result(APP, request_id)
    assert result.value.status_code == 500 and "canceled" in result.value.message


def test_wrong_key_unknown_input_and_unknown_app_are_fals_errors(
    fal: ModuleType, client: Any, http: httpx.Client, stack: Stack, tenant: IssuedKey
) -> None:
    with pytest.raises(fal.FalClientHTTPError) as wrong:
        fal.SyncClient(key="not-a-key").submit(APP, arguments={"prompt": "a lake"})
    assert wrong.value.status_code == 401 and "API key" in wrong.value.message

    with pytest.raises(fal.FalClientHTTPError) as unknown:
        client.submit(APP, arguments={"prompt": "a lake", "negative_prompt": "fog"})
    assert unknown.value.status_code == 422
    (field,) = unknown.value.response.json()["detail"]
    assert field["loc"] == ["body", "negative_prompt"] and field["type"] == "extra_forbidden"

    answers = {
        "unknown app": http.post("/fal-ai/flux-2/klein/9b", json={"prompt": "a lake"}),
        "edit without images": http.post(f"/{APP}/edit", json={"prompt": "a lake"}),
        "checker off": http.post(f"/{APP}", json={"prompt": "a lake", "enable_safety_checker": False}),
        "bad size": http.post(f"/{APP}", json={"prompt": "a lake", "image_size": "huge"}),
        "unknown request": http.get(f"/fal-ai/flux-2/requests/{new_id()}/status"),
    }
    statuses = {name: (answer.status_code, answer.json()["detail"]) for name, answer in answers.items()}
    assert statuses["unknown app"][0] == 404 and "flux-2/klein/9b" in statuses["unknown app"][1]
    assert statuses["edit without images"][0] == 422 and "image_urls" in statuses["edit without images"][1]
    assert statuses["checker off"][0] == 422 and "enable_safety_checker" in statuses["checker off"][1]
    assert statuses["bad size"][0] == 422 and statuses["bad size"][1][0]["loc"][:2] == ["body", "image_size"]
    assert statuses["unknown request"][0] == 404
    with stack.engine.begin() as conn:  # nothing stored for a refused request
        stored = conn.execute(predictions.select().where(predictions.c.tenant_id == tenant.tenant_id)).all()
    assert stored == []


def test_the_status_stream_sends_each_change_until_completed(client: Any, http: httpx.Client) -> None:
    handle = client.submit(APP, arguments={"prompt": "a lighthouse", "seed": 3} | SMALL)
    path = urlsplit(handle.status_url).path + "/stream"
    with connect_sse(http, "GET", path, params={"logs": 1}) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        shown = [orjson.loads(event.data) for event in source.iter_sse() if event.data]
    words = [view["status"] for view in shown]
    assert words[-1] == "COMPLETED" and words.count("COMPLETED") == 1, words
    assert words == sorted(words, key=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].index)
    assert all(view["request_id"] == handle.request_id for view in shown)
    first_log, *later_logs = shown[-1]["logs"]
    assert first_log["message"] == "queued" and later_logs
    assert all(a != b for a, b in itertools.pairwise(shown)), "only changes are sent"


def test_fal_webhook_delivers_fals_payload_signed(stack: Stack, client: Any, http: httpx.Client) -> None:
    worker = start_webhook_worker(stack.env | WEBHOOK_ENV, stack.logs / "fal-webhooks.log", "fal-hooks")
    receiver = Receiver().start()
    try:
        handle = client.submit(APP, arguments={"prompt": "a kite"} | SMALL, webhook_url=receiver.url)
        (got,) = receiver.wait_for(1)
    finally:
        receiver.stop()
        worker.stop()
    secret = http.get("/v1/webhooks/default/secret").json()["key"]
    payload: dict[str, Any] = Webhook(secret).verify(got.body, got.headers)
    assert payload["request_id"] == handle.request_id and payload["status"] == "OK"
    (image,) = payload["payload"]["images"]
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
    assert payload["payload"] == client.result(APP, handle.request_id) | {"images": payload["payload"]["images"]}


def test_queue_priority_low_goes_behind_the_tenants_queue(
    stack: Stack, client: Any, http: httpx.Client, tenant: IssuedKey
) -> None:
    normal = client.submit(APP, arguments={"prompt": "a dune"} | SMALL, priority="normal")
    low = client.submit(APP, arguments={"prompt": "a dune"} | SMALL, priority="low")
    ids = (normal.request_id, low.request_id)
    with stack.engine.begin() as conn:
        query = select(predictions.c.id, predictions.c.priority).where(predictions.c.id.in_(ids))
        stored = dict(conn.execute(query).tuples().all())
    # normal: as the tenant's backlog gives it (nothing in flight: first, core/quota.py); low: the lowest of all
    assert (stored[normal.request_id], stored[low.request_id]) == (queue_priority(0), LOWEST_PRIORITY)
    wrong = http.post(f"/{APP}", json={"prompt": "a dune"}, headers={"X-Fal-Queue-Priority": "urgent"})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["header", "x-fal-queue-priority"]
    for handle in (low, normal):  # done before the next test's tenant queues
        handle.get()


def test_run_waits_on_fals_synchronous_host_and_answers_the_result(
    fal: ModuleType, client: Any, tmp_path: Path, tls_api: TlsApi
) -> None:
    """`run` (FAL_RUN_HOST=<host>/fal-run): one request, the result back; a file goes as a data URI
    (`fal_client.encode_file`), the workaround for `upload_file`, which uploads to fal's own storage."""
    result = client.run(APP, arguments={"prompt": "a red fox in snow", "seed": 11, "num_images": 2} | SMALL)
    assert result["seed"] == 11 and len(result["images"]) == 2
    image = httpx.get(result["images"][0]["url"], verify=tls_api.ca)
    assert Image.open(io.BytesIO(image.content)).size == (512, 512)

    reference = tmp_path / "photo.png"
    reference.write_bytes(picture(512, 256))
    edit = {"prompt": "make it night", "image_urls": [fal.encode_file(reference)]}
    (edited,) = client.run(f"{APP}/edit", arguments=edit | {"num_inference_steps": 2})["images"]
    assert edited["width"] > edited["height"]  # the reference's 2:1 at about a megapixel

    # upload_file's hosts are fal's own, fixed in the client (not derived from FAL_RUN_HOST): it cannot reach us
    assert (fal.client.REST_URL, fal.client.CDN_URL) == (
        "https://rest.fal.ai",
        "https://v3.fal.media",
    )


def test_run_refuses_in_fals_shape(
    fal: ModuleType, client: Any, http: httpx.Client, stack: Stack, tenant: IssuedKey
) -> None:
    with pytest.raises(fal.FalClientHTTPError) as unknown:
        client.run(APP, arguments={"prompt": "a lake", "negative_prompt": "fog"})
    assert unknown.value.status_code == 422
    assert unknown.value.response.json()["detail"][0]["loc"] == ["body", "negative_prompt"]
    late = http.post(f"/fal-run/{APP}", json={"prompt": "a lake"}, headers={"X-Fal-Request-Timeout": "soon"})
    assert late.status_code == 422 and late.json()["detail"][0]["loc"] == ["header", "X-Fal-Request-Timeout"]
    with stack.engine.begin() as conn:  # nothing stored for a refused request
        stored = conn.execute(predictions.select().where(predictions.c.tenant_id == tenant.tenant_id)).all()
    assert stored == []
