"""Black Forest Labs' API: the official `blackforest` package from PyPI (in a venv of its own: it pins its own Pillow)
with only `base_url` changed and the klein models registered in it as its registry does; and the raw HTTP shapes the
package cannot reach (its polling stops only on Ready, so BFL's Error and moderation statuses, Task not found, the
webhook)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import update

from core import lifecycle
from core.ids import new_id
from core.tables import predictions
from core.tenants import IssuedKey
from ops.embedded import ROOT, start_webhook_worker
from tests.conftest import Stack, make_tenant
from tests.e2e.test_events import WEBHOOK_ENV
from tests.images import picture
from tests.receiver import Receiver

PACKAGE = "blackforest==0.1.3"
CLIENTS = ROOT / ".venv-clients"  # official clients that cannot share the project's venv (gitignored)

# What a user adds to use the package against us (README, "Black Forest Labs"): the klein endpoints' input in the
# package's own registry, which predates FLUX.2 and refuses names it does not know.
REGISTER = """
from typing import Literal, Optional
from pydantic import BaseModel, ConfigDict
from blackforest import BFLClient


class Flux2KleinInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    input_image: Optional[str] = None
    input_image_2: Optional[str] = None
    input_image_3: Optional[str] = None
    input_image_4: Optional[str] = None
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    safety_tolerance: int = 2
    output_format: Optional[Literal["jpeg", "png", "webp"]] = "jpeg"
    webhook_url: Optional[str] = None
    webhook_secret: Optional[str] = None


BFLClient.model_input_registry = BFLClient.model_input_registry | {
    "flux-2-klein-4b": Flux2KleinInputs,
    "flux-2-klein-base-4b": Flux2KleinInputs,
}
"""

# Runs in the package's venv: each step with the package's own calls; what it saw goes to the file named by argv[2].
SCRIPT = (
    REGISTER
    + """
import base64, json, sys
import requests
from blackforest.client import BFLError
from blackforest.types.general.client_config import ClientConfig

base_url, out, key, reference = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seen = {}
client = BFLClient(api_key=key, base_url=base_url, timeout=60)
poll = ClientConfig(polling_interval=0.2, max_retries=600)

submitted = client.generate("flux-2-klein-4b", {"prompt": "a red fox in snow", "seed": 7, "width": 320,
                                                "height": 256, "output_format": "png"})
seen["submitted"] = submitted.model_dump()
result = client.get_polling_result(submitted.id, poll)
seen["result"] = result
image = requests.get(result["sample"], timeout=60)
seen["sample"] = {"status": image.status_code, "type": image.headers.get("content-type"),
                  "bytes": base64.b64encode(image.content).decode()}

edit = client.generate("flux-2-klein-4b", {"prompt": "make it night", "input_image": reference})
seen["edit"] = client.get_polling_result(edit.id, poll)
seen["edit_status"] = client.get_task_status(edit.id).model_dump()
seen["unknown"] = client.get_task_status("no-such-task").model_dump()

try:
    BFLClient(api_key="not-a-key", base_url=base_url).generate("flux-2-klein-4b", {"prompt": "a lake"})
except BFLError as exc:
    seen["wrong_key"] = str(exc)
open(out, "w").write(json.dumps(seen))
"""
)


@pytest.fixture(scope="module")
def blackforest() -> Path:
    """The package's own interpreter: a venv made once (cached under .venv-clients/) with the package from PyPI."""
    venv = CLIENTS / PACKAGE.replace("==", "-")
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PACKAGE]
        subprocess.run(pip, check=True, timeout=600)
        marker.write_text(PACKAGE)
    return python


@pytest.fixture
def http(stack: Stack, tenant: IssuedKey) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers={"x-key": tenant.key}, timeout=120) as http:
        yield http


