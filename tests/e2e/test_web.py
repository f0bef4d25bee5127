"""The playground (`/`) and the console (`/console`) in a real browser, on the real stack: a prompt with live
progress, its image, history, a re-run to the same bytes, a dropped reference, "copy as code" run for real,
keys, usage, the console; prompts stay text, the policy holds, the pages work from the keyboard and at 375 px.
Screenshots of each page land in a temporary folder and in docs/screenshots/ (tests/browser.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect
from sqlalchemy import Engine

from core.tenants import IssuedKey
from models.klein import size_for_aspect_ratio, size_for_ratio
from ops.embedded import Service, free_port, wait_until
from tests.browser import (
    DESKTOP,
    PHONE,
    ROOT,
    Tab,
    document_width,
    screenshot,
    unlabeled_controls,
    wait_js,
)
from tests.conftest import ADMIN_KEY, Stack, make_tenant
from tests.e2e.conftest import TlsApi
from tests.e2e.test_lora import tiny_lora
from tests.e2e.test_worker import poison_prediction, start_slow_prediction, wait_for
from tests.e2e.test_worker import row as prediction_row
from tests.images import picture

STATIC = ROOT / "api" / "static"
XSS = "<img src=x onerror=alert(1)><script>alert(2)</script>"
# Quotes, a variable, a command substitution and a backslash: each snippet has to carry them through its own quoting.
TRICKY = 'a tin robot\'s "$HOME" `id` \\ sonnet'


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@dataclass
class AltApi:
    url: str
    schema: dict[str, Any]  # GET /v1/models' input schema of flux-klein-4b there


@pytest.fixture(scope="module")
def alt_api(stack: Stack) -> Iterator[AltApi]:
    """One more API on the session's stack (tests/e2e/schema_extra_app.py): three inputs the product lacks on
    flux-klein-4b; the base model served too, which no worker of this session runs (its predictions wait); a
    worker counted live for 5 s after its last heartbeat (every ~2 s), and queued positions re-sent every second."""
    env = stack.env | {
        "KLEIN_SERVED_MODELS": '["flux-klein-4b", "flux-klein-4b-base"]',
        "KLEIN_LIVE_WORKER_S": "5",
        "KLEIN_STREAM_REFRESH_S": "1",
    }
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "tests.e2e.schema_extra_app:create_app", "--factory", "--port", str(port)]
    log = stack.logs / f"alt-api-{port}.log"
    api = Service([*args, "--log-level", "warning"], env, log).start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        api.ensure_alive("alt API")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "alt API", log)
        schema = httpx.get(f"{url}/v1/models/flux-klein-4b", timeout=10).json()["input_schema"]
        yield AltApi(url, schema)
    finally:
        api.stop()


@pytest.fixture(scope="module")
def waiting_api(alt_api: AltApi) -> str:
    return alt_api.url


def waiting_prediction(url: str, key: str, prompt: str) -> str:
    answer = httpx.post(
        f"{url}/v1/predictions",
        headers={"apikey": key, "Model": "flux-klein-4b-base"},
        json={"input": {"prompt": prompt}},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    prediction_id: str = answer.json()["id"]
    return prediction_id


def server_status(url: str, key: str, prediction_id: str) -> str:
    answer = httpx.get(f"{url}/v1/predictions/status/{prediction_id}", headers={"apikey": key}, timeout=30)
    status: str = answer.json()["status"]
    return status


@pytest.fixture
def desktop(browser: Browser) -> Iterator[Tab]:
    tab = Tab.open(browser, DESKTOP)
    yield tab
    tab.close()


@pytest.fixture
def phone(browser: Browser) -> Iterator[Tab]:
    tab = Tab.open(browser, PHONE)
    yield tab
    tab.close()


# --- driving the playground -----------------------------------------------------------------------------


@dataclass
class Shown:
    """The result panel's image, once loaded."""

    id: str
    seed: int
    url: str
    width: int
    height: int
    urls: list[str]


_RESULT = """(previous) => {
  const error = document.getElementById("result-error").textContent;
  if (error) return {error};
  const card = document.querySelector("#gallery figure.run");  // the newest run's
  const images = card ? [...card.querySelectorAll(".output img")] : [];
  const id = card?.dataset.predictionId;
  if (!id || id === previous || !images.every((i) => i.complete && i.naturalWidth)) return null;
  const seed = Number(card.dataset.seed);
  const [image] = images;
  const urls = images.map((i) => i.src);
  return {id, seed, url: image.src, width: image.naturalWidth, height: image.naturalHeight, urls};
}"""
_RECORD_PROGRESS = """() => {
  window.progressSeen = [];
  new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) window.progressSeen.push(node.textContent);
  }).observe(document.getElementById("progress-label"), {childList: true});
}"""
_STATS = """(selector) => {
  const boxes = [...document.querySelectorAll(`${selector} div`)];
  const pairs = boxes.map((box) => [box.firstChild.textContent, box.lastChild.textContent]);
  return pairs.length ? Object.fromEntries(pairs) : null;
}"""
_IMAGE_LOADED = (
    "(selector) => { const i = document.querySelector(selector); return i?.complete && i.naturalWidth > 0; }"
)


