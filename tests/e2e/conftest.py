"""Fixtures the end-to-end files share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser import CHROMIUM, launch


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (bash deploy/local.sh test does)")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()
