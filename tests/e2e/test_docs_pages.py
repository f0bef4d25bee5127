"""The API reference, `/docs` (Swagger UI): served from this origin only, under the playground's
Content-Security-Policy, and working in a real Chromium with every other host out of reach."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
from playwright.sync_api import Browser, Route

from api.routes.web import CSP
from tests.browser import DESKTOP, Tab, wait_js
from tests.conftest import Stack

SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.S | re.I)


def test_the_reference_loads_only_this_origins_scripts_under_the_policy(stack: Stack) -> None:
    path = "/docs"
    page = httpx.get(stack.api_url + path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    scripts = SCRIPT.findall(page.text)
    assert scripts, "the page loads its scripts"
    for attributes, body in scripts:
        assert body.strip() == "", "no inline script"
        (src,) = re.findall(r'src="([^"]+)"', attributes)
        url = urljoin(stack.api_url + path, src)
        assert urlsplit(url).netloc == urlsplit(stack.api_url).netloc, src
        asset = httpx.get(url)
        assert asset.status_code == 200, src
        assert asset.headers["content-type"].startswith("text/javascript"), (src, asset.headers["content-type"])
        assert asset.headers["content-security-policy"] == CSP and len(asset.content) > 0
    (css,) = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page.text)
    style = httpx.get(stack.api_url + css)
    assert (
        css.startswith("/static/") and style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    )


def test_the_reference_renders_offline_in_chromium(stack: Stack, browser: Browser) -> None:
    """Every request to another host is recorded and refused: the page still lists the operations, and the
    browser reports no policy violation and no error."""
    origin = urlsplit(stack.api_url).netloc
    elsewhere: list[str] = []

    def only_this_origin(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == origin or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    tab = Tab.open(browser, DESKTOP)
    try:
        tab.context.route("**/*", only_this_origin)
        tab.page.goto(stack.api_url + "/redoc")  # leads to /docs
        assert tab.page.url == stack.api_url + "/docs"
        operations = wait_js(tab.page, "() => document.querySelectorAll('#swagger-ui .opblock').length")
        assert operations > 20, operations  # the platform has dozens; a stub page would show none
        assert elsewhere == []
        tab.assert_clean()
    finally:
        tab.close()
