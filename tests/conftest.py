"""Shared fixtures: real Redis (local or embedded), real worker and web server processes.

Nothing of ours is mocked. Tests that need a Celery worker or daphne start real
processes against the same test database and Redis as the test itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Test traffic goes to its own Redis database so a developer's queues are never touched.
TEST_REDIS_DB = 9

_embedded_redis: subprocess.Popen | None = None
_test_files: Path | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_url_with_db(url: str, db: int) -> str:
    from urllib.parse import urlparse, urlunparse

    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{db}"))


def _start_test_redis() -> str:
    """REDIS_URL (test db) when it answers, else an embedded redis-server for this session."""
    global _embedded_redis
    from nasweb.launcher import redis_answers, throwaway_redis_command

    configured = os.environ.get("NASWEB_TEST_REDIS_URL") or _redis_url_with_db(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), TEST_REDIS_DB
    )
    if redis_answers(configured):
        return configured
    port = free_port()
    _embedded_redis = subprocess.Popen(
        throwaway_redis_command(port),
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/{TEST_REDIS_DB}"
    deadline = time.monotonic() + 20
    while not redis_answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError("embedded redis-server for the tests did not start")
        time.sleep(0.1)
    return url


def pytest_configure(config) -> None:
    url = _start_test_redis()
    import redis

    redis.Redis.from_url(url).flushdb()
    os.environ["REDIS_URL"] = url  # inherited by every worker / web process a test starts
    from django.conf import settings

    settings.REDIS_URL = url
    settings.CELERY_BROKER_URL = url
    layer_config = settings.CHANNEL_LAYERS["default"]["CONFIG"]
    layer_config["hosts"] = [{**layer_config["hosts"][0], "address": url}]
    from nasweb.celery import app

    app.conf.broker_url = url
    # Checkpoints, packages and uploads of this run live in a fresh folder: run ids restart at 1
    # in every test database, so a shared folder would let one run "resume" another's checkpoint.
    import tempfile

    global _test_files
    files = _test_files = Path(tempfile.mkdtemp(prefix="nasweb-test-files-"))
    for name, setting in (("NASWEB_ARTIFACT_DIR", "NASWEB_ARTIFACT_DIR"), ("NASWEB_MEDIA_DIR", "MEDIA_ROOT")):
        folder = files / name.lower()
        folder.mkdir()
        os.environ[name] = str(folder)
        setattr(settings, setting, folder)


def pytest_unconfigure(config) -> None:
    if _test_files is not None:
        import shutil

        shutil.rmtree(_test_files, ignore_errors=True)
    if _embedded_redis is not None and _embedded_redis.poll() is None:
        _embedded_redis.terminate()
        _embedded_redis.wait(timeout=10)


# --- Processes sharing the test database -------------------------------------


def child_database_url() -> str:
    """A DATABASE_URL pointing a child process at the database this test run created."""
    from django.db import connection

    settings_dict = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings_dict['NAME']}"
    if connection.vendor == "postgresql":
        user = settings_dict.get("USER") or ""
        password = settings_dict.get("PASSWORD") or ""
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"
    raise RuntimeError(f"no child-process URL for database vendor {connection.vendor}")


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "nasweb.settings",
            "DATABASE_URL": child_database_url(),
            "NASWEB_SECRET_KEY": "nasweb-test-secret-key-for-child-processes-only-0123456789",
            "PYTHONUNBUFFERED": "1",
            "NASWEB_TORCH_THREADS": "1",
            "NASWEB_FAST_PASSWORD_HASHER": "1",
            # Children die with this test process, so a killed run leaves no worker behind.
            "NASWEB_EXIT_WITH_PARENT": str(os.getpid()),
        }
    )
    env.update(overrides)
    return env


@dataclass
class ChildProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # the worker's pool children share its group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def start_child(command: list[str], log_path: Path, env: dict[str, str]) -> ChildProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return ChildProcess(process, log_path)


def start_worker(
    log_path: Path, *, queues: str = "default,train,profile,adapt", env=None, name: str = "test"
) -> ChildProcess:
    command = [
        sys.executable, "-m", "celery", "-A", "nasweb", "worker",
        "-Q", queues, "-c", "1", "-n", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
        "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    return start_child(command, log_path, env or child_env())


def wait_for_worker(broker_app=None, timeout: float = 60) -> list[str]:
    from nasweb.celery import app

    app = broker_app or app
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5)
        if replies:
            return [name for reply in replies for name in reply]
    raise TimeoutError("no Celery worker answered within the timeout")


def start_daphne(port: int, log_path: Path, env=None) -> ChildProcess:
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "nasweb.asgi:application"]
    return start_child(command, log_path, env or child_env())


def wait_for_http(url: str, timeout: float = 60, *, child: ChildProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{child.log()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers; the status is the test's business
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[ChildProcess]:
    """One real worker for the session, consuming every queue, on the test DB and Redis."""
    with django_db_blocker.unblock():
        # Two GA search processes, as on a 2-core server: the live adaptions go through them. Its
        # recovery scanner runs once at start only: the crash-safety tests kill their own workers,
        # and their jobs must be recovered through those tests' own broker, not requeued by this
        # worker's periodic scan through the session's.
        worker = start_worker(
            tmp_path_factory.mktemp("worker") / "worker.log",
            env=child_env(NASWEB_SEARCH_WORKERS="2", NASWEB_RECOVERY_INTERVAL_S="86400"),
        )
    try:
        wait_for_worker(timeout=90)
    except TimeoutError:
        worker.stop()
        raise RuntimeError(f"worker did not start:\n{worker.log()[-4000:]}") from None
    yield worker
    worker.stop()


def wait_until(predicate, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{message} not met within {timeout}s")


@pytest.fixture(scope="session", autouse=True)
def _close_stray_database_sessions(django_db_setup, django_db_blocker):
    """Before the test database is dropped, end connections that threads (asgiref's executor,
    Channels' database_sync_to_async) opened and never closed; PostgreSQL refuses to drop a
    database that still has sessions."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


def tiny_space(num_classes: int = 5, image_size: int = 28):
    """A VGG9 space with few choices (36 layer keys): real in every respect, quick to profile."""
    import dataclasses

    from engine.space import SearchSpace

    return dataclasses.replace(
        SearchSpace.vgg9(image_size=image_size, num_classes=num_classes),
        kernels=(1, 3),
        widths=(0.25, 0.5),
        activations=("relu",),
    )
