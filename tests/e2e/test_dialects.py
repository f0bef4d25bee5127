"""Every provider dialect end to end on the real stack, with the official clients where they exist."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import wavespeed
from PIL import Image
from pruna_client import PrunaClient
from pruna_client.models import PredictionStatus

from core.tenants import IssuedKey
from models.klein import NAMED_SIZES, size_for_aspect_ratio, size_for_ratio
from ops.embedded import start_api
from tests.conftest import Stack, make_tenant
from tests.images import data_uri, image_server, picture

PREDICT = {"Model": "flux-klein-4b", "Try-Sync": "true"}


@pytest.fixture(scope="module")
def images_url(stack: Stack) -> Iterator[str]:
    with image_server(redirect_target=f"{stack.api_url}/healthz") as url:
        yield url


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def predict(client: httpx.Client, input: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/predictions", headers=PREDICT, json={"input": input})


# --- Pruna: edits, multi-reference, uploads ---------------------------------------------------------


def test_pruna_client_image_edit_uploads_then_edits(stack: Stack, tenant: IssuedKey) -> None:
    with PrunaClient(api_key=tenant.key, timeout=180) as client:
        client.base_url = f"{stack.api_url}/v1"
        reference = Image.open(io.BytesIO(picture(512, 256)))
        response = client.generate_image_edit("flux-klein-4b", "make it blue", [reference], seed=11)
        assert response.status == PredictionStatus.SUCCEEDED, response.response
        assert response.response["input"]["images"][0].startswith(f"{stack.api_url}/v1/files/")
        output = client.download_content(response.response["generation_url"])
    assert size_of(output) == size_for_ratio(2.0)  # an edit keeps the reference's aspect ratio


def test_multi_reference_from_data_uris_is_reproducible(client: httpx.Client) -> None:
    refs = [data_uri(picture(color=(10, 200, 30))), data_uri(picture(fmt="WEBP"), "image/webp")]
    input = {"prompt": "combine them", "images": refs, "seed": 3, "output_format": "png", "aspect_ratio": "1:1"}
    first, second = (predict(client, input).json() for _ in range(2))
    assert first["status"] == second["status"] == "succeeded", first
    first_png, second_png = (client.get(body["generation_url"]).content for body in (first, second))
    assert first_png == second_png
    text_only = predict(client, input | {"images": []}).json()
    assert client.get(text_only["generation_url"]).content != first_png  # the references matter


def test_files_upload_download_and_own_url_resolution(stack: Stack, client: httpx.Client) -> None:
    png = picture(256, 256)
    uploaded = client.post("/v1/files", files={"content": ("ref.png", png, "image/png")})
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert body["url"] == f"{stack.api_url}/v1/files/{body['id']}" and body["urls"]["get"] == body["url"]
    assert (body["width"], body["height"], body["content_type"]) == (256, 256, "image/png")
    assert client.get(body["url"]).content == png
    # 127.0.0.1 is not allowlisted for fetching: this only works because our own file URL is read from storage.
    assert predict(client, {"prompt": "edit", "images": [body["url"]]}).json()["status"] == "succeeded"

    other = make_tenant(stack.engine)
    with httpx.Client(base_url=stack.api_url, headers={"apikey": other.key}) as intruder:
        assert intruder.get(body["url"]).status_code == 404
        stolen = predict(intruder, {"prompt": "edit", "images": [body["url"]]})
        assert stolen.status_code == 422 and "input.images[0]" in stolen.json()["error"]
    bad = client.post("/v1/files", files={"content": ("x.png", b"GIF89a....", "image/png")})
    assert bad.status_code == 422 and "PNG, JPEG or WebP" in bad.json()["error"]
    assert client.post("/v1/files", files={"other": ("x.png", png, "image/png")}).status_code == 422


def test_reference_urls_are_fetched_from_allowed_hosts(client: httpx.Client, images_url: str) -> None:
    body = predict(client, {"prompt": "edit", "images": [f"{images_url}/wide.jpg"]}).json()
    assert body["status"] == "succeeded"
    assert size_of(client.get(body["generation_url"]).content) == size_for_ratio(2.0)
    redirected = predict(client, {"prompt": "edit", "images": [f"{images_url}/to-ref"]})
    assert redirected.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/x.png", "non-public address"),  # loopback
        ("http://localhost:9/x.png", "non-public address"),
        ("http://169.254.169.254/latest/meta-data/", "non-public address"),  # cloud metadata
        ("http://10.1.2.3/x.png", "non-public address"),
        ("http://[::1]:9/x.png", "non-public address"),
        ("http://[::ffff:127.0.0.1]:9/x.png", "non-public address"),
        ("http://100.64.0.1/x.png", "non-public address"),  # carrier-grade NAT
        ("file:///etc/passwd", "http(s) URL"),
        ("ftp://example.com/x.png", "http(s) URL"),
        ("{images}/to-loopback", "non-public address"),  # a redirect into our network
        ("{images}/text.png", "PNG, JPEG or WebP"),
        ("{images}/bomb.png", "pixels"),
        ("{images}/huge.png", "larger than"),
        ("{images}/missing.png", "HTTP 404"),
        ("{images}/slow.png", "longer than"),
        ("data:image/png;base64,!!!", "base64"),
        ("data:text/plain,hello", "base64"),
    ],
)
def test_bad_reference_urls_are_422(client: httpx.Client, images_url: str, url: str, reason: str) -> None:
    answer = predict(client, {"prompt": "edit", "images": [url.format(images=images_url)]})
    assert answer.status_code == 422, answer.text
    assert "input.images[0]" in answer.json()["error"] and reason in answer.json()["error"]


def test_more_than_four_references_is_422(client: httpx.Client) -> None:
    answer = predict(client, {"prompt": "x", "images": [data_uri(picture())] * 5})
    assert answer.status_code == 422 and "input.images" in answer.json()["error"]


# --- Klein generate: POST /v1/generate ------------------------------------------------------------


def test_klein_generate_text_edit_and_multi_reference(stack: Stack, tenant: IssuedKey, images_url: str) -> None:
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=180) as http:
        text = http.post("/v1/generate", json={"prompt": "a robot"})
        assert text.status_code == 200 and text.headers["content-type"] == "image/png"
        assert size_of(text.content) == NAMED_SIZES["landscape"]

        files = [("images", ("a.png", picture(), "image/png"))]
        # Uploaded files take priority: the broken image_uris are never looked at.
        form = {"prompt": "edit it", "aspect_ratio": "square", "image_uris": '["http://10.0.0.1/x.png"]'}
        edit = http.post("/v1/generate", data=form, files=files)
        assert edit.status_code == 200, edit.text
        assert size_of(edit.content) == (1024, 1024)

        uris = [f"{images_url}/ref.png", data_uri(picture(color=(0, 0, 255)))]
        multi = http.post("/v1/generate", json={"prompt": "mix", "image_uris": uris, "aspect_ratio": "wide"})
        assert multi.status_code == 200 and size_of(multi.content) == NAMED_SIZES["wide"]

        five = http.post("/v1/generate", data={"prompt": "x"}, files=files * 5)
        assert five.status_code == 422 and "at most 4" in five.json()["detail"]
        ratio = http.post("/v1/generate", json={"prompt": "x", "aspect_ratio": "16:9"})
        assert ratio.status_code == 422 and "aspect_ratio" in ratio.json()["detail"]
        assert http.post("/v1/generate", json={"prompt": "x", "model": "flux-dev"}).status_code == 422
    denied = httpx.post(f"{stack.api_url}/v1/generate", json={"prompt": "x"})
    assert denied.status_code == 401 and "API key" in denied.json()["detail"]


# --- WaveSpeed v3 -----------------------------------------------------------------------------------


def test_wavespeed_client_run_async_and_sync(stack: Stack, tenant: IssuedKey) -> None:
    client = wavespeed.Client(api_key=tenant.key, base_url=stack.api_url, max_retries=0)
    model = "wavespeed-ai/flux-2-klein-4b/text-to-image"
    for sync in (False, True):
        result = client.run(model, {"prompt": "a cat", "size": "512*768"}, enable_sync_mode=sync, poll_interval=0.1)
        (url,) = result["outputs"]
        image = httpx.get(url)  # the SDK hands plain URLs to the caller: signed, no key needed
        assert image.status_code == 200 and size_of(image.content) == (512, 768)
        assert httpx.get(url.replace("signature=", "signature=0")).status_code == 403


def test_wavespeed_envelope_base64_edit_and_errors(stack: Stack, tenant: IssuedKey, images_url: str) -> None:
    http = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=180)
    url = "/api/v3/wavespeed-ai/flux-2-klein-4b"
    queued = http.post(f"{url}/text-to-image", json={"prompt": "x", "seed": 5})
    assert queued.status_code == 200
    envelope = queued.json()
    assert (envelope["code"], envelope["message"]) == (200, "success")
    data = envelope["data"]
    assert data["status"] in ("created", "processing") and data["outputs"] == []
    assert data["urls"]["get"] == f"{stack.api_url}/api/v3/predictions/{data['id']}/result"
    assert data["created_at"].endswith("Z") and data["model"] == "wavespeed-ai/flux-2-klein-4b/text-to-image"

    inline = http.post(
        f"{url}/edit",
        json={
            "prompt": "x",
            "images": [f"{images_url}/ref.png"],
            "enable_sync_mode": True,
            "enable_base64_output": True,
        },
    ).json()["data"]
    assert inline["status"] == "completed" and inline["has_nsfw_contents"] == [None] and inline["error"] == ""
    assert inline["timings"]["inference"] > 0
    header, _, payload = inline["outputs"][0].partition(",")
    assert header == "data:image/jpeg;base64" and size_of(base64.b64decode(payload)) == (1024, 1024)
    result = http.get(f"/api/v3/predictions/{inline['id']}/result").json()["data"]
    assert result["outputs"][0].startswith("data:image/jpeg;base64,")

    bad_size = http.post(f"{url}/text-to-image", json={"prompt": "x", "size": "100*100"})
    assert bad_size.status_code == 422
    assert bad_size.json()["code"] == 422 and "size" in bad_size.json()["message"] and bad_size.json()["data"] is None
    assert http.post(f"{url}/edit", json={"prompt": "x"}).json()["code"] == 422
    assert http.post("/api/v3/wavespeed-ai/flux-pro/text-to-image", json={"prompt": "x"}).json()["code"] == 404
    assert http.get("/api/v3/predictions/nope/result").json()["code"] == 404
    assert httpx.get(f"{stack.api_url}/api/v3/predictions/nope/result").json()["code"] == 401


def test_wavespeed_takes_width_and_height_as_its_model_pages_list_them(stack: Stack, tenant: IssuedKey) -> None:
    """WaveSpeed's pages list `width` and `height`, its API table `size: "W*H"`: both are taken, on every
    endpoint (the LoRA one here); a 422 in its envelope only when they disagree or one side comes alone."""
    http = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=60)
    url = "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image-lora"
    made = http.post(url, json={"prompt": "x", "width": 512, "height": 768, "enable_sync_mode": True})
    assert made.status_code == 200, made.text
    data = made.json()["data"]
    assert data["status"] == "completed" and size_of(httpx.get(data["outputs"][0]).content) == (512, 768)
    agreeing = http.post(url, json={"prompt": "x", "size": "512*768", "width": 512, "height": 768})
    assert agreeing.status_code == 200 and agreeing.json()["data"]["status"] in ("created", "processing", "completed")
    stored = len(http.get("/v1/predictions").json()["results"])
    for body, says in (
        ({"size": "1024*1024", "width": 512, "height": 768}, "disagree"),
        ({"width": 512}, "width and height: give both"),
        ({"height": 512}, "width and height: give both"),
        ({"width": 100, "height": 512}, "width"),
    ):
        refused = http.post(url, json={"prompt": "x"} | body)
        assert refused.status_code == 422, (body, refused.text)
        envelope = refused.json()
        assert envelope["code"] == 422 and envelope["data"] is None and says in envelope["message"], envelope
    assert len(http.get("/v1/predictions").json()["results"]) == stored  # nothing stored for a refused one


# --- 1min features ----------------------------------------------------------------------------------


def test_features_image_generator(stack: Stack, tenant: IssuedKey) -> None:
    prompt_object = {"prompt": "a lake", "aspect_ratio": "1:1", "megapixels": "0.25", "output_quality": 0}
    body = {"type": "IMAGE_GENERATOR", "model": "black-forest-labs/flux-2-klein-4b", "promptObject": prompt_object}
    answer = httpx.post(f"{stack.api_url}/api/features", headers={"API-KEY": tenant.key}, json=body, timeout=180)
    assert answer.status_code == 200, answer.text
    record = answer.json()["aiRecord"]
    assert record["status"] == "SUCCESS" and record["type"] == "IMAGE_GENERATOR"
    assert record["aiRecordDetail"]["promptObject"]["go_fast"] is True
    assert record["aiRecordDetail"]["resultObject"][0].endswith("/output.webp")
    image = httpx.get(record["temporaryUrl"])  # signed: no key needed
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert size_of(image.content) == size_for_aspect_ratio("1:1", 0.25) == (512, 512)
    tampered = record["temporaryUrl"].replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403

    for bad in ({"num_inference_steps": 5}, {"megapixels": "2"}, {"aspect_ratio": "21:9"}):
        wrong = httpx.post(
            f"{stack.api_url}/api/features",
            headers={"API-KEY": tenant.key},
            json=body | {"promptObject": prompt_object | bad},
        )
        assert wrong.status_code == 422 and f"promptObject.{next(iter(bad))}" in wrong.json()["error"]
    assert (
        httpx.post(
            f"{stack.api_url}/api/features", headers={"API-KEY": tenant.key}, json=body | {"type": "CHAT"}
        ).status_code
        == 422
    )


# --- OpenAI images ----------------------------------------------------------------------------------


def test_openai_client_url_and_b64_json(stack: Stack, tenant: IssuedKey) -> None:
    client = openai.OpenAI(api_key=tenant.key, base_url=f"{stack.api_url}/v1", max_retries=0)
    inline = client.images.generate(
        model="flux-2-klein-4b", prompt="a fox", size="512x512", n=2, response_format="b64_json"
    )
    assert inline.data is not None and len(inline.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in inline.data]
    assert all(size_of(image) == (512, 512) for image in images) and images[0] != images[1]

    linked = client.images.generate(
        model="flux-2-klein-4b",
        prompt="a fox",
        extra_body={"width": 768, "height": 512, "seed": 5, "num_inference_steps": 2, "format": "png"},
    )
    assert linked.data is not None and linked.data[0].url is not None
    image = httpx.get(linked.data[0].url)  # a signed link: no key needed
    assert image.headers["content-type"] == "image/png" and size_of(image.content) == (768, 512)
    assert client.models.retrieve("flux-2-klein-4b").id == "flux-klein-4b"

    usage = httpx.get(f"{stack.api_url}/v1/usage", headers={"apikey": tenant.key}).json()
    assert usage["total"]["images"] == 3 and usage["total"]["predictions"] == 2


def test_openai_reference_images_and_errors(stack: Stack, tenant: IssuedKey, images_url: str) -> None:
    http = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=180)
    edited = http.post(
        "/v1/images/generations",
        json={"prompt": "x", "images": f"{images_url}/ref.png,{images_url}/wide.jpg", "negative_prompt": "blur"},
    )
    assert edited.status_code == 200, edited.text
    for bad, param in (
        ({"size": "4096x4096"}, None),
        ({"width": 2048, "height": 1024}, None),  # over 1,048,576 pixels
        ({"width": 512}, None),
        ({"num_inference_steps": 13}, "num_inference_steps"),
        ({"guidance_scale": 9}, "guidance_scale"),
        ({"n": 5}, "n"),
        ({"max_sequence_length": 32}, "max_sequence_length"),
        ({"response_format": "svg"}, "response_format"),
    ):
        answer = http.post("/v1/images/generations", json={"prompt": "x"} | bad)
        assert answer.status_code == 422, (bad, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    denied = openai.OpenAI(api_key="kl_wrong", base_url=f"{stack.api_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        denied.images.generate(prompt="x")


def test_synchronous_dialects_answer_504_past_the_time_limit(stack: Stack, tenant: IssuedKey) -> None:
    api, url = start_api(stack.env | {"KLEIN_TRY_SYNC_TIMEOUT_S": "0"}, stack.logs / "api-504.log")
    try:
        bearer = {"Authorization": f"Bearer {tenant.key}"}
        klein = httpx.post(f"{url}/v1/generate", headers=bearer, json={"prompt": "x"})
        assert klein.status_code == 504 and "time limit" in klein.json()["detail"]
        images = httpx.post(f"{url}/v1/images/generations", headers=bearer, json={"prompt": "x"})
        assert images.status_code == 504 and images.json()["error"]["type"] == "server_error"
    finally:
        api.stop()


def test_an_unknown_model_is_answered_as_each_provider_documents_it(stack: Stack, tenant: IssuedKey) -> None:
    """404 where the request addresses the model as a resource (Pruna's `Model` header, WaveSpeed's path, OpenAI's
    `model_not_found`, the catalogue); 422 naming the field where the provider lists the model among the body's
    parameters (Klein generate, 1min)."""
    bearer, url = {"Authorization": f"Bearer {tenant.key}"}, stack.api_url
    pruna = httpx.post(
        f"{url}/v1/predictions", headers={"apikey": tenant.key, "Model": "flux-pro"}, json={"input": {"prompt": "x"}}
    )
    assert pruna.status_code == 404 and "flux-klein-4b" in pruna.json()["known_models"]
    wavespeed = httpx.post(f"{url}/api/v3/wavespeed-ai/flux-pro/text-to-image", headers=bearer, json={"prompt": "x"})
    assert wavespeed.status_code == 404 and wavespeed.json()["code"] == 404
    openai = httpx.post(f"{url}/v1/images/generations", headers=bearer, json={"prompt": "x", "model": "flux-pro"})
    assert openai.status_code == 404 and openai.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{url}/v1/models/flux-pro").status_code == 404
    klein = httpx.post(f"{url}/v1/generate", headers=bearer, json={"prompt": "x", "model": "flux-pro"})
    assert klein.status_code == 422 and klein.json()["detail"].startswith("invalid request: model: unknown model")
    features = httpx.post(
        f"{url}/api/features",
        headers={"API-KEY": tenant.key},
        json={"type": "IMAGE_GENERATOR", "model": "flux-pro", "promptObject": {"prompt": "x"}},
    )
    assert features.status_code == 422 and "model: unknown model" in features.json()["error"]
