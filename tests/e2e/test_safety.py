"""The safety checker end to end (docs/safety.md): a worker whose checker flags every image (the `nsfw` tiny
classifier, loaded like a real one) and an API with an operator's prompt blocklist, on a database and queue of
their own (the session's sweeper would otherwise hand their slow predictions to the session's worker, which has
no checker); each tenant's policy (block,
blur, flag) through the real worker and API in several dialects, the checker turned off where allowed and
refused where not; and, on the session's stack (no checker), every result saying that nothing was checked."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, expect
from sqlalchemy import Engine, func, select

from core.db import make_sync_engine
from core.settings import Settings
from core.storage import make_s3_client
from core.tables import predictions, usage_records
from core.tenants import IssuedKey
from ops.embedded import start_api, start_worker
from ops.migrate import migrate
from tests.browser import DESKTOP, Tab
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.stack import create_database, drop_database

WAVESPEED = "/api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image"
REPLICATE = "/v1/models/black-forest-labs/flux-2-klein-4b/predictions"
PRUNA = {"Model": "flux-klein-4b", "Try-Sync": "true"}
SMALL_WAVESPEED = {"size": "256*256", "enable_sync_mode": True}


@dataclass
class Checked:
    url: str
    engine: Engine
    env: dict[str, str]


@pytest.fixture(scope="module")
def checked(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checked]:
    """An API and a worker on their own queue (the session's worker has no checker), sharing the session's
    database, Redis and storage."""
    from models.tiny_safety import save

    folder = tmp_path_factory.mktemp("safety")
    database = f"klein_test_safety_{secrets.token_hex(4)}"
    database_url = create_database(database)
    migrate(Settings(database_url=database_url).sync_database_url)
    engine = make_sync_engine(Settings(database_url=database_url))
    blocklist = folder / "blocklist.txt"
    blocklist.write_text("# the operator's terms\nforbidden thing\nzorblax\n")
    env = stack.env | {
        "KLEIN_DATABASE_URL": database_url,
        "KLEIN_QUEUE_NAME": stack.env["KLEIN_QUEUE_NAME"] + "-safety",
        "KLEIN_SAFETY_MODEL": str(save(folder / "nsfw-classifier", "nsfw")),
        "KLEIN_PROMPT_BLOCKLIST": str(blocklist),
        "KLEIN_WORKER_METRICS_PORT": "0",
    }
    worker = start_worker(env, folder / "worker.log", "safety-worker")
    api, url = start_api(env, folder / "api.log")
    try:
        yield Checked(url, engine, env)
    finally:
        api.stop()
        worker.stop()
        engine.dispose()
        drop_database(database)


def tenant_with(checked: Checked, **settings: Any) -> IssuedKey:
    return make_tenant(checked.engine, **settings)


def http(url: str, key: IssuedKey) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key.key}"}, timeout=180)


def stored_objects(stack: Stack, key: IssuedKey) -> list[str]:
    s3 = make_s3_client(stack.settings)
    listed = s3.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=f"{key.tenant_id}/")
    return [item["Key"] for item in listed.get("Contents", [])]


def billed(checked: Checked, key: IssuedKey) -> int:
    with checked.engine.connect() as conn:
        count = select(func.count()).where(usage_records.c.tenant_id == key.tenant_id)
        return int(conn.execute(count).scalar_one())


def sharpness(data: bytes) -> float:
    """Mean absolute difference of horizontally neighbouring pixels: detail left in the image."""
    image = Image.open(io.BytesIO(data)).convert("L")
    pixels = list(image.getdata())
    width = image.width
    diffs = [abs(pixels[i] - pixels[i + 1]) for i in range(len(pixels) - 1) if (i + 1) % width]
    return sum(diffs) / len(diffs)


def test_block_fails_the_prediction_in_each_dialect_with_nothing_stored_or_billed(
    checked: Checked, stack: Stack
) -> None:
    key = tenant_with(checked)  # the default policy: block
    with http(checked.url, key) as client:
        pruna = client.post("/v1/predictions", headers=PRUNA, json={"input": {"prompt": "a lake", "seed": 1}})
        assert pruna.status_code == 200, pruna.text
        body = pruna.json()
        assert body["status"] == "failed" and body["error"].startswith("content policy:"), body
        assert body["safety"] == {
            "checked": True,
            "model": "nsfw-classifier",
            "flagged": [True],
            "policy": "block",
            "blocked": True,
        }
        openai = client.post("/v1/images/generations", json={"prompt": "a lake", "size": "256x256"})
        assert openai.status_code == 400, openai.text
        assert openai.json()["error"]["code"] == "content_policy_violation"
        assert "content policy" in openai.json()["error"]["message"]
        wavespeed = client.post(WAVESPEED, json={"prompt": "a lake"} | SMALL_WAVESPEED).json()["data"]
        assert wavespeed["status"] == "failed" and wavespeed["outputs"] == [], wavespeed
        assert wavespeed["has_nsfw_contents"] == [True] and "content policy" in wavespeed["error"]
    assert stored_objects(stack, key) == [] and billed(checked, key) == 0


def test_blur_stores_a_blurred_image_and_flag_stores_it_as_made(checked: Checked, stack: Stack) -> None:
    blurring, flagging = tenant_with(checked, safety_policy="blur"), tenant_with(checked, safety_policy="flag")
    same = {"prompt": "a lake", "seed": 7} | SMALL_WAVESPEED
    images = {}
    for key in (blurring, flagging):
        with http(checked.url, key) as client:
            data = client.post(WAVESPEED, json=same).json()["data"]
            assert data["status"] == "completed" and data["has_nsfw_contents"] == [True], data
            images[key.tenant_id] = httpx.get(data["outputs"][0]).content
    assert sharpness(images[blurring.tenant_id]) < sharpness(images[flagging.tenant_id]) / 4

    with http(checked.url, blurring) as client:  # Replicate: four outputs, each blurred and reported
        made = client.post(
            REPLICATE,
            headers={"Prefer": "wait"},
            json={"input": {"prompt": "a lake", "num_outputs": 4, "output_megapixels": "0.25"}},
        ).json()
        assert made["status"] == "succeeded" and len(made["output"]) == 4, made
        assert "4 of 4 outputs flagged; blurred" in made["logs"]
    with http(checked.url, flagging) as client:  # 1min: stored as made, flagged in the logs
        body = {
            "type": "IMAGE_GENERATOR",
            "model": "black-forest-labs/flux-2-klein-4b",
            "promptObject": {"prompt": "a lake", "megapixels": "0.25"},
        }
        record = client.post("/api/features", json=body).json()["aiRecord"]
        assert record["status"] == "SUCCESS" and httpx.get(record["temporaryUrl"]).status_code == 200
        pruna = client.get(f"/v1/predictions/status/{record['uuid']}").json()
        assert pruna["safety"]["flagged"] == [True] and pruna["safety"]["policy"] == "flag"
    assert billed(checked, flagging) == 2  # flagged outputs are stored and billed like any

    listed = httpx.get(f"{checked.url}/admin/v1/flagged", headers={"X-Admin-Key": ADMIN_KEY}, timeout=30).json()
    mine = [row for row in listed["data"] if row["tenant_id"] == blurring.tenant_id]
    assert len(mine) == 2 and {row["safety"]["policy"] for row in mine} == {"blur"}
    assert all("outputs" not in row for row in mine)  # what was found, never the images


def test_turning_the_checker_off_is_refused_unless_the_tenant_allows_it(checked: Checked, stack: Stack) -> None:
    strict, relaxed = tenant_with(checked), tenant_with(checked, allow_disable_safety_checker=True)
    off_replicate = {"input": {"prompt": "a lake", "disable_safety_checker": True, "output_megapixels": "0.25"}}
    off_wavespeed = {"prompt": "a lake", "enable_safety_checker": False} | SMALL_WAVESPEED
    with http(checked.url, strict) as client:
        refused = client.post(REPLICATE, headers={"Prefer": "wait"}, json=off_replicate)
        assert refused.status_code == 422 and "input.disable_safety_checker" in refused.json()["detail"], refused.text
        envelope = client.post(WAVESPEED, json=off_wavespeed).json()
        assert envelope["code"] == 422 and "enable_safety_checker: relaxing or turning off" in envelope["message"]
        low = client.post("/v1/images/generations", json={"prompt": "a lake", "size": "256x256", "moderation": "low"})
        assert low.status_code == 422 and "moderation" in low.json()["error"]["message"], low.text
    with checked.engine.connect() as conn:
        count = select(func.count()).where(predictions.c.tenant_id == strict.tenant_id)
        assert conn.execute(count).scalar_one() == 0  # nothing stored for a refused request

    with http(checked.url, relaxed) as client:
        made = client.post(REPLICATE, headers={"Prefer": "wait"}, json=off_replicate).json()
        assert (
            made["status"] == "succeeded"
            and "safety check: not run (the safety checker was turned off" in (made["logs"])
        )
        data = client.post(WAVESPEED, json=off_wavespeed).json()["data"]
        assert data["status"] == "completed" and data["has_nsfw_contents"] == [None], data
        low = client.post("/v1/images/generations", json={"prompt": "a lake", "size": "256x256", "moderation": "low"})
        assert low.status_code == 200, low.text  # low: checked and flagged, stored (never blocked)


def test_blocked_prompts_are_refused_before_anything_is_stored(checked: Checked, stack: Stack) -> None:
    key = tenant_with(checked, safety_policy="flag", blocked_terms=["purple giraffe"])
    with http(checked.url, key) as client:
        for prompt in ("a ZORBLAX in the sky", "a p u r p l e   giraffe", "a Ｆorbidden-thing"):
            openai = client.post("/v1/images/generations", json={"prompt": prompt, "size": "256x256"})
            assert openai.status_code == 400, (prompt, openai.text)
            error = openai.json()["error"]
            assert error["code"] == "content_policy_violation" and "blocked terms" in error["message"]
            assert "zorblax" not in error["message"].casefold() and "giraffe" not in error["message"]
            envelope = client.post(WAVESPEED, json={"prompt": prompt} | SMALL_WAVESPEED).json()
            assert envelope["code"] == 400 and "content policy" in envelope["message"], envelope
        passing = client.post(WAVESPEED, json={"prompt": "a purple giraffine shape, zorblaxian"} | SMALL_WAVESPEED)
        assert passing.json()["data"]["status"] == "completed", passing.text
    with checked.engine.connect() as conn:
        count = select(func.count()).where(predictions.c.tenant_id == key.tenant_id)
        assert conn.execute(count).scalar_one() == 1  # only the innocent one


def test_models_say_which_checker_runs(checked: Checked, stack: Stack) -> None:
    ours = httpx.get(f"{checked.url}/v1/models/flux-klein-4b", timeout=30).json()["safety_checker"]
    assert ours == {"checked": True, "model": "nsfw-classifier", "labels": ["nsfw"], "threshold": 0.5}
    session = httpx.get(f"{stack.api_url}/v1/models/flux-klein-4b", timeout=30).json()["safety_checker"]
    assert session["checked"] is False and "KLEIN_SAFETY_MODEL unset" in session["reason"]


def test_without_a_checker_every_result_says_nothing_was_checked(client: httpx.Client) -> None:
    """The session's worker runs no checker: no verdict anywhere, and the tenant's logs say why."""
    body = client.post("/v1/predictions", headers=PRUNA, json={"input": {"prompt": "a lake"}}).json()
    assert body["status"] == "succeeded" and body["safety"]["checked"] is False, body
    assert "KLEIN_SAFETY_MODEL unset" in body["safety"]["reason"]
    data = client.post(WAVESPEED, json={"prompt": "a lake"} | SMALL_WAVESPEED).json()["data"]
    assert data["status"] == "completed" and data["has_nsfw_contents"] == [None], data


def test_operators_set_the_policy_with_the_admin_api_and_the_cli(checked: Checked, tmp_path: Path) -> None:
    key = tenant_with(checked)
    admin = {"X-Admin-Key": ADMIN_KEY}
    url = f"{checked.url}/admin/v1/tenants/{key.tenant_id}"
    for bad in ({"safety_policy": "hide"}, {"blocked_terms": ["x" * 201]}, {"allow_disable_safety_checker": "maybe"}):
        assert httpx.patch(url, headers=admin, json=bad, timeout=30).status_code == 422, bad
    changed = httpx.patch(url, headers=admin, json={"safety_policy": "flag"}, timeout=30).json()
    assert changed["safety_policy"] == "flag" and changed["allow_disable_safety_checker"] is None
    with http(checked.url, key) as client:  # at once: the API's cached key lookups were dropped
        data = client.post(WAVESPEED, json={"prompt": "a lake"} | SMALL_WAVESPEED).json()["data"]
        assert data["status"] == "completed" and data["has_nsfw_contents"] == [True], data

    terms = tmp_path / "terms.txt"
    terms.write_text("# this tenant's own\nteal walrus\n")
    env = os.environ | {k: v for k, v in checked.env.items() if k.startswith("KLEIN_")}
    args = ["set-limits", key.tenant_id, "--safety-policy", "blur", "--blocked-terms-file", str(terms)]
    done = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"safety_policy": "blur"' in done.stdout and '"teal walrus"' in done.stdout
    with http(checked.url, key) as client:
        refused = client.post(WAVESPEED, json={"prompt": "a Teal  Walrus"} | SMALL_WAVESPEED).json()
        assert refused["code"] == 400 and "blocked terms" in refused["message"], refused


def test_the_console_lists_flagged_predictions_without_their_images(checked: Checked, browser: Browser) -> None:
    key = tenant_with(checked, safety_policy="blur")
    with http(checked.url, key) as client:
        made = client.post(WAVESPEED, json={"prompt": "a lake"} | SMALL_WAVESPEED).json()["data"]
        assert made["status"] == "completed", made
    tab = Tab.open(browser, DESKTOP)
    try:
        page = tab.page
        page.goto(f"{checked.url}/console")
        page.fill("#admin-key", ADMIN_KEY)
        page.press("#admin-key", "Enter")
        row = page.locator(f'#flagged-body tr[data-prediction-id="{made["id"]}"]')
        expect(row.locator("td").nth(2)).to_have_text("blur")
        expect(row.locator("td").nth(3)).to_have_text("1 of 1")
        expect(page.locator("section[aria-labelledby=flagged-title] img")).to_have_count(0)
        assert not [r.url for r in tab.requests if "/delivery/" in r.url]  # no image fetched either
        tab.assert_clean()
    finally:
        tab.close()
