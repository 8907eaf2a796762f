"""Browser tests: Playwright driving Debian's /usr/bin/chromium (never a downloaded browser)
against daphne and a Celery worker running on the test database."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import REPO_ROOT, free_port, start_daphne, wait_for_http

CHROMIUM = os.environ.get("NASWEB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
    "--no-first-run",
]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"Debian chromium not installed at {CHROMIUM} (.ci/run installs it with apt)")
    return CHROMIUM


@pytest.fixture(scope="session")
def daphne_server(django_db_setup, django_db_blocker, tmp_path_factory, celery_worker_process):
    with django_db_blocker.unblock():
        port = free_port()
        web = start_daphne(port, tmp_path_factory.mktemp("daphne") / "daphne.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/accounts/login/", timeout=90, child=web)
    except Exception:
        web.stop()
        raise
    yield url
    web.stop()


@pytest.fixture
def browser_page(chromium_path, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are
    # still plain synchronous code, which Django would otherwise refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.js_errors = errors
        yield page
        context.close()
        browser.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # "disabled" fast-forwards finished CSS transitions: a progress bar caught mid-way after a
    # reload looked like an unfinished job in the docs.
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True, animations="disabled")


def login(page, base_url: str, username: str, password: str) -> None:
    page.goto(f"{base_url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/")
