"""`make run` from a clean copy of the repo: green /healthz, a working admin login, the first-launch
demo runs to a downloadable adapted model, and Ctrl-C stops everything it started - and nothing else."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import psutil
import pytest
from django.conf import settings

from tests.conftest import REPO_ROOT, free_port, wait_until

# Longer than the suite's 300 s per test: install check, migrations, the demo runs, shutdown.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _copy_checkout(target):
    """Tracked and untracked-but-not-ignored files: what a fresh clone of this tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)  # keep mtimes: the venv stamp stays newer than requirements


def _healthz_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _read(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_make_run_serves_healthz_and_admin_then_stops_cleanly(tmp_path):
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    checkout = tmp_path / "nasweb"
    _copy_checkout(checkout)
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: make run must embed Redis
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "REDIS_URL": dead_redis,
        "NASWEB_ADMIN_PASSWORD": "make-run-admin-pw-123",
        "NASWEB_TORCH_THREADS": "1",
        # The real data dir: the first-launch demo meta-trains on Omniglot.
        "NASWEB_DATA_DIR": str(settings.NASWEB_DATA_DIR),
    }
    log_path = tmp_path / "make-run.log"
    venv = REPO_ROOT / ".venv"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            ["make", "run", f"PORT={port}", f"VENV={venv}"],
            cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: "nasweb is running at" in _read(log_path) or make.poll() is not None,
            timeout=300,
            message="make run to report the URL",
        )
        output = _read(log_path)
        assert make.poll() is None, output[-4000:]
        assert f"nasweb is running at {base}/" in output
        assert "starting an embedded redis-server" in output
        # Green once is not green on every request: the worker is training the demo run now, and
        # /healthz needs its ping reply within a second. On two busy cores retry for a while.
        wait_until(
            lambda: _healthz_status(f"{base}/healthz") == 200, timeout=60, interval=1, message="/healthz 200"
        )

        jar = CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(f"{base}/admin/login/").read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = {
            "username": "admin",
            "password": "make-run-admin-pw-123",
            "csrfmiddlewaretoken": token,
            "next": "/admin/",
        }
        request = urllib.request.Request(
            f"{base}/admin/login/",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Referer": f"{base}/admin/"},
        )
        admin_page = opener.open(request).read().decode()
        assert "Site administration" in admin_page
        assert "Devices" in admin_page

        # The first-launch demo: a tiny super-net, then an adaption for this CPU, both finished.
        database = checkout / "var" / "nasweb.sqlite3"

        def demo_states() -> list[tuple[str, str]]:
            with sqlite3.connect(database, timeout=10) as connection:
                return connection.execute(
                    "SELECT name, status FROM runs_metatrainingrun WHERE name LIKE 'demo:%' UNION ALL "
                    "SELECT name, status FROM runs_adaptionrun WHERE name LIKE 'demo:%'"
                ).fetchall()

        wait_until(
            lambda: len(demo_states()) == 2 and all(status != "running" and status != "queued"
                                                    for _, status in demo_states()),
            timeout=420,
            message="the demo runs to finish",
        )  # fmt: skip
        assert [status for _, status in demo_states()] == ["succeeded", "succeeded"], _read(log_path)[-3000:]
        assert "First launch: queued the demo run" in _read(log_path)
        with sqlite3.connect(database) as connection:
            (models,) = connection.execute("SELECT COUNT(*) FROM runs_adaptedmodel").fetchone()
        assert models == 2  # one model per demo budget

        started = psutil.Process(make.pid).children(recursive=True)  # Process objects: no PID reuse
        assert len(started) >= 4  # launcher, redis, worker (+ pool), daphne
        # Ctrl-C in a terminal signals the foreground process group: make and the launcher.
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=90)
        # The launcher waits for each child it started, then kills what is left of their groups:
        # those (pool and search processes) may take a moment to exit on a loaded machine.
        _, alive = psutil.wait_procs(started, timeout=30)
        alive = [process for process in alive if _running(process)]
        assert alive == [], f"still running after Ctrl-C: {alive}\n{_read(log_path)[-3000:]}"
        assert "[nasweb] stopped" in _read(log_path)
    finally:
        if make.poll() is None:
            for child in psutil.Process(make.pid).children(recursive=True):
                child.kill()
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
