"""The official `pruna-client` from PyPI, pointed at our server, in both modes."""

from __future__ import annotations

import io

from PIL import Image
from pruna_client import PrunaClient
from pruna_client.models import PredictionStatus

from core.tenants import IssuedKey
from tests.conftest import Stack


def pruna(stack: Stack, tenant: IssuedKey) -> PrunaClient:
    client = PrunaClient(api_key=tenant.key, timeout=180)
    client.base_url = f"{stack.api_url}/v1"
    return client


def test_pruna_client_sync_text_to_image(stack: Stack, tenant: IssuedKey) -> None:
    with pruna(stack, tenant) as client:
        response = client.generate_text_to_image("flux-klein-4b", "a red fox in snow", aspect_ratio="3:2", seed=3)
        assert response.status == PredictionStatus.SUCCEEDED, response.response
        image = Image.open(io.BytesIO(client.download_content(response.response["generation_url"])))
        assert image.size == (1248, 832)


def test_pruna_client_async_text_to_image(stack: Stack, tenant: IssuedKey) -> None:
    with pruna(stack, tenant) as client:
        pending = client.generate_text_to_image("flux-klein-4b", "a lighthouse", sync=False, output_format="webp")
        assert pending.status == PredictionStatus.STARTING
        final = client.poll_status(response=pending)
        assert final.status == PredictionStatus.SUCCEEDED, final.response
        assert final.id == pending.id
        content = client.download_content(final.response["generation_url"])
        assert Image.open(io.BytesIO(content)).format == "WEBP"


def test_pruna_client_sees_validation_errors_as_failed(stack: Stack, tenant: IssuedKey) -> None:
    with pruna(stack, tenant) as client:
        response = client.generate_text_to_image("flux-klein-4b", "a cat", aspect_ratio="5:7")
        assert response.status == PredictionStatus.FAILED
        assert "aspect_ratio" in response.response["error"]
