"""Worker processes forked from this one, talking through pipes (one torch thread each).

Why processes: the engine's CPU work (a few-shot task's inner loop, a GA fitness evaluation) is
made of small convolutions that split badly over cores, and Python threads serialise on the GIL
and contend for the allocator between them, so on a CPU the way to use ``k`` cores is ``k``
independent pieces of work at once. Workers are forked, so they inherit the caller's objects
(a super-net, task slices, a learner) copy-on-write; only the messages travel, pickled.

Why not ``multiprocessing.Pool``: its workers run the parent's ``register_after_fork`` hooks, and
in a Celery process (or anything that has used Celery's broker) kombu's hook closes the inherited
Redis connection, which waits for a reply that never comes - the pool hung in CI. These workers
are plain ``os.fork`` children that run nothing but their handler and leave with ``os._exit``,
so they never touch the parent's connections; Celery's prefork children (daemonic processes,
which multiprocessing refuses children) can use them too.

:class:`ForkedWorker` serves :mod:`engine.search.parallel` (GA fitness); :class:`SpawnedWorker`
(a fresh interpreter, same protocol) serves the ``processes`` strategy of
:class:`engine.meta.maml.MamlLearner` (a meta-batch's tasks) - see its docstring for why.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.allocator import retain_freed_memory

#: prctl option that makes the kernel signal a process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
_LENGTH = struct.Struct("!Q")


class WorkerError(RuntimeError):
    """A worker process died or failed; the message carries what it reported."""


def write_message(fd: int, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None  # the other end closed
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int) -> Any:
    header = _read_exactly(fd, _LENGTH.size)
    if header is None:
        raise EOFError
    body = _read_exactly(fd, _LENGTH.unpack(header)[0])
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _die_with_parent(parent_pid: int) -> None:
    # A worker must not outlive its parent: if the parent is killed (kill -9 of a Celery
    # worker), the kernel kills the worker too.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _serve(handler: Callable[[Any], Any], requests_fd: int, replies_fd: int) -> None:
    torch.set_num_threads(1)
    # A worker exists to run the same small tensor work thousands of times: keep freed memory
    # for the next allocation instead of faulting it in again (engine.allocator).
    retain_freed_memory()
    while True:
        try:
            request = read_message(requests_fd)
        except EOFError:
            return
        try:
            write_message(replies_fd, ("ok", handler(request)))
        except Exception as error:  # reported to the parent, which raises it there
            write_message(replies_fd, ("error", f"{type(error).__name__}: {error}"))


class ForkedWorker:
    """A child process that answers each request with ``handler(request)``.

    ``siblings``: the caller's other live workers, whose pipe ends the child must close (only
    the parent may hold them, or a worker would not see its parent's end close).
    """

    def __init__(self, handler: Callable[[Any], Any], siblings: Sequence[ForkedWorker] = ()) -> None:
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 0
            try:
                for fd in [requests_write, replies_read] + [
                    f for w in siblings for f in (w.requests_fd, w.replies_fd)
                ]:
                    os.close(fd)
                _die_with_parent(parent_pid)
                _serve(handler, requests_read, replies_write)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(requests_read)
        os.close(replies_write)
        self.pid = pid
        self.requests_fd = requests_write
        self.replies_fd = replies_read

    def send(self, request: Any) -> None:
        write_message(self.requests_fd, request)

    def receive(self, what: str = "worker") -> Any:
        """The reply to the last request; :class:`WorkerError` if the worker failed or died."""
        try:
            status, payload = read_message(self.replies_fd)
        except EOFError:
            raise WorkerError(f"{what} {self.pid} died") from None
        if status != "ok":
            raise WorkerError(f"{what} {self.pid} failed: {payload}")
        return payload

    def close(self) -> None:
        for fd in (self.requests_fd, self.replies_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._end_process()

    def _end_process(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def start_workers(
    handler: Callable[[Any], Any], count: int, kind: type[ForkedWorker] | None = None
) -> list[ForkedWorker]:
    """``count`` workers of ``kind`` (default :class:`ForkedWorker`); none left if one fails to start."""
    kind = kind or ForkedWorker
    workers: list[ForkedWorker] = []
    try:
        for _ in range(count):
            workers.append(kind(handler, siblings=workers))
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: Sequence[ForkedWorker]) -> None:
    for worker in workers:
        worker.close()


def serve_spawned() -> None:
    """Entry point of a :class:`SpawnedWorker` (``python -c``): the handler arrives pickled first."""
    requests_fd, replies_fd, parent_pid = (int(value) for value in sys.argv[1:4])
    _die_with_parent(parent_pid)
    handler = read_message(requests_fd)
    _serve(handler, requests_fd, replies_fd)


class SpawnedWorker(ForkedWorker):
    """Like :class:`ForkedWorker`, but a fresh interpreter that receives ``handler`` pickled.
    (``siblings`` is accepted for :func:`start_workers` and unused: ``Popen`` passes no other fds.)

    Why: a fork copies every lock of the parent in whatever state another thread held it, and
    a meta-batch worker (autograd, large pickled tensors) forked from a long-lived process with
    other threads (a test session, a web server) hung in CI on such a lock. A fresh interpreter
    inherits no thread state; it costs an interpreter start and one pickle of the handler's
    object (e.g. the learner) per worker.
    """

    def __init__(self, handler: Callable[[Any], Any], siblings: Sequence[ForkedWorker] = ()) -> None:
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        command = [
            sys.executable,
            "-c",
            "from engine.forked import serve_spawned; serve_spawned()",
            str(requests_read),
            str(replies_write),
            str(os.getpid()),
        ]
        try:
            self._process = subprocess.Popen(command, pass_fds=(requests_read, replies_write), env=env)
        finally:
            os.close(requests_read)
            os.close(replies_write)
        self.pid = self._process.pid
        self.requests_fd = requests_write
        self.replies_fd = replies_read
        self.send(handler)

    def _end_process(self) -> None:
        # Through Popen, so it records the exit and does not warn about a live child later.
        self._process.kill()
        self._process.wait()
