"""The official `replicate` client from PyPI, pointed at our server over TLS with only its base URL changed (its
file outputs are `https:` links it reads with its own HTTP client); the same routes by hand where the client
hides what goes over the wire."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.prediction import Prediction
from standardwebhooks import Webhook

from core.tenants import IssuedKey
from models.klein import size_for_aspect_ratio, size_for_ratio
from models.registry import MODELS
from ops.embedded import start_webhook_worker
from tests.conftest import Stack, make_tenant
from tests.e2e.conftest import TlsApi
from tests.e2e.test_events import WEBHOOK_ENV
from tests.images import picture
from tests.receiver import Receiver

MODEL = "black-forest-labs/flux-2-klein-4b"
SMALL = {"output_megapixels": "0.25"}  # 512×512 at 1:1: quick on the CPU worker


def client_for(api: TlsApi, key: str, transport: httpx.HTTPTransport) -> replicate.Client:
    """The client as any user makes it, but for trusting the test CA (a real deployment has a real certificate)."""
    return replicate.Client(api_token=key, base_url=api.url, transport=transport)


@pytest.fixture
def client(tls_api: TlsApi, tenant: IssuedKey) -> Iterator[replicate.Client]:
    with httpx.HTTPTransport(verify=tls_api.ca) as transport:  # its connections closed after the test
        yield client_for(tls_api, tenant.key, transport)


@pytest.fixture
def http(tls_api: TlsApi, tenant: IssuedKey) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    with httpx.Client(base_url=tls_api.url, headers=headers, verify=tls_api.ca, timeout=180) as http:
        yield http


def image_of(content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(content))


def test_run_gives_files_that_read_as_the_requested_format_and_size(client: replicate.Client, tls_api: TlsApi) -> None:
    input = {"prompt": "a red fox in snow", "aspect_ratio": "3:2", "output_format": "png", "num_outputs": 2}
    # disable_safety_checker is refused unless the tenant may turn the checker off: tests/e2e/test_safety.py
    outputs = client.run(MODEL, input=input | SMALL | {"go_fast": True, "disable_safety_checker": False})
    assert isinstance(outputs, list) and len(outputs) == 2
    for output in outputs:
        assert isinstance(output, FileOutput) and output.url.startswith("https://")
        image = image_of(output.read())
        assert image.format == "PNG" and image.size == size_for_aspect_ratio("3:2", 0.25)
        assert httpx.get(output.url, verify=tls_api.ca).content == output.read(), "a signed link: no key needed"

    # By version (POST /v1/predictions), editing a file the client sends as a data URI.
    version = client.models.get(MODEL).latest_version
    assert version is not None
    edit = {"prompt": "make it night", "input_images": [io.BytesIO(picture(768, 512))], "output_format": "webp"}
    edit |= {"aspect_ratio": "match_input_image"} | SMALL
    (webp,) = client.run(f"{MODEL}:{version.id}", input=edit, file_encoding_strategy="base64")
    image = image_of(webp.read())
    assert image.format == "WEBP" and image.size == size_for_ratio(768 / 512, 0.25)


def test_create_wait_reload_and_cancel(client: replicate.Client, tenant: IssuedKey) -> None:
    prediction = client.predictions.create(model=MODEL, input={"prompt": "a harbour at dawn", "seed": 3} | SMALL)
    assert prediction.status in ("starting", "processing") and prediction.output is None
    prediction.wait()
    assert prediction.status == "succeeded", prediction.error
    assert prediction.model == MODEL and prediction.input is not None and prediction.input["seed"] == 3
    (url,) = prediction.output
    assert url.startswith("https://") and prediction.metrics and prediction.metrics["predict_time"] > 0
    assert prediction.logs and "Using seed: 3\nqueued" in prediction.logs and prediction.completed_at is not None
    before = prediction.dict()
    prediction.reload()
    assert prediction.dict() | {"output": None} == before | {"output": None}  # only the links are signed afresh

    # A long one, by version (POST /v1/predictions), canceled while it waits or runs.
    slow = client.predictions.create(prediction.version, input={"prompt": "slow", "num_inference_steps": 50} | SMALL)
    slow.cancel()
    assert slow.status == "canceled" and slow.output is None and slow.completed_at is not None
    assert client.predictions.get(slow.id).status == "canceled"


def test_the_list_pages_every_prediction_of_either_dialect(
    stack: Stack, client: replicate.Client, http: httpx.Client, tenant: IssuedKey
) -> None:
    ids = [client.predictions.create(model=MODEL, input={"prompt": f"list {i}"} | SMALL).id for i in range(3)]
    pruna = httpx.post(
        f"{stack.api_url}/v1/predictions",
        headers={"apikey": tenant.key, "Model": "flux-klein-4b"},
        json={"input": {"prompt": "made by pruna-client's way"}},
    )
    assert pruna.status_code == 201, pruna.text
    ids.append(pruna.json()["id"])

    newest_first = ids[::-1]
    first = client.predictions.list("/v1/predictions?limit=2")  # the client follows `next` as given
    assert [p.id for p in first] == newest_first[:2] and first.previous is None and first.next is not None
    second = client.predictions.list(first.next)
    assert [p.id for p in second] == newest_first[2:] and second.next is None
    assert [p.id for p in client.predictions.list(second.previous)] == newest_first[:2]
    made_by_pruna = first.results[0]
    assert isinstance(made_by_pruna, Prediction) and made_by_pruna.model == MODEL and made_by_pruna.version
    everything = [p.id for page in replicate.pagination.paginate(client.predictions.list) for p in page]
    assert everything == newest_first

    playground = httpx.get(f"{stack.api_url}/v1/predictions", headers={"apikey": tenant.key}, params={"limit": 2})
    assert not playground.json()["next"].startswith("http"), "the playground's cursor, for ?cursor="
    assert "outputs" in playground.json()["results"][0]["urls"]
    for prediction_id in ids:  # spare the worker: Replicate's shape for Pruna's prediction too
        assert client.predictions.cancel(prediction_id).id == prediction_id


def test_a_webhook_set_through_the_client_arrives_signed(
    stack: Stack, client: replicate.Client, tls_api: TlsApi
) -> None:
    worker = start_webhook_worker(stack.env | WEBHOOK_ENV, stack.logs / "replicate-webhooks.log", "replicate-hooks")
    receiver = Receiver().start()
    try:
        created = client.predictions.create(
            model=MODEL,
            input={"prompt": "a kite"} | SMALL,
            webhook=receiver.url,
            webhook_events_filter=["completed"],
        )
        (got,) = receiver.wait_for(1)
    finally:
        receiver.stop()
        worker.stop()
    secret = client.webhooks.default.secret()
    payload: dict[str, Any] = Webhook(secret.key).verify(got.body, got.headers)
    client.webhooks.validate(headers=got.headers, body=got.body.decode(), secret=secret)  # raises if not signed
    prediction = Prediction(**payload)  # the client's own model of it
    assert prediction.id == created.id and prediction.status == "succeeded"
    (url,) = prediction.output or []
    assert image_of(httpx.get(url, verify=tls_api.ca).content).format == "JPEG"


def test_models_show_their_version_and_input_schema(client: replicate.Client) -> None:
    for spec in MODELS:
        name = next(name for name in spec.names if "/" in name)
        model = client.models.get(name)
        assert (model.owner, model.name) == tuple(name.split("/")) and model.latest_version is not None
        schema = model.latest_version.openapi_schema["components"]["schemas"]
        inputs = schema["Input"]["properties"]
        assert {"prompt", "aspect_ratio", "seed", "num_outputs", "output_format", "input_images"} <= set(inputs)
        assert inputs["num_inference_steps"]["default"] == spec.default_steps, "the model's own default"
        assert schema["Output"]["items"]["format"] == "uri"
        assert model.versions.get(model.latest_version.id).id == model.latest_version.id
    with pytest.raises(ReplicateError) as unknown:
        client.models.get("black-forest-labs/flux-pro")
    assert unknown.value.status == 404 and "flux-pro" in str(unknown.value.detail)


def test_errors_are_problem_details_the_client_raises(
    stack: Stack, tls_api: TlsApi, client: replicate.Client, http: httpx.Client
) -> None:
    with httpx.HTTPTransport(verify=tls_api.ca) as transport, pytest.raises(ReplicateError) as wrong:
        client_for(tls_api, "kl_" + "x" * 43, transport).run(MODEL, input={"prompt": "x"})
    assert wrong.value.status == 401 and wrong.value.title == "Unauthenticated"

    for unsupported, field in (({"megapixels": "1"}, "input.megapixels"), ({"num_outputs": 5}, "input.num_outputs")):
        with pytest.raises(ReplicateError) as refused:
            client.run(MODEL, input={"prompt": "x"} | unsupported)
        assert refused.value.status == 422 and field in str(refused.value.detail), refused.value.detail

    waited = http.post(f"/v1/models/{MODEL}/predictions", headers={"Prefer": "wait=61"}, json={"input": {}})
    body = waited.json()
    assert waited.status_code == 422 and waited.headers["content-type"] == "application/problem+json"
    assert body["title"] == "Input validation failed" and "Prefer" in body["detail"] and body["status"] == 422

    both = http.post("/v1/predictions", json={"version": "nope", "input": {"prompt": "x"}})
    assert both.status_code == 422 and "version" in both.json()["detail"], "a body with `version` is Replicate's"
    missing = http.post(f"/v1/models/{MODEL}/predictions", json={"input": {"seed": "1"}})
    assert {f["field"] for f in missing.json()["invalid_fields"]} == {"input.prompt", "input.seed"}
    references = {"prompt": "x", "images": ["https://a.example/x.png"], "input_images": ["https://a.example/y.png"]}
    both_names = http.post(f"/v1/models/{MODEL}/predictions", json={"input": references})
    assert both_names.status_code == 422 and "input_images" in both_names.json()["detail"]

    throttled = make_tenant(stack.engine, rate_limit_per_minute=1)
    with httpx.Client(
        base_url=tls_api.url, verify=tls_api.ca, headers={"Authorization": f"Bearer {throttled.key}"}
    ) as h:
        assert h.get("/v1/webhooks/default/secret").status_code == 200
        limited = h.post(f"/v1/models/{MODEL}/predictions", json={"input": {"prompt": "x"}})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["title"] == "Request was throttled"


def test_a_version_body_is_replicates_and_a_model_header_pruna_s_on_the_same_path(
    stack: Stack, client: replicate.Client, tenant: IssuedKey
) -> None:
    version = client.models.get(MODEL).latest_version
    assert version is not None
    url, bearer = f"{stack.api_url}/v1/predictions", {"Authorization": f"Bearer {tenant.key}"}
    replicates = httpx.post(url, headers=bearer | {"Prefer": "wait"}, json={"version": version.id, "input": SMALL})
    assert replicates.status_code == 422 and "input.prompt" in replicates.json()["detail"]
    body = {"version": f"{MODEL}:{version.id}", "input": {"prompt": "x"} | SMALL}
    finished = httpx.post(url, headers=bearer | {"Prefer": "wait"}, json=body, timeout=180)
    assert finished.status_code == 201 and finished.json()["status"] == "succeeded", finished.text
    assert Prediction(**finished.json()).version == version.id
    prunas = httpx.post(url, headers=bearer | {"Model": "flux-klein-4b"}, json={"input": {"prompt": "x"}})
    assert prunas.status_code == 201 and "get_url" in prunas.json() and "version" not in prunas.json()
    client.predictions.cancel(prunas.json()["id"])
