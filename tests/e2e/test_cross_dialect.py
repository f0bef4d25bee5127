"""Every dialect's read routes answer for every prediction of the tenant, whichever dialect made it.

A prediction made through one provider's API and read through another's (a WaveSpeed result for a Pruna
prediction: `KeyError: 'model'`, 500) must come back 200 in the reader's own shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import connect_sse

from core.tenants import IssuedKey
from tests.conftest import Stack

SMALL = {"prompt": "a red cube", "seed": 7}
Maker = Callable[[httpx.Client], str]  # makes a prediction, answers its id


def _pruna(http: httpx.Client) -> str:
    headers = {"Model": "flux-klein-4b", "Try-Sync": "true"}
    return str(
        http.post("/v1/predictions", headers=headers, json={"input": SMALL | {"aspect_ratio": "1:1"}}).json()["id"]
    )


def _replicate(http: httpx.Client) -> str:
    answer = http.post(
        "/v1/models/black-forest-labs/flux-2-klein-4b/predictions", headers={"Prefer": "wait"}, json={"input": SMALL}
    )
    return str(answer.json()["id"])


def _wavespeed(http: httpx.Client) -> str:
    body = SMALL | {"size": "256*256", "enable_sync_mode": True}
    return str(http.post("/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image", json=body).json()["data"]["id"])


def _openai(http: httpx.Client) -> str:
    return str(http.post("/v1/images/generations", json=SMALL | {"size": "256x256"}).json()["id"])


def _oneminute(http: httpx.Client) -> str:
    prompt = {"prompt": SMALL["prompt"], "megapixels": "0.25"}
    body = {"type": "IMAGE_GENERATOR", "model": "flux-2-klein-4b", "promptObject": prompt}
    return str(http.post("/api/features", json=body).json()["aiRecord"]["uuid"])


def _generate(http: httpx.Client) -> str:
    return http.post("/v1/generate", json=SMALL | {"aspect_ratio": "square"}).headers["X-Prediction-Id"]


def _fal(http: httpx.Client) -> str:
    answer = http.post("/fal-ai/flux-2/klein/4b", json=SMALL | {"image_size": {"width": 256, "height": 256}}).json()
    with connect_sse(http, "GET", urlsplit(answer["status_url"]).path + "/stream") as sse:
        for _ in sse.iter_sse():  # until COMPLETED: the stream ends there
            pass
    return str(answer["request_id"])


def _bfl(http: httpx.Client) -> str:
    answer = http.post("/v1/flux-2-klein-4b", json=SMALL | {"width": 256, "height": 256}).json()
    while http.get(answer["polling_url"]).json()["status"] == "Pending":  # BFL's clients poll
        pass
    return str(answer["id"])


MAKERS: dict[str, Maker] = {
    "pruna": _pruna,
    "replicate": _replicate,
    "wavespeed": _wavespeed,
    "openai": _openai,
    "1min": _oneminute,
    "generate": _generate,
    "fal": _fal,
    "bfl": _bfl,
}


def _read(base_url: str, key: str, reader: str, prediction_id: str) -> tuple[httpx.Response, dict[str, Any] | None]:
    """The reader's answer, and the prediction object in it (None where there is none). Pruna's callers send
    `apikey`, Replicate's and WaveSpeed's `Authorization: Bearer` (which also picks Replicate's list shape)."""
    headers = {"apikey": key} if reader.startswith("pruna") else {"Authorization": f"Bearer {key}"}
    headers = {"x-key": key} if reader.startswith("bfl") else headers
    path = {
        "pruna status": f"/v1/predictions/status/{prediction_id}",
        "replicate get": f"/v1/predictions/{prediction_id}",
        "wavespeed result": f"/api/v3/predictions/{prediction_id}/result",
        "fal status": f"/fal-ai/flux-2/requests/{prediction_id}/status",
        "bfl get_result": f"/v1/get_result?id={prediction_id}",
    }.get(reader, "/v1/predictions")
    answer = httpx.get(base_url + path, headers=headers, timeout=30)
    if answer.status_code != 200:
        return answer, None
    body = answer.json()
    if reader == "wavespeed result":
        return answer, body["data"]
    if reader == "fal status":  # fal's status object has `request_id`, and its app in the URLs, not a model
        app = urlsplit(body["response_url"]).path.partition("/requests/")[0]
        return answer, {"id": body["request_id"], "status": body["status"], "model": app}
    if reader == "bfl get_result":  # BFL's result names no model: its sample link stands in
        return answer, {"id": body["id"], "status": body["status"], "model": (body["result"] or {}).get("sample")}
    if reader.endswith("list"):
        return answer, next((p for p in body["results"] if p["id"] == prediction_id), None)
    return answer, body


FINISHED = {
    "pruna status": "succeeded",
    "replicate get": "succeeded",
    "wavespeed result": "completed",
    "pruna list": "succeeded",
    "replicate list": "succeeded",
    "fal status": "COMPLETED",
    "bfl get_result": "Ready",
}


def test_every_dialect_reads_predictions_made_through_every_other(stack: Stack, tenant: IssuedKey) -> None:
    with httpx.Client(base_url=stack.api_url, headers={"apikey": tenant.key}, timeout=60) as http:
        made = {maker: make(http) for maker, make in MAKERS.items()}
        wrong = []
        for maker, prediction_id in made.items():
            for reader, finished in FINISHED.items():
                answer, prediction = _read(stack.api_url, tenant.key, reader, prediction_id)
                sane = (
                    prediction is not None
                    and prediction["id"] == prediction_id
                    and prediction["status"] == finished
                    and isinstance(prediction.get("model"), str)
                )
                if answer.status_code != 200 or not sane:
                    wrong.append(
                        f"made through {maker}, read through {reader}: {answer.status_code} {answer.text[:200]}"
                    )
    assert wrong == []
