"""The playground as a product, in a real browser on the real stack: the form is the served schema (fields the page
has never seen included), a gallery of several outputs per run, deleting from History, runs that survive a
reload and update live in History, and the no-worker state when the worker is frozen (SIGSTOP) and after
(SIGCONT). The pages' basics are in tests/e2e/test_web.py, whose helpers these use."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect
from sqlalchemy import Engine

from core.tenants import IssuedKey
from tests.browser import DESKTOP, Tab, screenshot
from tests.conftest import Stack, make_tenant
from tests.e2e.schema_extra_app import EXTRA
from tests.e2e.test_web import AltApi, alt_api, download, open_playground, shown_result, submit_prompt
from tests.e2e.test_worker import start_slow_prediction

__all__ = ["alt_api"]  # the fixture, shared with test_web.py

_FIELDS = "() => [...document.querySelectorAll('#fields > [data-field]')].map((f) => f.dataset.field)"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def desktop(browser: Browser) -> Iterator[Tab]:
    tab = Tab.open(browser, DESKTOP)
    yield tab
    tab.close()


def open_at(tab: Tab, url: str, key: str) -> Any:
    page = tab.page
    page.goto(f"{url}/#generate")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_have_attribute("data-valid", "true")
    return page


def test_the_form_is_the_served_schema_with_fields_the_page_does_not_know(
    alt_api: AltApi, engine: Engine, desktop: Tab
) -> None:
    owner = make_tenant(engine, price_per_image=0.0025)
    page = desktop.page
    page.goto(f"{alt_api.url}/#generate")
    page.fill("#api-key", "kl_not-a-key")
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_contain_text("invalid key")  # checked at once
    assert desktop.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    desktop.errors.clear()  # Chromium's line for the refused GET /v1/account: the only request with that key
    page = open_at(desktop, alt_api.url, owner.key)
    expect(page.locator("#key-state")).to_contain_text("valid: tenant")
    expect(page.locator("#weights-banner")).to_contain_text("random-weights")  # the tiny pipeline, said plainly

    options = page.locator("#model option").evaluate_all("(os) => os.map((o) => o.value)")
    assert options == ["flux-klein-4b", "flux-klein-4b-base"]  # every served model, the base one included
    assert page.evaluate(_FIELDS) == list(alt_api.schema["properties"])
    assert set(EXTRA) <= set(alt_api.schema["properties"])
    for name, description in EXTRA.items():
        expect(page.locator(f"#in-{name}-hint")).to_contain_text(description)  # from the schema
    strength = page.locator("#in-test_strength")
    assert (strength.get_attribute("min"), strength.get_attribute("max"), strength.input_value()) == ("0", "2", "0.5")
    expect(page.locator("#in-test_strength-hint")).to_contain_text("0–2 · default 0.5")
    assert page.locator("#in-test_mode option").evaluate_all("(os) => os.map((o) => o.value)") == ["calm", "wild"]
    expect(page.locator("#in-guidance-hint")).to_contain_text("ignored")  # the distilled model's own description

    expect(page.locator("#price")).to_have_text(re.compile(r"Price: \$0\.0025 per image$"))
    page.fill("#in-num_outputs", "3")
    expect(page.locator("#price")).to_have_text(re.compile(r"× 3 = \$0\.0075$"))
    page.fill("#in-num_outputs", "1")

    page.fill("#in-test_strength", "1.5")
    page.select_option("#in-test_mode", "wild")
    page.check("#in-test_flag")
    curl = page.locator('#api-code pre[data-dialect="curl"]')
    for text in ('"test_strength":1.5', '"test_mode":"wild"', '"test_flag":true'):
        expect(curl).to_contain_text(text)
    shown = submit_prompt(page, "a field nobody knew")
    headers = {"apikey": owner.key}
    stored = httpx.get(f"{alt_api.url}/v1/predictions/status/{shown.id}", headers=headers).json()["input"]
    assert (stored["test_strength"], stored["test_mode"], stored["test_flag"]) == (1.5, "wild", True)

    page.select_option("#model", "flux-klein-4b-base")
    base = httpx.get(f"{alt_api.url}/v1/models/flux-klein-4b-base").json()
    assert page.evaluate(_FIELDS) == list(base["input_schema"]["properties"])
    expect(page.locator("#in-num_inference_steps")).to_have_value("50")  # its own default
    expect(page.locator("#in-guidance-hint")).to_contain_text("Classifier-free guidance")
    expect(page.locator("#model-notes")).to_contain_text("Undistilled")
    expect(page.locator("#in-prompt")).to_have_value("a field nobody knew")  # kept across models
    desktop.assert_clean()


def test_several_outputs_stay_in_the_gallery_and_a_run_is_deleted_from_history(
    stack: Stack, tenant: IssuedKey, desktop: Tab, shots: Path
) -> None:
    page = open_playground(desktop, stack, tenant.key)
    page.fill("#in-num_outputs", "2")
    pair = submit_prompt(page, "two kites over a beach")
    assert len(pair.urls) == 2 and download(pair.urls[0]) != download(pair.urls[1])
    page.fill("#in-num_outputs", "1")
    single = submit_prompt(page, "one kite")
    cards = page.locator("#gallery figure.run")
    expect(cards).to_have_count(2)  # the earlier run stays
    assert cards.evaluate_all("(cs) => cs.map((c) => [c.dataset.predictionId, c.querySelectorAll('img').length])") == [
        [single.id, 1],
        [pair.id, 2],
    ]
    screenshot(page, "playground-gallery", shots)

    page.click("a[data-view=history]")
    page.click(f'.history-item[data-id="{pair.id}"]')
    delete = page.locator("#detail-delete")
    delete.click()
    expect(delete).to_have_text("Confirm delete")  # two clicks, no dialog
    delete.click()
    expect(page.locator("#history-message")).to_contain_text(f"Deleted {pair.id}")
    expect(page.locator(f'.history-item[data-id="{pair.id}"]')).to_have_count(0)
    assert httpx.get(pair.urls[0]).status_code in (404, 410)  # the images are gone
    page.click("#history-form button[type=submit]")  # the record stays (its usage too), marked
    expect(page.locator(f'.history-item[data-id="{pair.id}"] .thumb')).to_have_text("images deleted")
    desktop.assert_clean()


def test_a_reload_mid_run_resumes_and_history_follows_it_live(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, browser: Browser, desktop: Tab
) -> None:
    blocker = start_slow_prediction(stack, client)  # the one worker is busy: the page's prediction waits
    page = open_playground(desktop, stack, tenant.key)
    page.fill("#in-prompt", "a patient heron")
    page.click("#generate-button")
    label = page.locator("#progress-label")
    expect(label).to_have_text(re.compile(r"Queued: (next|\d+ ahead)"))
    link = page.evaluate("() => location.hash")
    prediction_id = link.removeprefix("#/p/")
    assert link.startswith("#/p/") and prediction_id

    page.reload()  # mid-run: the link and the key (sessionStorage) survive, and the page follows it again
    expect(label).to_have_text(re.compile(r"Queued: (next|\d+ ahead)"))
    expect(page.locator("#in-prompt")).to_have_value("a patient heron")
    expect(page.locator("#cancel-button")).to_be_visible()
    streams = [r.url for r in desktop.requests if r.url.endswith(f"/v1/predictions/{prediction_id}/stream")]
    assert len(streams) == 2, streams  # before and after the reload
    elapsed = float((page.text_content("#elapsed") or "0").split()[0])
    assert elapsed > 0  # counted from its creation, not from the reload

    other = Tab.open(browser, DESKTOP)  # History in another tab: the queued item, live, with Cancel
    history = open_playground(other, stack, tenant.key, "history")
    row = history.locator(f'.history-list li[data-id="{prediction_id}"]')
    expect(row.locator(".badge")).to_have_text(re.compile(r"Queued"))
    expect(row.locator('button[data-action="cancel"]')).to_be_visible()
    blocked = history.locator(f'.history-list li[data-id="{blocker}"]')
    expect(blocked.locator(".badge")).to_have_text(re.compile(r"processing \d+ %"))
    assert client.post(f"/v1/predictions/{blocker}/cancel").status_code == 200

    shown = shown_result(page)
    assert shown.id == prediction_id
    expect(page.locator("#run-log li").first).to_be_attached()  # the stream's log events
    expect(row.locator(".badge")).to_have_text("succeeded", timeout=15_000)  # History caught up by itself
    expect(row.locator('button[data-action="cancel"]')).to_have_count(0)
    other.assert_clean()
    other.close()
    desktop.assert_clean()


def test_a_frozen_worker_shows_no_worker_online_then_the_run_goes_on(
    stack: Stack, alt_api: AltApi, engine: Engine, desktop: Tab, shots: Path
) -> None:
    owner = make_tenant(engine)
    page = open_at(desktop, alt_api.url, owner.key)
    page.fill("#in-prompt", "a lantern in fog")
    label = page.locator("#progress-label")
    pid = stack.worker.process.pid if stack.worker.process else None
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeat, nothing taken from the queue
    try:
        page.click("#generate-button")
        # Counted live for 5 s after its last heartbeat there (KLEIN_LIVE_WORKER_S), re-sent every second.
        expect(label).to_have_text("No worker is online for this model — waiting for one to start.", timeout=15_000)
        expect(page.locator("#progress-box")).to_have_attribute("data-stage", "no-worker")
        screenshot(page, "playground-no-worker", shots)
    finally:
        os.kill(pid, signal.SIGCONT)
    shown = shown_result(page)  # the worker back: the same prediction runs and shows
    assert page.evaluate("() => location.hash") == f"#/p/{shown.id}"
    desktop.assert_clean()


def test_the_account_gives_the_tenants_name_and_price_per_image(stack: Stack, engine: Engine) -> None:
    default, priced = make_tenant(engine), make_tenant(engine, price_per_image=0.0025)
    for issued, price in ((default, stack.settings.default_price_per_image), (priced, 0.0025)):
        answer = httpx.get(f"{stack.api_url}/v1/account", headers={"apikey": issued.key})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["tenant_id"], body["price_per_image"], body["currency"]) == (issued.tenant_id, price, "USD")
        assert body["name"].startswith("tenant-")
    refused = httpx.get(f"{stack.api_url}/v1/account", headers={"apikey": "kl_wrong"})
    assert refused.status_code == 401 and "error" in refused.json()