def test_the_blackforest_package_submits_polls_downloads_and_edits(
    blackforest: Path, stack: Stack, tenant: IssuedKey, tmp_path: Path
) -> None:
    out = tmp_path / "seen.json"
    reference = base64.b64encode(picture(384, 256)).decode()  # bare base64, as BFL documents input_image
    args = [str(blackforest), "-c", SCRIPT, stack.api_url, str(out), tenant.key, reference]
    ran = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen: dict[str, Any] = json.loads(out.read_text())

    task_id = seen["submitted"]["id"]
    assert seen["submitted"]["polling_url"] == f"{stack.api_url}/v1/get_result?id={task_id}"
    result = seen["result"]
    assert result["seed"] == 7 and result["prompt"] == "a red fox in snow"
    assert result["duration"] >= 0 and result["end_time"] >= result["start_time"]
    assert seen["sample"]["status"] == 200 and seen["sample"]["type"] == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(seen["sample"]["bytes"])))
    assert image.format == "PNG" and image.size == (320, 256)

    # the edit: no size given, so the input image's ratio (3:2) at about a megapixel, as a JPEG (BFL's default)
    assert seen["edit_status"]["status"] == "Ready"
    edited = httpx.get(seen["edit"]["sample"])
    assert edited.headers["content-type"] == "image/jpeg"
    width, height = Image.open(io.BytesIO(edited.content)).size
    assert width > height and abs(width / height - 1.5) < 0.05

    assert seen["unknown"]["status"] == "Task not found"
    assert "403" in seen["wrong_key"], seen["wrong_key"]

    # billed like every dialect's, and listed with the tenant's other predictions
    usage = httpx.get(f"{stack.api_url}/v1/usage", headers={"x-key": tenant.key}).json()
    assert usage["total"]["images"] == 2 and [d["model"] for d in usage["days"]] == ["flux-klein-4b"]
    listed = httpx.get(f"{stack.api_url}/v1/predictions", headers={"x-key": tenant.key}).json()["results"]
    assert {p["id"] for p in listed} == {task_id, seen["edit_status"]["task_id"]}


def test_pending_progress_error_and_moderated_as_bfl_reports_them(
    stack: Stack, http: httpx.Client, tenant: IssuedKey
) -> None:
    task_id = new_id()
    params = {"prompt": "a lake", "width": 256, "height": 256, "num_inference_steps": 4, "guidance_scale": 1.0}
    with stack.engine.begin() as conn:  # stored, not enqueued: it waits for the test's reads
        conn.execute(
            lifecycle.create(
                prediction_id=task_id,
                tenant_id=tenant.tenant_id,
                api_key_id=tenant.key_id,
                model="flux-klein-4b",
                input={"prompt": "a lake", "model": "flux-2-klein-4b"},
                params=params | {"seed": 1, "output_format": "jpg", "output_quality": 90},
            )
        )
    pending = http.get("/v1/get_result", params={"id": task_id}).json()
    assert pending == {
        "id": task_id,
        "status": "Pending",
        "result": None,
        "progress": 0.0,
        "details": None,
        "preview": None,
    }

    values = {"status": "failed", "error": "the output was blocked by the content policy", "safety": {"blocked": True}}
    with stack.engine.begin() as conn:
        conn.execute(update(predictions).where(predictions.c.id == task_id).values(values))
    moderated = http.get("/v1/get_result", params={"id": task_id}).json()
    assert moderated["status"] == "Content Moderated" and "content policy" in moderated["error"]
    assert moderated["result"] is None and moderated["details"]

    with stack.engine.begin() as conn:
        conn.execute(update(predictions).where(predictions.c.id == task_id).values(safety=None, error="it broke"))
    failed = http.get("/v1/get_result", params={"id": task_id}).json()
    assert (failed["status"], failed["error"]) == ("Error", "it broke")

    other_key = make_tenant(stack.engine).key
    other = httpx.get(f"{stack.api_url}/v1/get_result", params={"id": task_id}, headers={"x-key": other_key})
    assert other.status_code == 200 and other.json()["status"] == "Task not found"  # another tenant's: not found


