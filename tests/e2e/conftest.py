"""Fixtures the end-to-end files share."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from ops.embedded import start_api
from tests.browser import CHROMIUM, launch
from tests.conftest import Stack
from tests.e2e.test_redis_deployments import make_certificates


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (bash deploy/local.sh test does)")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@dataclass
class TlsApi:
    url: str
    ca: ssl.SSLContext
    ca_file: Path


@pytest.fixture(scope="module")
def tls_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsApi]:
    """One more API process on the session's stack serving https itself, as `klein up --tls-cert --tls-key` starts
    it (KLEIN_TLS_CERT, KLEIN_TLS_KEY), with a certificate of a test CA that the clients trust."""
    certificates = make_certificates(tmp_path_factory.mktemp("tls"))
    tls = {"KLEIN_TLS_CERT": str(certificates["server.crt"]), "KLEIN_TLS_KEY": str(certificates["server.key"])}
    api, url = start_api(stack.env | tls, stack.logs / "tls-api.log")
    ca = ssl.create_default_context(cafile=str(certificates["ca.crt"]))
    try:
        assert url.startswith("https://") and httpx.get(f"{url}/readyz", verify=ca).status_code == 200
        yield TlsApi(url, ca, certificates["ca.crt"])
    finally:
        api.stop()
