"""The klein family routed by model: each model its own worker pool and queue, its own defaults; a model no pool
serves is refused at submit. The tiny pipeline stands in for both (undistilled for the base model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.tenants import IssuedKey
from ops.embedded import Service, start_api, start_worker
from tests.conftest import Stack


@pytest.fixture(scope="module")
def family(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Service]]:
    """An API serving both models, and a worker of the base model (the session's worker serves the default)."""
    from models.tiny import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("logs")
    base_weights = save_tiny_pipeline(tmp_path_factory.mktemp("tiny-base"), distilled=False)
    env = stack.env | {"KLEIN_SERVED_MODELS": '["flux-klein-4b", "flux-klein-4b-base"]'}
    worker_env = env | {"KLEIN_MODEL_ID": "flux-klein-4b-base", "KLEIN_MODEL_PATH": str(base_weights)}
    worker = start_worker(worker_env | {"KLEIN_WORKER_METRICS_PORT": "0"}, folder / "base-worker.log", "base")
    api, url = start_api(env, folder / "api.log")
    try:
        yield url, worker
    finally:
        api.stop()
        worker.stop()


def submit(url: str, key: str, model: str, **input: object) -> httpx.Response:
    headers = {"apikey": key, "Model": model, "Try-Sync": "true"}
    return httpx.post(f"{url}/v1/predictions", headers=headers, json={"input": input}, timeout=90)


def test_each_model_runs_on_its_own_pool_with_its_own_defaults(
    family: tuple[str, Service], stack: Stack, tenant: IssuedKey
) -> None:
    url, base_worker = family
    base = submit(url, tenant.key, "black-forest-labs/flux-2-klein-4b-base", prompt="a fox", num_inference_steps=2)
    distilled = submit(url, tenant.key, "flux-2-klein-4b", prompt="a fox")
    assert base.status_code == 200 and base.json()["status"] == "succeeded", base.text
    assert distilled.status_code == 200 and distilled.json()["status"] == "succeeded", distilled.text
    assert base.json()["model"] == "flux-klein-4b-base" and distilled.json()["model"] == "flux-klein-4b"
    assert base_worker.process is not None
    claimed = {body["id"]: body["logs"][1]["message"] for body in (base.json(), distilled.json())}
    assert f":{base_worker.process.pid}:" in claimed[base.json()["id"]]  # "claimed by worker host:pid:…"
    assert f":{base_worker.process.pid}:" not in claimed[distilled.json()["id"]]  # the session's worker

    # Defaults are the model's: 50 steps and guidance 4 for the base model, 4 and 1 for the distilled one.
    headers = {"apikey": tenant.key, "Model": "flux-klein-4b-base"}
    queued = httpx.post(f"{url}/v1/predictions", headers=headers, json={"input": {"prompt": "x"}}, timeout=30).json()
    httpx.post(f"{url}/v1/predictions/{queued['id']}/cancel", headers={"apikey": tenant.key}, timeout=30)
    with stack.engine.connect() as conn:
        from sqlalchemy import select

        from core.tables import predictions

        params = conn.execute(select(predictions.c.params).where(predictions.c.id == queued["id"])).scalar_one()
    assert (params["num_inference_steps"], params["guidance_scale"]) == (50, 4.0)
    described = httpx.get(f"{url}/v1/models/flux-klein-4b-base", timeout=30).json()
    assert described["defaults"] == {"num_inference_steps": 50, "guidance": 4.0} and described["distilled"] is False


def test_a_model_no_pool_serves_is_refused_at_submit_with_the_served_list(client: httpx.Client) -> None:
    """The session's API serves the default model only (KLEIN_SERVED_MODELS)."""
    refused = client.post(
        "/v1/predictions", headers={"Model": "flux-klein-4b-base"}, json={"input": {"prompt": "a fox"}}
    )
    assert refused.status_code == 404, refused.text
    assert "not served by this deployment; served: flux-klein-4b" in refused.json()["error"]
    assert refused.json()["served_models"] == ["flux-klein-4b"]
    generate = client.post("/v1/generate", json={"prompt": "a fox", "model": "flux-2-klein-4b-base"})
    assert generate.status_code == 422 and "model: model 'flux-klein-4b-base' is not served" in generate.text


def test_a_worker_refuses_weights_of_the_other_kind(tiny_model: Path) -> None:
    """Distilled weights served as the base model: a clear error at load, not wrong images."""
    from core.settings import Settings
    from models.klein_pipeline import KleinPipeline

    with pytest.raises(ValueError, match="flux-klein-4b-base is undistilled"):
        KleinPipeline(str(tiny_model), "cpu", Settings(model_id="flux-klein-4b-base"))