def test_unknown_inputs_sizes_models_and_keys_are_bfls_errors(
    stack: Stack, http: httpx.Client, tenant: IssuedKey
) -> None:
    answers = {
        "unknown field": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "guidance": 3}),
        "upsampling": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "prompt_upsampling": True}),
        "half a size": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "width": 512}),
        "too big": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "width": 4096, "height": 4096}),
        "ratio": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "aspect_ratio": "9:1"}),
        "tolerance": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "safety_tolerance": 6}),
        "gap": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "input_image_2": "https://x.test/a.png"}),
        "bad image": http.post("/v1/flux-2-klein-4b", json={"prompt": "a lake", "input_image": "bm90IGFuIGltYWdl"}),
        "private webhook": http.post(
            "/v1/flux-2-klein-4b", json={"prompt": "a lake", "webhook_url": "http://10.0.0.1/hook"}
        ),
        "9b": http.post("/v1/flux-2-klein-9b", json={"prompt": "a lake"}),
        "base": http.post("/v1/flux-2-klein-base-4b", json={"prompt": "a lake"}),  # not served by the test stack
    }
    got = {name: (answer.status_code, answer.json()["detail"]) for name, answer in answers.items()}
    status, detail = got["unknown field"]
    assert status == 422 and detail[0]["loc"] == ["body", "guidance"] and detail[0]["type"] == "extra_forbidden"
    assert got["upsampling"][0] == 422 and got["upsampling"][1][0]["loc"] == ["body", "prompt_upsampling"]
    for name in ("half a size", "too big", "ratio", "tolerance"):
        assert got[name][0] == 422 and isinstance(got[name][1], list), (name, got[name])
    assert got["gap"][0] == 422 and "input_image" in got["gap"][1]
    assert got["bad image"][0] == 422 and "input_image[0]" in got["bad image"][1]
    assert got["private webhook"][0] == 422 and "webhook_url" in got["private webhook"][1]
    assert got["9b"][0] == 404 and "flux-2-klein-9b" in got["9b"][1]
    assert got["base"][0] == 404 and "'flux-klein-4b-base' is not served" in got["base"][1]  # BFL's name, our base

    missing = httpx.post(f"{stack.api_url}/v1/flux-2-klein-4b", json={"prompt": "a lake"})
    wrong = httpx.post(f"{stack.api_url}/v1/flux-2-klein-4b", json={"prompt": "a lake"}, headers={"x-key": "nope"})
    assert (missing.status_code, missing.json()) == (403, {"detail": "Not authenticated"})
    assert (wrong.status_code, wrong.json()) == (403, {"detail": "Not authenticated - Invalid Authentication"})
    with stack.engine.begin() as conn:  # nothing stored for a refused request
        stored = conn.execute(predictions.select().where(predictions.c.tenant_id == tenant.tenant_id)).all()
    assert stored == []


def test_the_webhook_carries_bfls_payload_with_its_secret_and_signature(stack: Stack, http: httpx.Client) -> None:
    worker = start_webhook_worker(stack.env | WEBHOOK_ENV, stack.logs / "bfl-webhooks.log", "bfl-hooks")
    receiver = Receiver().start()
    secret = "my-bfl-webhook-secret"
    try:
        body = {"prompt": "a kite", "width": 256, "height": 256, "webhook_url": receiver.url, "webhook_secret": secret}
        submitted = http.post("/v1/flux-2-klein-4b", json=body).json()
        (got,) = receiver.wait_for(1)
    finally:
        receiver.stop()
        worker.stop()
    headers = {name.lower(): value for name, value in got.headers.items()}
    assert headers["x-webhook-secret"] == secret
    expected = hmac.new(secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert headers["x-bfl-signature"] == f"sha256={expected}"
    payload = json.loads(got.body)
    assert payload["id"] == submitted["id"] and payload["status"] == "Ready" and payload["timestamp"]
    assert Image.open(io.BytesIO(httpx.get(payload["result"]["sample"]).content)).size == (256, 256)
    polled = http.get("/v1/get_result", params={"id": submitted["id"]}).json()
    assert polled["result"] | {"sample": None} == payload["result"] | {"sample": None}
    with stack.engine.begin() as conn:  # the secret is kept with the webhook, not in the echoed input
        row = conn.execute(predictions.select().where(predictions.c.id == submitted["id"])).mappings().one()
    assert "webhook_secret" not in row["input"] and row["webhook"]["secret"] == secret


def test_readme_snippet_registers_the_same_models() -> None:
    """The README's migration snippet is the registration this file runs with the package."""
    readme = (ROOT / "README.md").read_text()
    assert textwrap.dedent(REGISTER).strip() in readme