def open_playground(tab: Tab, stack: Stack, key: str, view: str = "generate") -> Page:
    page = tab.page
    page.goto(f"{stack.api_url}/#{view}")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_have_attribute("data-valid", "true")  # checked against GET /v1/account
    return page


def shown_result(page: Page, previous: str | None = None) -> Shown:
    """Wait for a result other than `previous` with its image loaded (an error shown instead fails the test)."""
    found = wait_js(page, _RESULT, previous, timeout=60)
    assert "error" not in found, found["error"]
    return Shown(**found)


def submit_prompt(page: Page, prompt: str) -> Shown:
    previous = page.evaluate("() => document.querySelector('#gallery figure.run')?.dataset.predictionId || null")
    page.fill("#in-prompt", prompt)
    page.click("#generate-button")
    return shown_result(page, previous)


def download(url: str) -> bytes:
    answer = httpx.get(url, timeout=30)  # signed links: no key
    assert answer.status_code == 200, answer.text
    return answer.content


def stats(page: Page, selector: str) -> dict[str, str]:
    found: dict[str, str] = wait_js(page, _STATS, selector)
    return found


# --- the tests -------------------------------------------------------------------------------------------


def test_a_prompt_streams_its_progress_lands_in_history_and_reruns_to_the_same_bytes(
    stack: Stack, tenant: IssuedKey, desktop: Tab, shots: Path
) -> None:
    page = open_playground(desktop, stack, tenant.key)
    page.evaluate(_RECORD_PROGRESS)
    first = submit_prompt(page, "a lighthouse on a cliff at dusk")
    assert (first.width, first.height) == (1024, 1024)

    seen: list[str] = page.evaluate("() => window.progressSeen")
    steps = [int(m[1]) for text in seen if (m := re.fullmatch(r"Step (\d+) of 4", text))]
    assert steps and steps == sorted(steps), seen
    assert seen[0] == "Submitting…" and seen[-1].startswith("Done in"), seen
    assert "Step 4 of 4: decoding and uploading…" in seen, seen  # the stage after the last step
    # From the event stream, read with fetch (the key in a header), not by polling the status.
    urls = [r.url for r in desktop.requests]
    assert f"{stack.api_url}/v1/predictions/{first.id}/stream" in urls
    assert not [u for u in urls if "/v1/predictions/status/" in u]
    timings = page.text_content("#gallery figure.run .timings") or ""
    assert f"seed {first.seed}" in timings and "inference" in timings and "total" in timings

    # The key lives in this tab's sessionStorage and travels only in the apikey header.
    api_calls = [r for r in desktop.requests if r.url.startswith(f"{stack.api_url}/v1/") and "/delivery/" not in r.url]
    keyless = [r.url for r in api_calls if "apikey" not in r.headers]
    # Only the public catalogue is read before a key was given (the enhancer's state included: js/enhance.js)
    assert keyless == [f"{stack.api_url}/v1/models"], keyless
    assert all(r.headers.get("apikey") in (None, tenant.key) for r in api_calls)
    assert not [r.url for r in desktop.requests if tenant.key in r.url]
    assert desktop.context.cookies() == []
    assert page.evaluate("() => [sessionStorage.getItem('klein.apiKey'), localStorage.length]") == [tenant.key, 0]

    with page.expect_download() as downloading:
        page.click('#gallery figure.run [data-action="download"]')
    assert downloading.value.suggested_filename == f"klein-{first.id}.jpg"
    assert Path(downloading.value.path()).read_bytes() == download(first.url)
    screenshot(page, "playground-desktop", shots)

    page.click("a[data-view=history]")
    item = page.locator(f'.history-item[data-id="{first.id}"]')
    item.wait_for()
    wait_js(page, _IMAGE_LOADED, f'.history-item[data-id="{first.id}"] img')  # the thumbnail: a signed link
    item.click()
    page.locator(f'#detail[data-id="{first.id}"]').wait_for()
    shown_input = json.loads(page.text_content("#detail-input") or "")
    assert shown_input["prompt"] == "a lighthouse on a cliff at dusk" and shown_input["seed"] == -1
    assert f"seed {first.seed}" in (page.text_content("#detail-meta") or "")
    wait_js(page, _IMAGE_LOADED, "#detail-image")
    screenshot(page, "history-desktop", shots)

    page.click("#detail-rerun")  # the same input, with the seed the first run drew
    again = shown_result(page, first.id)
    assert page.evaluate("() => location.hash") == f"#/p/{again.id}" and page.is_checked("#seed-lock")
    assert again.id != first.id and again.seed == first.seed
    assert download(again.url) == download(first.url)

    page.click("a[data-view=history]")
    expect(page.locator(".history-item")).to_have_count(2)
    page.select_option("#history-status", "failed")
    expect(page.locator("#history-message")).to_have_text("No failed predictions.")
    expect(page.locator(".history-item")).to_have_count(0)
    page.select_option("#history-status", "succeeded")
    expect(page.locator(".history-item")).to_have_count(2)
    assert page.locator(".history-item").first.get_attribute("data-id") == again.id  # newest first
    desktop.assert_clean()


