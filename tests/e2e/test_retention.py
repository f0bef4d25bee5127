"""Data retention on the real stack (docs/retention.md): the reaper against the real database and S3 server,
410 for expired outputs, `DELETE /v1/predictions/{id}`, retention 0 with synchronous answers."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select, update

from api.services.retention import duration
from core import retention
from core.storage import make_s3_client
from core.tables import files, predictions, tenants, usage_records
from core.tenants import IssuedKey
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.e2e.test_predictions import PROMPT, submit
from tests.images import data_uri, picture

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@pytest.fixture(scope="module")
def s3(stack: Stack) -> S3Client:
    return make_s3_client(stack.settings)


def stored(s3: S3Client, stack: Stack, prefix: str) -> list[str]:
    return retention.listed(s3, stack.settings.s3_bucket, prefix)


def expired_at(stack: Stack, ids: Iterable[str]) -> dict[str, Any]:
    with stack.engine.connect() as conn:
        query = select(predictions.c.id, predictions.c.expired_at).where(predictions.c.id.in_(list(ids)))
        return {row.id: row.expired_at for row in conn.execute(query)}


def reap_until_expired(stack: Stack, s3: S3Client, ids: list[str], timeout: float = 30) -> None:
    """Reaper passes (the real code, in this process) until every id expired: none is due before SETTLE_S."""
    deadline = time.monotonic() + timeout
    while not all(expired_at(stack, ids).values()):
        assert time.monotonic() < deadline, f"not expired after {timeout} s: {expired_at(stack, ids)}"
        time.sleep(0.5)
        retention.reap(stack.settings, stack.engine, s3)


def client_of(stack: Stack, key: IssuedKey) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, headers={"apikey": key.key}, timeout=180)


def test_the_reaper_deletes_what_expired_and_its_delivery_answers_410(stack: Stack, s3: S3Client) -> None:
    short, kept = make_tenant(stack.engine, retention_s=1), make_tenant(stack.engine)
    reference = {"prompt": PROMPT, "images": [data_uri(picture())], "aspect_ratio": "1:1"}
    with client_of(stack, short) as client, client_of(stack, kept) as keeper:
        edited = submit(client, reference, sync=True).json()
        openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "size": "256x256"}).json()
        keeps = submit(keeper, reference, sync=True).json()
        assert edited["status"] == keeps["status"] == "succeeded", (edited, keeps)
        signed = [item["url"] for item in openai["data"]]
        assert [httpx.get(url).status_code for url in signed] == [200, 200]  # no key: the signature stands for it
        before = stored(s3, stack, f"{short.tenant_id}/")
        assert {key.rsplit("/", 1)[1] for key in before} == {
            "input_0.png",
            "output.jpg",
            "output.webp",
            "output_1.webp",
        }

        reap_until_expired(stack, s3, [edited["id"], openai["id"]])

        assert stored(s3, stack, f"{short.tenant_id}/") == []  # outputs and references, every prediction
        assert len(stored(s3, stack, f"{kept.tenant_id}/{keeps['id']}/")) == 2  # 7 days: nothing of it went
        assert expired_at(stack, [keeps["id"]]) == {keeps["id"]: None}
        assert keeper.get(keeps["generation_url"]).status_code == 200

        gone = client.get(edited["generation_url"])  # with the key
        assert gone.status_code == 410, gone.text
        message = gone.json()["error"]
        assert message.startswith(f"the outputs of prediction {edited['id']!r} expired on ")
        assert "this account keeps outputs for 1 second" in message and message.endswith("generate it again")
        assert datetime.fromisoformat(gone.json()["expired_at"]) <= datetime.now(UTC)
        for url in signed:  # without one
            answer = httpx.get(url)
            assert answer.status_code == 410 and f"prediction {openai['id']!r} expired" in answer.json()["error"]
        status = client.get(edited["get_url"])  # the prediction itself is still there
        assert status.status_code == 200 and status.json()["status"] == "succeeded" and "expired_at" in status.json()

    # Across the whole bucket: no object of an expired prediction, and nothing due is left unexpired.
    everything = stored(s3, stack, "")
    owners = {key.split("/")[1] for key in everything if key.split("/")[1] != "files"}
    assert [pid for pid, at in expired_at(stack, owners).items() if at is not None] == []
    kept_s = func.greatest(retention.retention_s(stack.settings), retention.SETTLE_S)
    due = (
        select(func.count())
        .select_from(predictions.join(tenants))
        .where(
            predictions.c.expired_at.is_(None),
            predictions.c.completed_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, kept_s),
        )
    )
    retention.reap(stack.settings, stack.engine, s3)
    with stack.engine.connect() as conn:
        assert conn.execute(due).scalar_one() == 0


def test_expired_uploads_are_deleted_object_and_row(stack: Stack, s3: S3Client, tenant: IssuedKey) -> None:
    with client_of(stack, tenant) as client:
        old, new = (client.post("/v1/files", files={"content": ("a.png", picture(), "image/png")}).json() for _ in "ab")
    with stack.engine.begin() as conn:
        conn.execute(update(files).where(files.c.id == old["id"]).values(expires_at=func.now() - timedelta(seconds=1)))
    assert len(stored(s3, stack, f"{tenant.tenant_id}/files/")) == 2

    retention.reap(stack.settings, stack.engine, s3)  # (or a worker's sweeper was first: what is left counts)

    assert stored(s3, stack, f"{tenant.tenant_id}/files/") == [f"{tenant.tenant_id}/files/{new['id']}.png"]
    with stack.engine.connect() as conn:
        assert conn.execute(select(files.c.id).where(files.c.tenant_id == tenant.tenant_id)).scalars().all() == [
            new["id"]
        ]


def test_delete_removes_the_objects_at_once_and_keeps_the_usage(stack: Stack, s3: S3Client, tenant: IssuedKey) -> None:
    other = make_tenant(stack.engine)
    with client_of(stack, tenant) as client, client_of(stack, other) as stranger:
        done = submit(client, {"prompt": PROMPT, "images": [data_uri(picture())]}, sync=True).json()
        assert done["status"] == "succeeded", done
        prefix = f"{tenant.tenant_id}/{done['id']}/"
        assert len(stored(s3, stack, prefix)) == 2

        assert stranger.delete(f"/v1/predictions/{done['id']}").status_code == 404  # not theirs
        assert len(stored(s3, stack, prefix)) == 2
        deleted = client.delete(f"/v1/predictions/{done['id']}")
        assert (deleted.status_code, deleted.content) == (204, b"")
        assert stored(s3, stack, prefix) == []  # at once, not on the reaper's next pass
        assert client.delete(f"/v1/predictions/{done['id']}").status_code == 204  # again: nothing changes
        assert client.delete("/v1/predictions/nope").status_code == 404
        with stack.engine.connect() as conn:
            usage = select(usage_records.c.images).where(usage_records.c.prediction_id == done["id"])
            assert conn.execute(usage).scalars().all() == [1]
        gone = client.get(done["generation_url"])
        assert gone.status_code == 410 and "generate it again" in gone.json()["error"]
        view = client.get(done["get_url"]).json()
        assert view["status"] == "succeeded" and view["expired_at"] is not None

        # Unfinished: canceled first, its reference gone at once; a worker that was running it stores nothing.
        slow = submit(client, {"prompt": PROMPT, "images": [data_uri(picture())], "num_inference_steps": 50}).json()
        prefix = f"{tenant.tenant_id}/{slow['id']}/"
        assert client.delete(f"/v1/predictions/{slow['id']}").status_code == 204
        assert stored(s3, stack, prefix) == []
        assert client.get(slow["get_url"]).json()["status"] == "canceled"
        time.sleep(3)  # the heartbeat notices a cancel within ~2 s
        assert stored(s3, stack, prefix) == []


def test_retention_zero_keeps_nothing_after_a_synchronous_answer(stack: Stack, s3: S3Client) -> None:
    tenant = make_tenant(stack.engine)
    admin = httpx.Client(base_url=f"{stack.api_url}/admin/v1", headers={"X-Admin-Key": ADMIN_KEY})
    ref = data_uri(picture())
    with client_of(stack, tenant) as client:
        assert client.get("/v1/keys").status_code == 200  # the key's lookup is cached with the default retention
        assert admin.patch(f"/tenants/{tenant.tenant_id}", json={"retention_s": -1}).status_code == 422
        assert admin.patch(f"/tenants/{tenant.tenant_id}", json={"retention_s": 0}).json()["retention_s"] == 0

        png = client.post("/v1/generate", json={"prompt": PROMPT, "aspect_ratio": "square", "image_uris": [ref]})
        assert png.status_code == 200, png.text
        assert Image.open(io.BytesIO(png.content)).format == "PNG"
        b64 = client.post(
            "/v1/images/generations",
            json={"prompt": PROMPT, "size": "256x256", "n": 2, "response_format": "b64_json", "images": [ref]},
        ).json()
        assert [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in b64["data"]] == [(256, 256)] * 2
        wavespeed = client.post(
            "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image",
            json={"prompt": PROMPT, "size": "256*256", "enable_sync_mode": True, "enable_base64_output": True},
        ).json()["data"]
        assert wavespeed["outputs"][0].startswith("data:image/jpeg;base64,")
        ids = [png.headers["x-prediction-id"], b64["id"], wavespeed["id"]]
        assert stored(s3, stack, f"{tenant.tenant_id}/") == []  # nothing, references included, at once
        assert all(expired_at(stack, ids).values())
        again = client.get(f"/api/v3/predictions/{wavespeed['id']}/result")
        assert again.status_code == 410 and "only until a synchronous answer" in again.json()["message"]

        # An answer with links keeps its objects until the reaper's next pass, at least SETTLE_S later.
        linked = submit(client, {"prompt": PROMPT, "aspect_ratio": "1:1"}, sync=True).json()
        assert client.get(linked["generation_url"]).status_code == 200
        reap_until_expired(stack, s3, [linked["id"]])
        assert stored(s3, stack, f"{tenant.tenant_id}/") == []

    assert admin.patch(f"/tenants/{tenant.tenant_id}", json={"retention_s": None}).json()["retention_s"] is None


def test_cli_sets_and_resets_the_retention(stack: Stack, tenant: IssuedKey) -> None:
    env = os.environ | {k: v for k, v in stack.env.items() if k.startswith("KLEIN_")}

    def klein(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True)

    assert '"retention_s": 43200' in klein("set-limits", tenant.tenant_id, "--retention-days", "0.5").stdout
    assert '"retention_s": null' in klein("set-limits", tenant.tenant_id, "--retention-days", "default").stdout
    refused = klein("set-limits", tenant.tenant_id, "--retention-days", "-1")
    assert refused.returncode == 2 and "between 0 and 3650 days" in refused.stderr


def test_durations_read_in_their_largest_unit() -> None:
    assert [duration(s) for s in (7 * 86400, 86400, 36 * 3600, 90, 1, 61)] == [
        "7 days",
        "1 day",
        "36 hours",
        "90 seconds",
        "1 second",
        "61 seconds",
    ]
