"""Fixtures the end-to-end files share."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from ops.embedded import Service, free_port, wait_until
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


@pytest.fixture(scope="module")
def tls_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsApi]:
    """One more API process on the session's stack, serving HTTPS with a certificate of a test CA."""
    certificates = make_certificates(tmp_path_factory.mktemp("tls"))
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(port)]
    args += ["--ssl-keyfile", str(certificates["server.key"]), "--ssl-certfile", str(certificates["server.crt"])]
    args += ["--timeout-graceful-shutdown", "3"]  # uvicorn waits on idle TLS keep-alive connections otherwise
    log = stack.logs / f"tls-api-{port}.log"
    api = Service([*args, "--log-level", "warning"], stack.env, log).start()
    ca = ssl.create_default_context(cafile=str(certificates["ca.crt"]))
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        api.ensure_alive("TLS API")
        try:
            return httpx.get(f"{url}/readyz", verify=ca, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "TLS API", log)
        yield TlsApi(url, ca)
    finally:
        api.stop()
