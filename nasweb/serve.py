"""`python -m nasweb.serve`: several daphne processes serving one listening socket.

Django runs the sync views of one ASGI process on one thread at a time (the GIL and
``thread_sensitive`` executors), so one daphne process uses at most one core and queues requests
behind each other under concurrent load. This supervisor binds one listening socket per process to
the same port with ``SO_REUSEPORT`` and starts a daphne on each (``daphne --fd``); the kernel
spreads new connections evenly over the sockets. (One socket shared by all processes does not
spread them: Twisted accepts connections in bursts, so one process took almost every keep-alive
connection of a load test and the tail got *worse*; measured in benchmarks/load.py.) A process
that dies is restarted on its own socket (with a growing pause, so a crash loop does not spin;
connections wait in the socket's backlog meanwhile); SIGTERM/SIGINT stop all of them.

Why not uvicorn/gunicorn: daphne is already the ASGI server that the websocket and Channels tests
run through, and sharing a socket needs nothing more than this.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

#: Restart pauses for a process that keeps dying (seconds), the last one repeating.
RESTART_PAUSES = (0.5, 1.0, 2.0, 5.0, 10.0)
#: A process that ran this long before dying is not in a crash loop: its pause starts over.
STABLE_AFTER_S = 30.0


def log(message: str) -> None:
    print(f"[serve] {message}", file=sys.stderr, flush=True)


def default_processes() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket that other sockets of this user may bind to the same port (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def daphne_command(fd: int, application: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "daphne", "--fd", str(fd), *extra, application]


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets on one port; port 0 picks a free port for the first and reuses it."""
    first = listening_socket(host, port)
    port = first.getsockname()[1]
    return [first] + [listening_socket(host, port) for _ in range(count - 1)]


class Supervisor:
    def __init__(self, sockets: Sequence[socket.socket], application: str, extra: Sequence[str]) -> None:
        self.sockets = list(sockets)
        self.application = application
        self.extra = list(extra)
        processes = len(self.sockets)
        self.slots: list[subprocess.Popen | None] = [None] * processes
        self.started_at = [0.0] * processes
        self.failures = [0] * processes
        self.restart_at = [0.0] * processes
        self.stopping = False

    def _start(self, slot: int) -> None:
        fd = self.sockets[slot].fileno()
        self.slots[slot] = subprocess.Popen(daphne_command(fd, self.application, self.extra), pass_fds=(fd,))
        self.started_at[slot] = time.monotonic()

    def run(self) -> int:
        for slot in range(len(self.slots)):
            self._start(slot)
        host, port = self.sockets[0].getsockname()[:2]
        log(f"{len(self.slots)} daphne process(es) on http://{host}:{port}/")
        while not self.stopping:
            now = time.monotonic()
            for slot, process in enumerate(self.slots):
                if process is None:
                    if now >= self.restart_at[slot]:
                        self._start(slot)
                    continue
                code = process.poll()
                if code is None:
                    continue
                ran = now - self.started_at[slot]
                self.failures[slot] = 0 if ran >= STABLE_AFTER_S else self.failures[slot] + 1
                pause = RESTART_PAUSES[min(self.failures[slot], len(RESTART_PAUSES) - 1)]
                log(
                    f"daphne pid {process.pid} exited with code {code} after {ran:.1f}s; restarting in {pause}s"
                )
                self.slots[slot] = None
                self.restart_at[slot] = now + pause
            time.sleep(0.2)
        return 0

    def stop(self, grace_s: float = 10.0) -> None:
        self.stopping = True
        alive = [process for process in self.slots if process is not None and process.poll() is None]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + grace_s
        for process in alive:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("NASWEB_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("NASWEB_WEB_PROCESSES") or default_processes()),
        help="daphne processes (default NASWEB_WEB_PROCESSES, else one per core)",
    )
    parser.add_argument("--application", default="nasweb.asgi:application")
    args, extra = parser.parse_known_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    # Like the daphnes it starts: end with the test or benchmark that started us (if one did), or
    # a killed benchmark leaves a supervisor restarting daphnes that exit by their own lifeline.
    from nasweb.core.lifeline import watch_parent_from_env

    watch_parent_from_env()
    sockets = listening_sockets(args.host, args.port, args.processes)
    supervisor = Supervisor(sockets, args.application, extra)

    def on_signal(signum, _frame) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return supervisor.run()
    finally:
        supervisor.stop()
        for sock in sockets:
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