def test_a_dropped_reference_is_uploaded_and_edited(stack: Stack, tenant: IssuedKey, desktop: Tab) -> None:
    page = open_playground(desktop, stack, tenant.key)
    png = picture(640, 384)  # a PNG made with Pillow, 5:3
    transfer = page.evaluate_handle(
        """([data, name]) => {
          const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], name, {type: "image/png"}));
          return transfer;
        }""",
        [base64.b64encode(png).decode(), "reference.png"],
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    page.locator('#reference-list li[data-status="ready"]').wait_for()
    page.select_option("#in-aspect_ratio", "match_input_image")
    edited = submit_prompt(page, "the same scene as a watercolour")
    assert (edited.width, edited.height) == size_for_ratio(640 / 384)  # the reference's shape: it was used

    uploads = [r for r in desktop.requests if r.method == "POST" and r.url == f"{stack.api_url}/v1/files"]
    assert len(uploads) == 1
    headers = {"apikey": tenant.key}
    status = httpx.get(f"{stack.api_url}/v1/predictions/status/{edited.id}", headers=headers).json()
    (reference,) = status["input"]["images"]
    assert reference.startswith(f"{stack.api_url}/v1/files/")
    assert httpx.get(reference, headers=headers).content == png
    desktop.assert_clean()


def test_an_exact_size_goes_through_the_openai_style_endpoint(
    stack: Stack, tenant: IssuedKey, desktop: Tab, tmp_path: Path
) -> None:
    page = open_playground(desktop, stack, tenant.key)
    page.select_option("#size-mode", "exact")
    assert page.is_visible("#width") and not page.is_visible("#in-aspect_ratio")
    page.fill("#width", "512")
    page.fill("#height", "384")
    page.fill("#in-num_inference_steps", "13")  # past this endpoint's 12: refused in the page, before any request
    page.fill("#in-seed", "77")
    page.check("#seed-lock")
    page.fill("#in-prompt", "a blue kite")
    page.click("#generate-button")
    expect(page.locator("#form-message")).to_contain_text("Steps")
    assert not [r for r in desktop.requests if r.method == "POST"]
    page.fill("#in-num_inference_steps", "4")
    shown = submit_prompt(page, "a blue kite")
    assert (shown.width, shown.height) == (512, 384)
    assert [r.url for r in desktop.requests if r.method == "POST"] == [f"{stack.api_url}/v1/images/generations"]

    code = page.text_content('#api-code pre[data-dialect="curl"]') or ""
    env = os.environ | {"KLEIN_API_KEY": tenant.key}
    ran = subprocess.run(["bash", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert answer["size"] == "512x384" and answer["seed"] == shown.seed == 77
    assert (tmp_path / "output.jpg").read_bytes() == download(answer["data"][0]["url"]) == download(shown.url)
    desktop.assert_clean()


def test_a_queued_prediction_shows_its_place_then_runs_and_is_canceled(
    stack: Stack, tenant: IssuedKey, client: httpx.Client, desktop: Tab
) -> None:
    blocker = start_slow_prediction(stack, client)  # the one worker is busy: the page's prediction waits
    page = open_playground(desktop, stack, tenant.key)
    label = page.locator("#progress-label")
    page.fill("#in-num_inference_steps", "50")  # long enough on the CPU to be caught running
    page.fill("#in-prompt", "a slow glacier")
    page.click("#generate-button")
    expect(label).to_have_text(re.compile(r"Queued: (next|\d+ ahead)"))  # the stream's queue position
    assert client.post(f"/v1/predictions/{blocker}/cancel").status_code == 200
    expect(label).to_have_text(re.compile(r"Step \d+ of 50"), timeout=30_000)
    page.click("#cancel-button")
    expect(label).to_have_text("Canceled: the server stopped this prediction.")
    (submitted,) = [r for r in desktop.requests if r.method == "POST" and r.url == f"{stack.api_url}/v1/predictions"]
    response = submitted.response()
    assert response is not None
    prediction_id = response.json()["id"]
    assert wait_for(stack, prediction_id)["status"] == "canceled"
    assert page.is_enabled("#generate-button") and not page.is_visible("#cancel-button")
    desktop.assert_clean()


def test_the_page_sizes_images_as_the_model_does(stack: Stack, desktop: Tab) -> None:
    """The snippets for dialects without aspect ratios carry the size the page computes: the model's."""
    desktop.page.goto(f"{stack.api_url}/")
    sizes = desktop.page.evaluate(
        """async () => {
          const snippets = await import("/static/js/request.js");
          return Object.fromEntries(snippets.RATIOS.map((ratio) => [ratio, snippets.sizeForAspectRatio(ratio)]));
        }"""
    )
    assert len(sizes) == 11
    assert {ratio: tuple(size) for ratio, size in sizes.items()} == {r: size_for_aspect_ratio(r) for r in sizes}
    desktop.assert_clean()


# How each tab of the API panel runs: a shell, Python, or Node as an ES module (fetch, and the Replicate JavaScript
# client from npm: replicate_js()).
RUNNERS: dict[str, tuple[str, list[str]]] = {
    "curl": ("snippet.sh", ["bash", "snippet.sh"]),
    "fetch": ("snippet.mjs", ["node", "snippet.mjs"]),
    "pruna": ("snippet.py", [sys.executable, "snippet.py"]),
    "replicate-python": ("snippet.py", [sys.executable, "snippet.py"]),
    "replicate-js": ("snippet.mjs", ["node", "snippet.mjs"]),
    "wavespeed": ("snippet.py", [sys.executable, "snippet.py"]),
    "openai": ("snippet.py", [sys.executable, "snippet.py"]),
    "fal": ("snippet.py", [sys.executable, "snippet.py"]),
    "bfl": ("snippet.py", [sys.executable, "snippet.py"]),
}


REPLICATE_JS = "replicate@1.4.0"


def replicate_js() -> Path:
    """The official `replicate` npm package's node_modules: installed once from the npm registry, cached under the
    gitignored .venv-clients/ (as tests/e2e/test_bfl.py keeps the blackforest client)."""
    folder = ROOT / ".venv-clients" / f"node-{REPLICATE_JS.replace('@', '-')}"
    if not (folder / "node_modules" / "replicate" / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        npm = ["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(folder), REPLICATE_JS]
        subprocess.run(npm, check=True, timeout=300)
    return folder / "node_modules"


def test_the_api_tab_runs_in_every_dialect_and_makes_the_same_picture(
    stack: Stack, tenant: IssuedKey, desktop: Tab, tmp_path: Path, tls_api: TlsApi
) -> None:
    page = open_playground(desktop, stack, tenant.key)
    page.fill("#in-prompt", TRICKY)
    page.select_option("#in-aspect_ratio", "16:9")
    page.select_option("#in-output_format", "png")  # lossless: the dialects' different JPEG qualities cannot differ
    page.fill("#in-seed", "4242")
    page.check("#seed-lock")
    # The API tab shows the form before any run.
    expect(page.locator('#api-code pre[data-dialect="curl"]')).to_contain_text('"seed":4242')
    tabs = page.locator("#api-code [role=tab]").evaluate_all("(tabs) => tabs.map((t) => t.dataset.dialect)")
    assert tabs == list(RUNNERS), tabs
    code = {d: page.text_content(f'#api-code pre[data-dialect="{d}"]') or "" for d in RUNNERS}
    page.click("#generate-button")
    shown = shown_result(page)
    assert shown.seed == 4242 and (shown.width, shown.height) == size_for_aspect_ratio("16:9")
    expected = download(shown.url)

    env = os.environ | {"KLEIN_API_KEY": tenant.key}
    # fal-client speaks https only: its snippet names this page's host, and runs here against the same stack's
    # https API (the hosts it sets by default, overridden as a user's environment would).
    tls_host = urlsplit(tls_api.url).netloc
    fal_env = {"FAL_QUEUE_RUN_HOST": tls_host, "FAL_RUN_HOST": f"{tls_host}/fal-run"}
    fal_env["SSL_CERT_FILE"] = str(tls_api.ca_file)
    assert f'"FAL_QUEUE_RUN_HOST", "{urlsplit(stack.api_url).netloc}"' in code["fal"], code["fal"]
    for dialect, (name, command) in RUNNERS.items():
        assert code[dialect] and tenant.key not in code[dialect], dialect  # the key comes from the environment
        folder = tmp_path / dialect
        folder.mkdir()
        (folder / name).write_text(code[dialect])
        if dialect == "replicate-js":  # `import Replicate from "replicate"` resolves from the snippet's folder
            (folder / "node_modules").symlink_to(replicate_js())
        run_env = env | fal_env if dialect == "fal" else env
        ran = subprocess.run(command, cwd=folder, env=run_env, capture_output=True, text=True, timeout=90)
        assert ran.returncode == 0, f"{dialect}:\n{code[dialect]}\n{ran.stdout}\n{ran.stderr}"
        assert (folder / "output.png").read_bytes() == expected, f"{dialect} made another picture:\n{code[dialect]}"
    assert json.loads((tmp_path / "curl" / "prediction.json").read_text())["input"]["prompt"] == TRICKY

    desktop.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.api_url)
    page.click('#api-code button[data-dialect="openai"]')
    assert page.is_visible('#api-code pre[data-dialect="openai"]')
    assert not page.is_visible('#api-code pre[data-dialect="curl"]')
    page.click('#api-code button[data-action="copy"]')
    expect(page.locator("#api-code [role=status]")).to_have_text("Copied.")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == page.text_content('#api-code pre[data-dialect="openai"]')
    page.fill("#in-prompt", "changed")  # the tab follows the form, and stays on the chosen client
    expect(page.locator('#api-code pre[data-dialect="openai"]')).to_contain_text('prompt="changed"')
    assert page.is_visible('#api-code pre[data-dialect="openai"]')
    desktop.assert_clean()


def test_prompts_show_as_text_and_nothing_runs_from_them(stack: Stack, tenant: IssuedKey, desktop: Tab) -> None:
    page = open_playground(desktop, stack, tenant.key)
    shown = submit_prompt(page, XSS)
    assert page.text_content("#gallery figure.run .prompt-text") == XSS
    page.click("a[data-view=history]")
    item = page.locator(f'.history-item[data-id="{shown.id}"]')
    expect(item.locator(".history-prompt")).to_have_text(XSS)
    item.click()
    expect(page.locator("#detail-prompt")).to_have_text(XSS)
    assert json.loads(page.text_content("#detail-input") or "")["prompt"] == XSS
    assert page.locator('img[src="x"]').count() == 0
    scripts = page.evaluate("() => [...document.scripts].map((s) => s.getAttribute('src'))")
    assert scripts == ["/static/js/playground.js"]
    assert desktop.dialogs == []
    desktop.assert_clean()


def test_the_pages_carry_their_policy_and_no_inline_code(stack: Stack) -> None:
    pages = {"/": "index.html", "/console": "console.html"}
    assets = ["/static/app.css", *(f"/static/js/{script.name}" for script in (STATIC / "js").glob("*.js"))]
    for path in [*pages, *assets]:
        answer = httpx.get(f"{stack.api_url}{path}")
        assert answer.status_code == 200, path
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe" not in policy, policy
    for name in pages.values():
        html = (STATIC / name).read_text()
        assert not re.search(r"<script(?![^>]*\ssrc=)", html), f"{name}: an inline script"
        assert not re.search(r"\s(style|on[a-z]+)=", html) and "<style" not in html, f"{name}: inline style or handler"
        for linked in re.findall(r'(?:src|href)="/static/([^"]+)"', html):
            assert (STATIC / linked).is_file(), linked
    for script in (STATIC / "js").glob("*.js"):
        code = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in code, f"{script.name}: {sink}"  # data goes in as text
        for module in re.findall(r'from "\./([^"]+)"', code):
            assert (STATIC / "js" / module).is_file(), f"{script.name} imports {module}"


def test_keys_are_created_with_a_name_and_expiry_and_revoked(
    stack: Stack, tenant: IssuedKey, desktop: Tab, shots: Path
) -> None:
    page = open_playground(desktop, stack, tenant.key, "keys")
    expect(page.locator(f'#keys-body tr[data-key-id="{tenant.key_id}"]')).to_contain_text("(this tab)")
    expiry = (datetime.now(UTC) + timedelta(days=400)).date().isoformat()
    page.fill("#key-name", "ci-bot")
    page.fill("#key-expiry", expiry)
    page.press("#key-name", "Enter")
    expect(page.locator("#new-key-box")).to_be_visible()
    new_key = page.text_content("#new-key") or ""

    keys = f"{stack.api_url}/v1/keys"
    listed = httpx.get(keys, headers={"apikey": new_key})
    assert listed.status_code == 200, "the new key works"
    (created,) = [key for key in listed.json()["data"] if key["name"] == "ci-bot"]
    assert created["expires_at"].startswith(expiry) and new_key.startswith(created["prefix"])
    row = page.locator(f'#keys-body tr[data-key-id="{created["id"]}"]')
    expect(row).to_contain_text(created["prefix"])
    screenshot(page, "keys-desktop", shots)

    revoke = row.locator("button")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")  # two clicks, no confirm() dialog
    revoke.click()
    expect(page.locator(f'#keys-body tr[data-key-id="{created["id"]}"]')).to_have_class("revoked")
    assert httpx.get(keys, headers={"apikey": new_key}).status_code == 401
    assert httpx.get(keys, headers={"apikey": tenant.key}).status_code == 200
    desktop.assert_clean()


def test_usage_is_charted_per_day(stack: Stack, tenant: IssuedKey, desktop: Tab, shots: Path) -> None:
    with httpx.Client(base_url=stack.api_url, headers={"apikey": tenant.key}, timeout=180) as http:
        for prompt in ("one", "two"):
            done = http.post(
                "/v1/predictions",
                headers={"Model": "flux-klein-4b", "Try-Sync": "true"},
                json={"input": {"prompt": prompt, "aspect_ratio": "1:1"}},
            )
            assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        report = http.get("/v1/usage").json()
    page = open_playground(desktop, stack, tenant.key, "usage")
    assert stats(page, "#usage-totals")["Images"] == "2"
    for row in report["days"]:  # both runs, on the day (or days, at midnight) the API counted them
        bars = page.locator(f'#usage-charts rect[data-day="{row["day"]}"]')
        expect(bars).to_have_count(2)  # images, cost
        assert float(bars.nth(0).get_attribute("data-value") or 0) == row["images"]
        assert float(bars.nth(1).get_attribute("data-value") or 0) == pytest.approx(row["amount"])
        assert float(bars.nth(0).get_attribute("height") or 0) > 0
    expect(page.locator("#usage-body tr")).to_have_count(len(report["days"]))
    screenshot(page, "usage-desktop", shots)
    desktop.assert_clean()


def test_the_console_edits_limits_and_shows_keys_queue_usage_and_failures(
    stack: Stack, tenant: IssuedKey, desktop: Tab, shots: Path
) -> None:
    failed = wait_for(stack, poison_prediction(stack, tenant))
    assert failed["status"] == "failed"
    page = desktop.page
    page.goto(f"{stack.api_url}/console")
    page.fill("#admin-key", ADMIN_KEY)
    page.press("#admin-key", "Enter")
    row = page.locator(f'#tenants-body tr[data-tenant-id="{tenant.tenant_id}"]')
    row.wait_for()
    queue = stats(page, "#queue-stats")
    assert int(queue["Live workers"]) >= 1 and {"Queued", "Priority 0", "Webhook backlog"} <= set(queue), queue
    failure = page.locator(f'#failures-body tr[data-prediction-id="{failed["id"]}"]')
    expect(failure.locator("td.error-text")).to_have_text(failed["error"])
    expect(page.locator("#console-usage-charts svg")).to_have_count(2)

    failure.get_by_role("button", name=f"Open {failed['id']}").click()  # the operator's lookup, then requeue
    expect(page.locator("#lookup-stats")).to_contain_text("failed")
    page.click("#lookup-requeue")
    expect(page.locator("#lookup-message")).to_have_text("Requeued.")
    again = prediction_row(stack, failed["id"])  # the poison fails again soon: it ran once more
    assert again["status"] != "failed" or again["completed_at"] > failed["completed_at"]

    suspend = row.locator('button[data-action="suspend"]')
    suspend.click()
    expect(suspend).to_have_text("Confirm suspend")
    suspend.click()
    expect(row.locator(".badge")).to_have_text("suspended")
    headers = {"apikey": tenant.key, "Model": "flux-klein-4b"}
    submit = httpx.post(f"{stack.api_url}/v1/predictions", headers=headers, json={"input": {"prompt": "no"}})
    assert submit.status_code == 403
    row.locator('button[data-action="suspend"]').click()  # Resume
    expect(row.locator(".badge")).to_have_count(0)

    row.locator("button", has_text="Edit").click()
    expect(page.locator(f'#tenant-keys-body tr[data-key-id="{tenant.key_id}"]')).to_be_visible()
    page.fill("#edit-rate", "77")
    page.fill("#edit-price", "0.02")
    page.click("#tenant-editor button[type=submit]")
    expect(page.locator("#editor-message")).to_have_text("Saved.")
    expect(row.locator("td").nth(1)).to_have_text("77")
    admin = {"X-Admin-Key": ADMIN_KEY}
    limits = httpx.get(f"{stack.api_url}/admin/v1/tenants/{tenant.tenant_id}", headers=admin).json()
    assert limits["rate_limit_per_minute"] == 77 and limits["price_per_image"] == 0.02
    page.fill("#edit-rate", "")  # empty: back to the platform default
    page.click("#tenant-editor button[type=submit]")
    expect(row.locator("td").nth(1)).to_have_text("default")
    limits = httpx.get(f"{stack.api_url}/admin/v1/tenants/{tenant.tenant_id}", headers=admin).json()
    assert limits["rate_limit_per_minute"] is None and limits["price_per_image"] == 0.02

    page.fill("#tenant-key-name", "ops")
    page.press("#tenant-key-name", "Enter")
    expect(page.locator("#tenant-new-key-box")).to_be_visible()
    issued = page.text_content("#tenant-new-key") or ""
    mine = httpx.get(f"{stack.api_url}/v1/keys", headers={"apikey": issued})
    assert mine.status_code == 200 and "ops" in [key["name"] for key in mine.json()["data"]]
    expect(page.locator("#tenant-keys-body tr")).to_have_count(2)
    screenshot(page, "console-desktop", shots)
    desktop.assert_clean()


def test_keyboard_only_labelled_and_readable_at_375_px(
    stack: Stack, tenant: IssuedKey, phone: Tab, shots: Path
) -> None:
    page = open_playground(phone, stack, tenant.key)
    page.focus("#in-prompt")
    page.keyboard.type("a paper boat")
    page.keyboard.press("Shift+Enter")  # a new line, not a submit
    page.keyboard.type("on a puddle")
    assert page.input_value("#in-prompt") == "a paper boat\non a puddle"
    assert not [r for r in phone.requests if r.method == "POST"]
    page.keyboard.press("Control+Enter")
    first = shown_result(page)
    page.focus("#in-prompt")
    for _ in range(60):  # Tab through the form to its submit button
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "generate-button":
            break
    else:
        pytest.fail("Tab never reached the Generate button")
    page.keyboard.press("Enter")
    shown_result(page, first.id)
    assert document_width(page) <= PHONE["width"]
    screenshot(page, "playground-mobile", shots)

    ready = {
        "history": ".history-item img",
        "keys": f'#keys-body tr[data-key-id="{tenant.key_id}"]',
        "usage": "#usage-charts svg",
    }
    for view, selector in ready.items():
        page.click(f"a[data-view={view}]")
        page.locator(selector).first.wait_for()
        if view == "history":
            page.locator(".history-item").first.click()
            wait_js(page, _IMAGE_LOADED, "#detail-image")
        assert document_width(page) <= PHONE["width"], view
        screenshot(page, f"{view}-mobile", shots)
    assert unlabeled_controls(page) == []

    page.goto(f"{stack.api_url}/console")
    page.fill("#admin-key", ADMIN_KEY)
    page.press("#admin-key", "Enter")
    page.locator(f'#tenants-body tr[data-tenant-id="{tenant.tenant_id}"] button', has_text="Edit").click()
    page.locator(f'#tenant-keys-body tr[data-key-id="{tenant.key_id}"]').wait_for()
    stats(page, "#queue-stats")
    expect(page.locator("#console-usage-charts svg")).to_have_count(2)
    assert document_width(page) <= PHONE["width"], "console"
    assert unlabeled_controls(page) == []
    screenshot(page, "console-mobile", shots)
    phone.assert_clean()


def test_history_keeps_a_predictions_loras_in_the_rerun_the_form_and_the_code(
    stack: Stack, engine: Engine, desktop: Tab
) -> None:
    owner = make_tenant(engine)
    api = httpx.Client(base_url=stack.api_url, headers={"apikey": owner.key}, timeout=180)
    uploaded = api.post("/v1/files", files={"content": ("style.safetensors", tiny_lora(1))})
    assert uploaded.status_code in (200, 201), uploaded.text
    lora = {"path": uploaded.json()["url"], "scale": 0.8}
    body = {"input": {"prompt": "a paper crane", "seed": 31, "output_format": "png", "loras": [lora]}}
    made = api.post("/v1/predictions", headers={"Model": "flux-klein-4b", "Try-Sync": "true"}, json=body).json()
    assert made["status"] == "succeeded", made
    original = api.get(made["generation_url"]).content

    page = open_playground(desktop, stack, owner.key, "history")
    page.click(f'.history-item[data-id="{made["id"]}"]')
    code = {d: page.text_content(f'#detail-code pre[data-dialect="{d}"]') or "" for d in ("curl", "pruna")}
    assert all(lora["path"] in c and "0.8" in c for c in code.values()), code
    wavespeed = page.text_content('#detail-code pre[data-dialect="wavespeed"]') or ""
    assert "flux-2-klein-4b/text-to-image-lora" in wavespeed and lora["path"] in wavespeed
    assert "takes no LoRAs" in (page.text_content('#detail-code pre[data-dialect="openai"]') or "")

    page.click("#detail-rerun")
    again = shown_result(page, made["id"])
    (sent,) = [r for r in desktop.requests if r.method == "POST" and r.url == f"{stack.api_url}/v1/predictions"]
    sent_body: dict[str, Any] = sent.post_data_json or {}
    assert sent_body["input"]["loras"] == [lora]
    assert download(again.url) == original  # the same picture, LoRA included

    page.click("a[data-view=history]")
    page.click(f'.history-item[data-id="{made["id"]}"]')
    page.click("#detail-load")
    expect(page.locator(".lora-row")).to_have_count(1)
    assert page.input_value(".lora-row .lora-path") == lora["path"]
    assert page.input_value(".lora-row .lora-scale") == "0.8"
    expect(page.locator('#api-code pre[data-dialect="curl"]')).to_contain_text(lora["path"])
    desktop.assert_clean()


def test_a_waiting_prediction_says_no_worker_keeps_its_link_and_stop_watching_differs_from_cancel(
    waiting_api: str, engine: Engine, desktop: Tab
) -> None:
    owner = make_tenant(engine)
    prediction_id = waiting_prediction(waiting_api, owner.key, "a model nobody serves yet")
    page = desktop.page
    page.goto(f"{waiting_api}/#/p/{prediction_id}")
    page.fill("#api-key", owner.key)
    page.press("#api-key", "Enter")
    label = page.locator("#progress-label")
    expect(label).to_contain_text("No worker is online for this model", timeout=5_000)
    expect(page.locator("#in-prompt")).to_have_value("a model nobody serves yet")
    expect(page.locator("#model")).to_have_value("flux-klein-4b-base")

    page.click("#stop-button")  # lets go of it: the prediction goes on
    expect(label).to_contain_text("Stopped watching: the prediction goes on")
    assert server_status(waiting_api, owner.key, prediction_id) == "starting"

    page.reload()  # the link (and the key, in sessionStorage) survive: the page follows it again
    assert page.evaluate("() => location.hash") == f"#/p/{prediction_id}"
    expect(label).to_contain_text("No worker is online for this model", timeout=5_000)
    page.click("#cancel-button")
    expect(label).to_have_text("Canceled: the server stopped this prediction.")
    assert server_status(waiting_api, owner.key, prediction_id) == "canceled"
    desktop.assert_clean()


_IN_VIEW = """() => {
  const box = document.getElementById("detail").getBoundingClientRect();
  return box.top > -1 && box.top < window.innerHeight - 80;  // its top, and some of it, on screen
}"""


def test_a_history_items_details_scroll_into_view(waiting_api: str, engine: Engine, browser: Browser) -> None:
    owner = make_tenant(engine)
    ids = []
    for n in range(13):  # one more than a page; canceled at once, as nothing runs them
        ids.append(waiting_prediction(waiting_api, owner.key, f"row {n}"))
        cancel = httpx.post(f"{waiting_api}/v1/predictions/{ids[-1]}/cancel", headers={"apikey": owner.key})
        assert cancel.status_code == 200, cancel.text
    live = waiting_prediction(waiting_api, owner.key, "still queued")  # the newest, the first row
    for viewport, more in ((DESKTOP, True), (PHONE, False)):
        tab = Tab.open(browser, viewport)
        page = tab.page
        page.goto(f"{waiting_api}/#history")
        page.fill("#api-key", owner.key)
        page.press("#api-key", "Enter")
        if more:  # the oldest, on the second page, far below the details
            page.click("#history-more")
        target = ids[0] if more else live  # at 375 px the first row sits above the details
        page.click(f'.history-item[data-id="{target}"]')
        page.locator(f'#detail[data-id="{target}"]').wait_for()
        assert wait_js(page, _IN_VIEW, timeout=5), viewport
        if more:  # the queued one ends: the list is read again and keeps the second page it showed
            cancel = httpx.post(f"{waiting_api}/v1/predictions/{live}/cancel", headers={"apikey": owner.key})
            assert cancel.status_code == 200, cancel.text
            expect(page.locator(f'#history-list li[data-id="{live}"]')).to_have_attribute("data-status", "canceled")
            expect(page.locator("#history-list li[data-id]")).to_have_count(14)
        tab.assert_clean()
        tab.close()


def _local_only(route: Route) -> None:
    host = route.request.url.split("/")[2].split(":")[0]
    if host in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


def test_docs_render_offline_and_the_prompt_stops_at_the_apis_limit(
    stack: Stack, tenant: IssuedKey, desktop: Tab
) -> None:
    desktop.context.route("**/*", _local_only)  # no internet
    page = open_playground(desktop, stack, tenant.key)
    page.fill("#in-prompt", "x" * 5000)
    assert page.evaluate("() => document.getElementById('in-prompt').value.length") == 4096
    expect(page.locator("#prompt-count")).to_have_text("4,096 / 4,096 characters")

    # The API's own refusal, if a longer prompt gets through, reads as a sentence next to the form.
    page.evaluate("() => document.getElementById('in-prompt').removeAttribute('maxlength')")
    page.fill("#in-prompt", "x" * 4097)
    page.click("#generate-button")
    expect(page.locator("#form-message")).to_have_text("Prompt: too long, at most 4,096 characters.")
    expect(page.locator("#result-error")).to_have_text("")

    page.click("a[href='/docs']")
    expect(page.locator(".swagger-ui .info .title")).to_be_visible(timeout=15_000)
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
    assert not [r.url for r in desktop.requests if not r.url.startswith(stack.api_url)]
    assert desktop.dialogs == desktop.policy_violations == []
    assert [e for e in desktop.errors if "status of 422" not in e] == []  # the refused prompt, logged by Chromium
