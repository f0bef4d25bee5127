"""End to end on the real stack: API → PostgreSQL → Celery/Redis → worker (tiny Klein) → S3 → delivery."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from core.tables import predictions
from core.tenants import IssuedKey
from tests.conftest import Stack, make_tenant

PROMPT = "A serene mountain landscape at dawn with mist rolling through the valleys"


def submit(
    client: httpx.Client, input: dict[str, Any], sync: bool = False, model: str = "flux-klein-4b"
) -> httpx.Response:
    headers = {"Model": model} | ({"Try-Sync": "true"} if sync else {})
    return client.post("/v1/predictions", headers=headers, json={"input": input})


def poll(client: httpx.Client, get_url: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(get_url).json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"prediction not finished after {timeout} s: {body}")


def test_submit_poll_deliver(stack: Stack, client: httpx.Client) -> None:
    answer = submit(client, {"prompt": PROMPT, "aspect_ratio": "16:9"})
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["model"] == "flux-klein-4b"
    assert created["input"]["prompt"] == PROMPT and created["input"]["num_inference_steps"] == 4
    assert created["status"] in ("starting", "processing")
    assert created["get_url"] == f"{stack.api_url}/v1/predictions/status/{created['id']}"

    done = poll(client, created["get_url"])
    assert done["status"] == "succeeded", done
    assert done["error"] is None
    assert 0 <= done["seed"] < 2**32
    timings = done["timings"]
    assert set(timings) == {"queue_ms", "inference_ms", "encode_ms", "upload_ms", "total_ms"}
    assert timings["total_ms"] >= timings["inference_ms"] > 0
    assert done["generation_url"].startswith(f"{stack.api_url}/v1/predictions/delivery/{created['id']}/")

    image = client.get(done["generation_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(image.content)).size == (1360, 768)


def test_try_sync_answers_with_the_finished_prediction(client: httpx.Client) -> None:
    answer = submit(client, {"prompt": PROMPT, "output_format": "png", "seed": 7}, sync=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "succeeded" and body["seed"] == 7
    assert client.get(body["get_url"]).json() == body  # the answer from the completion event is the stored row
    image = client.get(body["generation_url"])
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)


@pytest.mark.parametrize(("output_format", "content_type"), [("webp", "image/webp"), ("jpg", "image/jpeg")])
def test_output_formats(client: httpx.Client, output_format: str, content_type: str) -> None:
    body = submit(client, {"prompt": PROMPT, "aspect_ratio": "9:21", "output_format": output_format}, sync=True).json()
    image = client.get(body["generation_url"])
    assert image.headers["content-type"] == content_type
    assert Image.open(io.BytesIO(image.content)).format == {"webp": "WEBP", "jpg": "JPEG"}[output_format]


def test_same_seed_and_input_give_identical_png_bytes(client: httpx.Client) -> None:
    input = {"prompt": PROMPT, "aspect_ratio": "1:1", "seed": 1234, "output_format": "png", "cache": False}
    first, second = (submit(client, input, sync=True).json() for _ in range(2))  # both generated (docs/cache.md)
    assert first["id"] != second["id"] and "cached" not in second
    first_png, second_png = (client.get(body["generation_url"]).content for body in (first, second))
    assert first_png == second_png
    other = submit(client, input | {"seed": 1235}, sync=True).json()
    assert client.get(other["generation_url"]).content != first_png


def test_random_seed_is_recorded_and_reported(client: httpx.Client) -> None:
    seeds = {submit(client, {"prompt": PROMPT, "seed": -1}).json()["seed"] for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= seed < 2**32 for seed in seeds)


def test_try_sync_times_out_into_the_async_answer(stack: Stack, tenant: IssuedKey) -> None:
    """With a zero wait the POST answers at once with get_url; the prediction still completes."""
    from ops.embedded import start_api

    env = stack.env | {"KLEIN_TRY_SYNC_TIMEOUT_S": "0"}
    api, url = start_api(env, stack.logs / "api-nowait.log")
    try:
        with httpx.Client(base_url=url, headers={"apikey": tenant.key}, timeout=180) as http:
            answer = submit(http, {"prompt": PROMPT}, sync=True)
            assert answer.status_code == 201
            assert answer.json()["status"] in ("starting", "processing")
            assert poll(http, answer.json()["get_url"])["status"] == "succeeded"
    finally:
        api.stop()


def test_bearer_and_api_key_headers_authenticate(stack: Stack, tenant: IssuedKey) -> None:
    for headers in ({"Authorization": f"Bearer {tenant.key}"}, {"API-KEY": tenant.key}):
        answer = httpx.post(
            f"{stack.api_url}/v1/predictions",
            headers=headers | {"Model": "flux-2-klein-4b"},
            json={"input": {"prompt": PROMPT}},
        )
        assert answer.status_code == 201, answer.text


def test_model_aliases_name_the_same_model(client: httpx.Client) -> None:
    for alias in ("flux2-klein-4b", "black-forest-labs/flux-2-klein-4b", "wavespeed-ai/flux-2-klein-4b"):
        assert submit(client, {"prompt": PROMPT}, model=alias).json()["model"] == "flux-klein-4b"


def test_tenants_never_see_each_other(stack: Stack, client: httpx.Client) -> None:
    body = submit(client, {"prompt": PROMPT}, sync=True).json()
    other = make_tenant(stack.engine)
    intruder = {"apikey": other.key}
    assert httpx.get(body["get_url"], headers=intruder).status_code == 404
    assert httpx.get(body["generation_url"], headers=intruder).status_code == 404
    assert httpx.get(body["generation_url"]).status_code == 401
    assert client.get(body["generation_url"]).status_code == 200


def count_predictions(stack: Stack, tenant: IssuedKey) -> int:
    with stack.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(predictions).where(predictions.c.tenant_id == tenant.tenant_id)
        ).scalar_one()


BAD_INPUTS = [
    ({"prompt": ""}, "input.prompt"),
    ({"prompt": "   "}, "input.prompt"),
    ({}, "input.prompt"),
    ({"prompt": PROMPT, "aspect_ratio": "7:5"}, "input.aspect_ratio"),
    ({"prompt": PROMPT, "num_inference_steps": 0}, "input.num_inference_steps"),
    ({"prompt": PROMPT, "num_inference_steps": 51}, "input.num_inference_steps"),
    ({"prompt": PROMPT, "output_quality": 101}, "input.output_quality"),
    ({"prompt": PROMPT, "output_quality": 0}, "input.output_quality"),
    ({"prompt": PROMPT, "output_format": "gif"}, "input.output_format"),
    ({"prompt": PROMPT, "seed": -2}, "input.seed"),
    ({"prompt": PROMPT, "seed": "12"}, "input.seed"),
    ({"prompt": 42}, "input.prompt"),
    ({"prompt": PROMPT, "guidance": "high"}, "input.guidance"),
    ({"prompt": PROMPT, "num_steps": 4}, "input.num_steps"),
    ({"prompt": "x" * 5000}, "input.prompt"),
]


@pytest.mark.parametrize(("input", "field"), BAD_INPUTS)
def test_bad_input_is_422_naming_the_field_and_stores_nothing(
    stack: Stack, client: httpx.Client, tenant: IssuedKey, input: dict[str, Any], field: str
) -> None:
    answer = submit(client, input)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert field in body["error"]
    assert [".".join(map(str, d["loc"])) for d in body["detail"]] == [field]
    assert count_predictions(stack, tenant) == 0


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b'{"prompt": "no input wrapper"}', b'{"input": "a string"}'],
)
def test_malformed_bodies_are_422(stack: Stack, client: httpx.Client, tenant: IssuedKey, content: bytes) -> None:
    answer = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b", "Content-Type": "application/json"}, content=content
    )
    assert answer.status_code == 422, answer.text
    assert "error" in answer.json()
    assert count_predictions(stack, tenant) == 0


def test_oversized_body_is_413(stack: Stack, client: httpx.Client, tenant: IssuedKey) -> None:
    answer = submit(client, {"prompt": "x" * (stack.settings.max_body_bytes + 1)})
    assert answer.status_code == 413
    assert "larger than" in answer.json()["error"]
    assert count_predictions(stack, tenant) == 0


def test_a_chunked_body_is_counted_as_it_arrives(stack: Stack, client: httpx.Client, tenant: IssuedKey) -> None:
    def chunked(body: bytes) -> Iterator[bytes]:  # a generator: httpx sends Transfer-Encoding: chunked
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    headers = {"Model": "flux-klein-4b", "Content-Type": "application/json"}
    small = json.dumps({"input": {"prompt": PROMPT}}).encode()
    accepted = client.post("/v1/predictions", headers=headers, content=chunked(small))
    assert accepted.status_code == 201, accepted.text
    huge = json.dumps({"input": {"prompt": "x" * (stack.settings.max_body_bytes + 1)}}).encode()
    refused = client.post("/v1/predictions", headers=headers, content=chunked(huge))
    assert refused.status_code == 413 and "larger than" in refused.json()["error"]
    assert count_predictions(stack, tenant) == 1


def test_missing_unknown_and_revoked_keys_are_401(stack: Stack) -> None:
    url = f"{stack.api_url}/v1/predictions"
    for headers in ({}, {"apikey": "kl_not-a-real-key"}, {"Authorization": "Basic abc"}):
        answer = httpx.post(url, headers=headers | {"Model": "flux-klein-4b"}, json={"input": {"prompt": PROMPT}})
        assert answer.status_code == 401
        assert "API key" in answer.json()["error"]


def test_unknown_model_is_404_listing_known_ids(client: httpx.Client) -> None:
    answer = submit(client, {"prompt": PROMPT}, model="flux-pro-99")
    assert answer.status_code == 404
    assert "flux-klein-4b" in answer.json()["known_models"]
    missing = client.post("/v1/predictions", json={"input": {"prompt": PROMPT}})
    assert missing.status_code == 422 and "Model" in missing.json()["error"]


def test_unknown_prediction_is_404(client: httpx.Client) -> None:
    assert client.get("/v1/predictions/status/doesnotexist").status_code == 404
    assert client.get("/v1/predictions/delivery/doesnotexist/output.jpg").status_code == 404


def test_models_endpoint_describes_the_schema(client: httpx.Client) -> None:
    model = client.get("/v1/models/black-forest-labs/flux-2-klein-4b").json()
    assert model["id"] == "flux-klein-4b"
    properties = model["input_schema"]["properties"]
    assert properties["num_inference_steps"]["default"] == 4
    assert properties["guidance"]["default"] == 1.0
    assert "distilled" in model["notes"]
    assert model["weights"]["random_weights"] is True and "noise" in model["weights"]["warning"]
    assert client.get("/v1/models/nope").status_code == 404
