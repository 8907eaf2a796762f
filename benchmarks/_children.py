"""The child processes of a benchmark that runs a live stack (daphne, Celery, Redis, agents)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from nasweb.launcher import free_port, redis_answers, throwaway_redis_command

REPO_ROOT = Path(__file__).resolve().parent.parent


class ChildProcesses:
    """Processes a benchmark started, each in its own session (so its own children, e.g. a Celery
    worker's pool, go with it) and with its output in ``folder/NAME.log``; ``stop()`` ends them
    all, newest first."""

    def __init__(
        self, folder: Path, env: dict[str, str] | None = None, log: Callable[[str], None] = print
    ) -> None:
        self.folder = folder
        self.env = env  # None: this process's environment at each start
        self.log = log
        self.children: dict[str, subprocess.Popen] = {}

    def start(
        self, name: str, command: list[str], *, env: dict[str, str] | None = None, **popen
    ) -> subprocess.Popen:
        handle = open(self.log_path(name), "wb")  # noqa: SIM115 - the child has its own copy
        try:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env if env is not None else self.env if self.env is not None else dict(os.environ),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen,
            )
        finally:
            handle.close()
        self.children[name] = process
        return process

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")

    def stop(self) -> None:
        for name, process in reversed(list(self.children.items())):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)  # a throttled (stopped) child must run to die
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=20)
                except ProcessLookupError:
                    pass
                except subprocess.TimeoutExpired:
                    self.log(f"{name} did not stop in 20 s; killing it")
            try:  # what is left of its session, e.g. a worker's pool processes
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if process.returncode is None:
                process.wait()


def redis_or_embedded(url: str, children: ChildProcesses, *, flush: bool = False) -> str:
    """``url`` when a Redis answers there (its database emptied first with ``flush``), else the URL
    of a throw-away redis-server started on a free loopback port."""
    if redis_answers(url):
        if flush:
            import redis

            redis.Redis.from_url(url).flushdb()  # the benchmark's own database number
        return url
    port = free_port()
    children.log(f"no Redis at {url}; starting an embedded redis-server on 127.0.0.1:{port}")
    children.start("redis", throwaway_redis_command(port, children.folder))
    embedded = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not redis_answers(embedded):
        children.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"the embedded redis-server did not start:\n{children.log_tail('redis')}")
        time.sleep(0.1)
    return embedded
