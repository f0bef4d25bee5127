"""The prompt enhancer end to end (docs/enhancer.md), on a database and queues of this module's own:

- `local`: an API and a GPU worker whose tiny Qwen3 (random weights: noise words) rewrites through the real path;
  the standalone endpoint (Try-Sync and async), predictions with `enhance_prompt`, the same seed and rewrite giving
  the same image, billing at the tenant's price.
- `openai`: an API and a worker calling a real OpenAI-compatible server this module starts (tests/openai_server.py:
  FastAPI serving the tiny pipeline's Qwen3 through transformers' `generate`), allow-listed; the SSRF guard without
  the allow-list; `true` against `"best_effort"` once that server is gone.
- `off`: an API answering 501 and saying so in GET /v1/models.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect
from sqlalchemy import Engine, func, select

from core import enhance
from core.db import make_sync_engine
from core.settings import Settings
from core.tables import enhancements, predictions
from core.tenants import IssuedKey
from ops.embedded import Service, free_port, start_api, start_worker, wait_until
from ops.migrate import migrate
from tests.browser import DESKTOP, Tab
from tests.conftest import make_tenant
from tests.stack import create_database, drop_database

TOKENS = 6  # new tokens per rewrite: the tiny model takes ~0.1 s a token on a loaded 2-core machine
PRUNA = {"Model": "flux-klein-4b", "Try-Sync": "true"}


@dataclass
class Deployment:
    env: dict[str, str]
    engine: Engine
    local: str  # API URLs
    openai: str
    off: str
    lm: Service  # the OpenAI-compatible server
    lm_url: str


@pytest.fixture(scope="module")
def deployment(
    settings_env: dict[str, str], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("enhance")
    database = f"klein_test_enhance_{secrets.token_hex(4)}"
    database_url = create_database(database)
    migrate(Settings(database_url=database_url).sync_database_url)
    engine = make_sync_engine(Settings(database_url=database_url))
    queue = settings_env["KLEIN_QUEUE_NAME"] + "-enhance"
    base = settings_env | {
        "KLEIN_DATABASE_URL": database_url,
        "KLEIN_WORKER_METRICS_PORT": "0",
        "KLEIN_ENHANCER_MAX_TOKENS": str(TOKENS),
        "KLEIN_ENHANCER_API_KEY": "sk-test-enhancer",
    }
    port = free_port()
    lm_url = f"http://127.0.0.1:{port}"
    server = [sys.executable, "-m", "uvicorn", "tests.openai_server:app", "--port", str(port), "--log-level", "warning"]
    lm = Service(server, settings_env | {"KLEIN_TEST_LM": str(tiny_model)}, folder / "lm.log").start()
    services: list[Service] = [lm]
    try:
        local = base | {"KLEIN_QUEUE_NAME": queue, "KLEIN_ENHANCER": "local"}
        remote = base | {
            "KLEIN_QUEUE_NAME": queue + "-openai",
            "KLEIN_ENHANCER": "openai",
            "KLEIN_ENHANCER_URL": f"{lm_url}/v1",
            "KLEIN_ENHANCER_MODEL": "tiny-qwen3",
            "KLEIN_ENHANCER_ALLOWLIST": '["127.0.0.1/32"]',
        }
        off = base | {"KLEIN_QUEUE_NAME": queue + "-off", "KLEIN_ENHANCER": "off"}
        services.append(start_worker(local, folder / "local-worker.log", "enhance-local"))
        services.append(start_worker(remote, folder / "openai-worker.log", "enhance-openai"))
        urls: dict[str, str] = {}
        for name, env in (("local", local), ("openai", remote), ("off", off)):
            api, url = start_api(env, folder / f"{name}-api.log")
            services.append(api)
            urls[name] = url

        def lm_ready() -> bool:
            lm.ensure_alive("OpenAI-compatible server")
            try:
                return httpx.get(f"{lm_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lm_ready, 120, "OpenAI-compatible server", folder / "lm.log")
        yield Deployment(base, engine, urls["local"], urls["openai"], urls["off"], lm, lm_url)
    finally:
        for service in services:
            service.stop()
        engine.dispose()
        drop_database(database)


def client(url: str, key: IssuedKey) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"apikey": key.key}, timeout=180)


def rewrite(http: httpx.Client, prompt: str, **fields: Any) -> dict[str, Any]:
    answer = http.post("/v1/prompts/enhance", json={"prompt": prompt, **fields}, headers={"Try-Sync": "true"})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_local_rewrites_through_the_worker_and_are_billed(deployment: Deployment) -> None:
    key = make_tenant(deployment.engine, price_per_enhancement=0.25)
    with client(deployment.local, key) as http:
        first = rewrite(http, "a red fox in snow", style="photo")
        assert first["status"] == "succeeded" and first["original"] == "a red fox in snow"
        assert first["prompt"] and first["prompt"] != first["original"] and len(first["prompt"]) <= TOKENS * 4
        assert first["model"] == "flux-klein-4b text encoder (Qwen3)" and first["style"] == "photo"
        assert {"queue_ms", "enhance_ms", "total_ms"} <= set(first["timings"]) and first["error"] is None
        # Asynchronously: 201 and a get_url that ends with the same rewrite (greedy: deterministic).
        queued = http.post("/v1/prompts/enhance", json={"prompt": "a red fox in snow", "style": "photo"})
        assert queued.status_code == 201 and queued.json()["status"] in ("starting", "processing", "succeeded")
        url = queued.json()["get_url"]
        wait_until(lambda: http.get(url).json()["status"] == "succeeded", 120, "the queued rewrite")
        assert http.get(url).json()["prompt"] == first["prompt"]
        other = make_tenant(deployment.engine)
        with client(deployment.local, other) as stranger:
            assert stranger.get(url).status_code == 404  # another tenant's job
            assert stranger.get("/v1/usage").json()["enhancements"]["total"] == {"enhancements": 0, "amount": 0}
        assert http.get("/v1/usage").json()["enhancements"]["total"] == {"enhancements": 2, "amount": 0.5}
    with deployment.engine.connect() as conn:
        rows = conn.execute(select(enhancements).where(enhancements.c.tenant_id == key.tenant_id)).mappings().all()
    assert len(rows) == 2 and all(row["amount"] == Decimal("0.25") and row["tokens"] == TOKENS for row in rows)


def test_a_prediction_is_generated_from_its_rewrite_and_reproducible(deployment: Deployment) -> None:
    key = make_tenant(deployment.engine)
    with client(deployment.local, key) as http:
        asked = {"prompt": "a lighthouse at night", "seed": 42, "aspect_ratio": "1:1", "output_format": "png"}
        done = http.post("/v1/predictions", json={"input": asked | {"enhance_prompt": True}}, headers=PRUNA).json()
        assert done["status"] == "succeeded", done
        assert done["input"]["prompt"] == "a lighthouse at night" and done["input"]["enhance_prompt"] is True
        assert done["enhanced_prompt"] == rewrite(http, "a lighthouse at night")["prompt"]
        assert done["timings"]["enhance_ms"] >= 0
        assert http.get(done["get_url"]).json()["enhanced_prompt"] == done["enhanced_prompt"]
        # The same seed and the rewrite as the prompt: the same image; the original prompt: another one.
        again = http.post("/v1/predictions", json={"input": asked | {"prompt": done["enhanced_prompt"]}}, headers=PRUNA)
        plain = http.post("/v1/predictions", json={"input": asked}, headers=PRUNA).json()
        assert "enhanced_prompt" not in plain
        images = [http.get(body["generation_url"]).content for body in (done, again.json(), plain)]
    assert images[0] == images[1] and images[0] != images[2]
    with deployment.engine.connect() as conn:
        row = conn.execute(select(predictions).where(predictions.c.id == done["id"])).mappings().one()
        linked = conn.execute(select(func.count()).where(enhancements.c.prediction_id == done["id"])).scalar()
    assert row["enhanced_prompt"] == done["enhanced_prompt"] and row["params"]["prompt"] == "a lighthouse at night"
    assert any("prompt enhanced by" in line["message"] for line in row["logs"]) and linked == 1


def test_bad_requests_are_refused_naming_the_field(deployment: Deployment) -> None:
    key = make_tenant(deployment.engine)
    with client(deployment.local, key) as http:
        bad_style = http.post("/v1/prompts/enhance", json={"prompt": "a fox", "style": "vaporwave"})
        assert bad_style.status_code == 422 and "style" in bad_style.json()["error"]
        blank = http.post("/v1/prompts/enhance", json={"prompt": "   "})
        assert blank.status_code == 422 and "prompt" in blank.json()["error"]
        maybe = {"input": {"prompt": "a fox", "enhance_prompt": "maybe"}}
        flag = http.post("/v1/predictions", json=maybe, headers=PRUNA)
        assert flag.status_code == 422 and "input.enhance_prompt" in flag.json()["error"]
        unknown = http.post("/v1/prompts/enhance", json={"prompt": "a fox", "model": "sdxl"})
        assert unknown.status_code == 422 and "model" in unknown.json()["error"]
        assert http.get("/v1/prompts/enhance/nope").status_code == 404
    with deployment.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(enhancements.c.tenant_id == key.tenant_id)).scalar() == 0


def test_off_answers_501_and_the_models_say_so(deployment: Deployment) -> None:
    key = make_tenant(deployment.engine)
    with client(deployment.off, key) as http:
        refused = http.post("/v1/prompts/enhance", json={"prompt": "a fox"})
        assert refused.status_code == 501
        assert refused.json() == {"error": "prompt enhancement is off on this deployment (KLEIN_ENHANCER=off)",
                                  "enhancer": "off"}  # fmt: skip
        asked = {"input": {"prompt": "a fox", "enhance_prompt": True}}
        strict = http.post("/v1/predictions", json=asked, headers=PRUNA)
        assert strict.status_code == 501 and "KLEIN_ENHANCER=off" in strict.json()["error"]
        (model,) = [m for m in http.get("/v1/models").json()["data"] if m["id"] == "flux-klein-4b"]
        assert model["prompt_enhancer"]["enabled"] is False and model["prompt_enhancer"]["backend"] == "off"
    with client(deployment.local, key) as http:
        (model,) = [m for m in http.get("/v1/models").json()["data"] if m["id"] == "flux-klein-4b"]
        assert model["prompt_enhancer"]["backend"] == "local" and "noise" in model["prompt_enhancer"]["warning"]
    with deployment.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(predictions.c.tenant_id == key.tenant_id)).scalar() == 0


def test_the_playground_shows_the_rewrite_to_edit_and_use(deployment: Deployment, browser: Browser) -> None:
    key = make_tenant(deployment.engine)
    tab = Tab.open(browser, DESKTOP)
    try:
        page = tab.page
        page.goto(f"{deployment.local}/#generate")
        page.fill("#api-key", key.key)
        page.press("#api-key", "Enter")
        expect(page.locator("#enhance-note")).to_contain_text("noise words")  # the tiny Qwen3 says so
        page.fill("#in-prompt", "a red fox in snow")
        page.click("#enhance-button")
        expect(page.locator("#enhance-panel")).to_be_visible(timeout=120_000)
        with client(deployment.local, key) as http:
            assert page.input_value("#enhanced-prompt") == rewrite(http, "a red fox in snow")["prompt"]
        page.fill("#enhanced-prompt", "a red fox in fresh snow, edited")
        page.click("#enhance-use")
        assert page.input_value("#in-prompt") == "a red fox in fresh snow, edited"
        expect(page.locator("#enhance-panel")).to_be_hidden()
        tab.assert_clean()
    finally:
        tab.close()
    off = Tab.open(browser, DESKTOP)
    try:
        off.page.goto(f"{deployment.off}/#generate")
        expect(off.page.locator("#enhance-state")).to_have_text("Prompt enhancement is off on this deployment.")
        expect(off.page.locator("#enhance-button")).to_be_hidden()
        off.assert_clean()
    finally:
        off.close()


def test_openai_backend_asks_a_real_server(deployment: Deployment, tiny_model: Path) -> None:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from models.enhancer import LocalEnhancer

    key = make_tenant(deployment.engine)
    with client(deployment.openai, key) as http:
        done = rewrite(http, "a castle on a hill", style="painting")
    assert done["status"] == "succeeded" and done["model"] == "tiny-qwen3" and done["timings"]["enhance_ms"] >= 0
    asked = httpx.get(f"{deployment.lm_url}/requests").json()[-1]
    body = asked["body"]
    assert asked["authorization"] == "Bearer sk-test-enhancer"
    assert body["messages"] == enhance.messages("a castle on a hill", "painting")
    assert body["temperature"] == 0 and body["max_tokens"] == TOKENS
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    # What the server's model says to that conversation, computed here from the same weights.
    same = LocalEnhancer(
        Qwen3ForCausalLM.from_pretrained(tiny_model / "text_encoder").eval(),
        AutoTokenizer.from_pretrained(tiny_model / "tokenizer"),
        TOKENS,
        "here",
    )
    assert done["prompt"] == same.enhance(body["messages"]).prompt


def test_the_endpoint_passes_the_ssrf_guard_unless_allow_listed(deployment: Deployment) -> None:
    unlisted = Settings(enhancer="openai", enhancer_url=f"{deployment.lm_url}/v1", enhancer_max_tokens=TOKENS)
    with pytest.raises(enhance.EnhanceFailed, match="non-public address"):
        enhance.openai_chat(unlisted, enhance.messages("a fox"))
    listed = unlisted.model_copy(update={"enhancer_allowlist": ["127.0.0.1"]})
    assert enhance.openai_chat(listed, enhance.messages("a fox")).prompt


def test_strict_fails_and_best_effort_generates_from_the_original_when_the_enhancer_fails(
    deployment: Deployment,
) -> None:
    deployment.lm.stop()  # the operator's chat server is gone (last test of the module: it stays gone)
    key = make_tenant(deployment.engine)
    asked = {"prompt": "a red barn", "seed": 3, "aspect_ratio": "1:1"}
    with client(deployment.openai, key) as http:
        strict = http.post("/v1/predictions", json={"input": asked | {"enhance_prompt": True}}, headers=PRUNA).json()
        effort = http.post(
            "/v1/predictions", json={"input": asked | {"enhance_prompt": "best_effort"}}, headers=PRUNA
        ).json()
        status = http.get(effort["get_url"]).json()
    assert strict["status"] == "failed"
    assert strict["error"] == "the prompt enhancer's endpoint could not be reached (ConnectError)"
    assert effort["status"] == "succeeded" and effort["enhanced_prompt"] is None
    assert status["status"] == "succeeded"
    with deployment.engine.connect() as conn:
        logged = conn.execute(select(predictions.c.logs).where(predictions.c.id == effort["id"])).scalar_one()
        billed = conn.execute(select(func.count()).where(enhancements.c.tenant_id == key.tenant_id)).scalar()
    assert any("prompt not enhanced" in line["message"] for line in logged) and billed == 0
