"""`python -m nasweb.serve`: several daphne processes on one port, connections spread, crashes healed."""

from __future__ import annotations

import http.client
import signal
import sys
import time

import psutil
import pytest

from tests.conftest import child_env, free_port, start_child, wait_for_http, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _daphnes(supervisor_pid: int) -> list[psutil.Process]:
    return [
        child for child in psutil.Process(supervisor_pid).children() if "daphne" in " ".join(child.cmdline())
    ]


def _established_on(process: psutil.Process, port: int) -> int:
    return sum(
        1
        for conn in process.net_connections(kind="tcp")
        if conn.status == "ESTABLISHED" and conn.laddr.port == port
    )


def _get(port: int, path: str = "/accounts/login/") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _serve(port: int, tmp_path, **env: str):
    """`python -m nasweb.serve` with 2 processes on ``port``, answering before this returns."""
    command = [
        sys.executable,
        "-m",
        "nasweb.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--processes",
        "2",
    ]
    serve = start_child(command, tmp_path / "serve.log", env=child_env(**env))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/accounts/login/", timeout=90, child=serve)
    except BaseException:
        serve.stop()
        raise
    return serve


def test_two_processes_share_the_port_spread_connections_and_are_restarted(tmp_path):
    port = free_port()
    serve = _serve(port, tmp_path)
    try:
        daphnes = wait_until(
            lambda: len(_daphnes(serve.process.pid)) == 2 and _daphnes(serve.process.pid), 30
        )

        # 16 keep-alive connections (as a browser or a load tool holds them): the kernel spreads
        # them over both processes' sockets (SO_REUSEPORT); one shared socket did not.
        connections = []
        for _ in range(16):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
            connection.request("GET", "/accounts/login/")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            connections.append(connection)
        per_process = [_established_on(process, port) for process in daphnes]
        for connection in connections:
            connection.close()
        assert sum(per_process) == 16, per_process
        assert min(per_process) >= 1, f"all connections went to one process: {per_process}"

        # A daphne that dies is replaced; the port keeps answering meanwhile and afterwards.
        victim = daphnes[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        replaced = wait_until(
            lambda: {p.pid for p in _daphnes(serve.process.pid)} - {d.pid for d in daphnes},
            30,
            message="restart",
        )
        assert len(replaced) == 1
        wait_until(lambda: len(_daphnes(serve.process.pid)) == 2, 30)
        statuses = [_get(port) for _ in range(12)]
        assert statuses == [200] * 12
        assert "exited with code" in serve.log() and "restarting" in serve.log()

        # SIGTERM to the supervisor stops every daphne it started.
        children = _daphnes(serve.process.pid)
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive
    finally:
        serve.stop()


def test_it_refuses_zero_processes(tmp_path):
    child = start_child(
        [sys.executable, "-m", "nasweb.serve", "--port", str(free_port()), "--processes", "0"],
        tmp_path / "serve.log",
        env=child_env(),
    )
    deadline = time.monotonic() + 30
    while child.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.process.returncode == 2
    assert "--processes must be at least 1" in child.log()


def test_it_ends_with_the_process_that_started_it(tmp_path):
    """NASWEB_EXIT_WITH_PARENT: a killed benchmark must not leave a supervisor restarting daphnes."""
    import subprocess

    starter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    port = free_port()
    serve = _serve(port, tmp_path, NASWEB_EXIT_WITH_PARENT=str(starter.pid))
    try:
        daphnes = _daphnes(serve.process.pid)
        starter.kill()
        starter.wait()
        serve.process.wait(timeout=20)
        gone, alive = psutil.wait_procs(daphnes, timeout=20)
        assert not alive
    finally:
        if starter.poll() is None:
            starter.kill()
        serve.stop()
