"""A user registers a board in the browser, runs the real agent, and watches profiling finish live."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model

from tests.browser.conftest import login, screenshot
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.slow]


def test_register_a_board_run_its_agent_and_watch_profiling(daphne_server, browser_page, tmp_path):
    get_user_model().objects.create_user("engineer", password="engineer-pw-123")
    page = browser_page
    login(page, daphne_server, "engineer", "engineer-pw-123")
    screenshot(page, "dashboard")

    page.click("text=Devices")
    page.click("text=Register a board")
    page.fill("input[name=name]", "Raspberry Pi 4B (lab)")
    page.select_option("select[name=preset]", "tiny")
    page.click("#register-board")
    token = page.inner_text("#device-token").strip()
    command = page.inner_text("#agent-command").strip()
    assert re.fullmatch(r"[A-Za-z0-9_\-]{40,}", token)
    assert f"--token {token}" in command and command.startswith("curl ")
    screenshot(page, "board-registered")

    # Run the agent the way the page says, minus the download (the file is the one the server serves).
    agent_file = tmp_path / "nasweb_agent.py"
    download = subprocess.run(
        shlex.split(command.split("&&")[0]), cwd=tmp_path, capture_output=True, timeout=60
    )
    assert download.returncode == 0, download.stderr
    assert agent_file.read_bytes() == (REPO_ROOT / "engine" / "agent" / "nasweb_agent.py").read_bytes()
    page.click("#device-page")
    page.wait_for_selector("html[data-live-sockets]")  # subscribed to the job's progress
    agent = subprocess.Popen(
        [
            sys.executable,
            str(agent_file),
            "--server",
            daphne_server,
            "--token",
            token,
            "--once",
            "--batch",
            "6",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The progress bar turns green from the websocket alone, then the page reloads with the table.
        page.wait_for_selector(
            ".progress[data-status=succeeded]", timeout=420_000
        )  # generous: CI machines are shared
        assert page.query_selector("#lut-chart") is None  # not reloaded yet: that was a live update
        page.wait_for_selector("#lut-chart .main-svg", timeout=60_000)
        assert agent.wait(timeout=120) == 0, agent.stdout.read().decode()
    finally:
        if agent.poll() is None:
            agent.kill()
    page.wait_for_selector("#accuracy-chart .main-svg")
    assert "Ready" in page.inner_text("#device-status")
    assert "sub-nets" in page.inner_text("#lut-accuracy")
    screenshot(page, "device-detail")
    assert page.js_errors == []
