"""A user registers a board in the browser, runs the real agent, and watches profiling finish live."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model

from devices.services import seed_builtin_devices
from tests.browser.conftest import login, screenshot
from tests.conftest import REPO_ROOT

# Longer than the suite's 300 s per test: its inner waits allow a loaded CI machine 7 minutes.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


def test_register_a_board_run_its_agent_and_watch_profiling(daphne_server, browser_page, tmp_path):
    seed_builtin_devices()  # as `make run` does: the dashboard lists this server's devices
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
    page.evaluate("window.firstDocument = true")  # gone once the page reloads
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
        # Checked inside the page, so a slow test process cannot miss the live update: the bar
        # turned green in the document that was loaded before the job ran (generous timeout:
        # CI machines are shared).
        page.wait_for_function(
            "() => window.firstDocument === true"
            " && document.querySelector('.progress[data-status=succeeded]') !== null"
            " && document.querySelector('#lut-chart') === null",
            timeout=420_000,
        )
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
