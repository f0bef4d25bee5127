"""The web pages in a real browser: Debian's Chromium driven by Playwright (whose own browser download needs the
internet; `bash deploy/local.sh test` installs the system one)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, Playwright, Request, ViewportSize

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("KLEIN_TEST_CHROMIUM", "/usr/bin/chromium"))
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 375, "height": 740}


def launch(playwright: Playwright) -> Browser:
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


@dataclass
class Tab:
    """A page in its own context (its own sessionStorage), and what it did that a test must see or not see."""

    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console errors
    policy_violations: list[str] = field(default_factory=list)  # what the Content-Security-Policy blocked
    requests: list[Request] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Browser, viewport: ViewportSize) -> Tab:
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        tab = cls(context, context.new_page())
        tab.page.on("dialog", tab._dialog)
        tab.page.on("console", tab._console)
        tab.page.on("pageerror", lambda error: tab.errors.append(f"uncaught: {error}"))
        tab.page.on("request", lambda request: tab.requests.append(request))
        return tab

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.policy_violations.append(message.text)
        elif message.type == "error":
            self.errors.append(message.text)

    def assert_clean(self) -> None:
        assert self.dialogs == [], self.dialogs
        assert self.policy_violations == [], self.policy_violations
        assert self.errors == [], self.errors

    def close(self) -> None:
        self.context.close()


def wait_js(page: Page, expression: str, arg: Any = None, timeout: float = 30) -> Any:
    """Poll `expression` (a JS function of `arg`) until it returns something truthy, and return that. Playwright's
    wait_for_function compiles its predicate with eval inside the page, which the pages' policy forbids;
    page.evaluate goes through the debugging protocol instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {expression}")
        time.sleep(0.1)


def unlabeled_controls(page: Page) -> list[str]:
    """Inputs, selects and textareas a screen reader would announce without a name."""
    result: list[str] = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
            .filter((el) => el.type !== "hidden")
            .filter((el) => !el.labels?.length && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
            .map((el) => el.outerHTML)"""
    )
    return result


def document_width(page: Page) -> int:
    """The document's scrollable width: at most the viewport's when nothing scrolls sideways."""
    width: int = page.evaluate("() => document.documentElement.scrollWidth")
    return width


def screenshot(page: Page, name: str, folder: Path) -> Path:
    """The whole page as `name`.png in `folder`; with KLEIN_UPDATE_SCREENSHOTS=1 also over the copy of that name
    in docs/screenshots/ (the ones chosen for the documentation), so that ordinary runs change no tracked file."""
    path = folder / f"{name}.png"
    page.evaluate("() => document.querySelectorAll('.table-wrap').forEach((box) => (box.scrollLeft = 0))")
    page.screenshot(path=str(path), full_page=True)
    kept = DOCS_SCREENSHOTS / path.name
    if os.environ.get("KLEIN_UPDATE_SCREENSHOTS") == "1" and kept.exists():
        shutil.copyfile(path, kept)
    return path
