"""GA fitness evaluations spread over forked worker processes (one torch thread each).

Why processes: a fitness evaluation (inner loop on 16 small tasks) is made of small convolutions
that split badly over cores, and Python threads serialise on the GIL between them, so on a CPU
the way to use ``k`` cores is ``k`` evaluations at once. Each generation's pool is scored on one
slice, so its unevaluated architectures are independent: :meth:`ProcessFitness.many` scores them
in ``workers`` processes forked once from this one (they inherit the super-net and the task
slices copy-on-write; only architectures and losses travel, pickled, through pipes).

Why not ``multiprocessing.Pool``: its workers run the parent's ``register_after_fork`` hooks, and
in a Celery process (or anything that has used Celery's broker) kombu's hook closes the inherited
Redis connection, which waits for a reply that never comes - the pool hung in CI. These workers
are plain ``os.fork`` children that run nothing but the fitness function and leave with
``os._exit``, so they never touch the parent's connections; Celery's prefork children (daemonic
processes, which multiprocessing refuses children) can use them too.

Every evaluation - in a worker or in this process - runs with one intra-op thread, so a loss does
not depend on how many workers there are: a GA gives the same result with 1 or 4 workers (tests).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import selectors
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.latency.measure import torch_threads

#: prctl option that makes the kernel signal a process when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
_LENGTH = struct.Struct("!Q")


class WorkerError(RuntimeError):
    """A fitness worker died or failed; the message carries what it reported."""


def _write_message(fd: int, payload: Any) -> None:
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


def _read_message(fd: int) -> Any:
    header = _read_exactly(fd, _LENGTH.size)
    if header is None:
        raise EOFError
    body = _read_exactly(fd, _LENGTH.unpack(header)[0])
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _die_with_parent(parent_pid: int) -> None:
    # A worker must not outlive the search: if its parent is killed (kill -9 of a Celery worker),
    # the kernel kills the worker too.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_loop(fitness_fn: Callable[[Any, int], float], tasks_fd: int, results_fd: int) -> None:
    torch.set_num_threads(1)
    while True:
        try:
            pairs = _read_message(tasks_fd)
        except EOFError:
            return
        try:
            _write_message(
                results_fd, ("ok", [float(fitness_fn(arch, slice_id)) for arch, slice_id in pairs])
            )
        except Exception as error:  # reported to the parent, which raises it there
            _write_message(results_fd, ("error", f"{type(error).__name__}: {error}"))


class _Worker:
    def __init__(self, fitness_fn: Callable[[Any, int], float], siblings: Sequence[_Worker] = ()) -> None:
        tasks_read, tasks_write = os.pipe()
        results_read, results_write = os.pipe()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 0
            try:
                # Only the parent may hold the ends of a worker's pipes, or a worker would not
                # see its parent's end close.
                for fd in [tasks_write, results_read] + [
                    f for w in siblings for f in (w.tasks_fd, w.results_fd)
                ]:
                    os.close(fd)
                _die_with_parent(parent_pid)
                _worker_loop(fitness_fn, tasks_read, results_write)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(tasks_read)
        os.close(results_write)
        self.pid = pid
        self.tasks_fd = tasks_write
        self.results_fd = results_read

    def close(self) -> None:
        for fd in (self.tasks_fd, self.results_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


class ProcessFitness:
    """``fitness(arch, slice_id)`` plus ``many(pairs)`` that scores several pairs in parallel.

    Use as a context manager (or call :meth:`close`) so the workers end with the search.
    """

    def __init__(self, fitness_fn: Callable[[Any, int], float], workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.fitness_fn = fitness_fn
        self.workers = workers
        self._pool: list[_Worker] = []

    def __call__(self, arch: Any, slice_id: int) -> float:
        with torch_threads(1):
            return float(self.fitness_fn(arch, slice_id))

    def many(self, pairs: Sequence[tuple[Any, int]]) -> list[float]:
        """Losses of ``pairs`` in order; in worker processes when there is more than one pair.

        Pairs go out in chunks to whichever worker is free, so a worker that drew the big
        architectures does not hold the others up.
        """
        pairs = list(pairs)
        if self.workers == 1 or len(pairs) < 2:
            return [self(arch, slice_id) for arch, slice_id in pairs]
        pool = self._start()
        size = max(1, len(pairs) // (4 * len(pool)))
        chunks = [(start, pairs[start : start + size]) for start in range(0, len(pairs), size)]
        results: list[float | None] = [None] * len(pairs)
        pending = iter(chunks)
        busy: dict[int, tuple[_Worker, int, int]] = {}
        selector = selectors.DefaultSelector()
        try:
            for worker in pool:
                self._send(worker, pending, busy, selector)
            while busy:
                for key, _ in selector.select():
                    worker, start, count = busy.pop(key.fd)
                    selector.unregister(key.fd)
                    try:
                        status, payload = _read_message(worker.results_fd)
                    except EOFError:
                        raise WorkerError(f"fitness worker {worker.pid} died") from None
                    if status != "ok":
                        raise WorkerError(f"fitness worker {worker.pid} failed: {payload}")
                    results[start : start + count] = payload
                    self._send(worker, pending, busy, selector)
        except BaseException:
            self.close()  # a half-answered pool cannot be reused
            raise
        finally:
            selector.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _send(worker: _Worker, pending, busy: dict, selector: selectors.BaseSelector) -> None:
        chunk = next(pending, None)
        if chunk is None:
            return
        start, part = chunk
        _write_message(worker.tasks_fd, part)
        busy[worker.results_fd] = (worker, start, len(part))
        selector.register(worker.results_fd, selectors.EVENT_READ)

    def _start(self) -> list[_Worker]:
        if not self._pool:
            for _ in range(self.workers):
                self._pool.append(_Worker(self.fitness_fn, siblings=self._pool))
        return self._pool

    def close(self) -> None:
        pool, self._pool = getattr(self, "_pool", []), []
        for worker in pool:
            worker.close()

    def __enter__(self) -> ProcessFitness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
