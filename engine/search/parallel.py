"""GA fitness evaluations spread over forked worker processes (one torch thread each).

Each generation's pool is scored on one slice, so its unevaluated architectures are independent:
:meth:`ProcessFitness.many` scores them in ``workers`` processes forked once from this one
(:mod:`engine.forked`: they inherit the super-net and the task slices copy-on-write; only
architectures and losses travel, pickled, through pipes). On a machine with a CUDA GPU they are
spawned instead (see :func:`_fork_breaks_autograd`).

Every evaluation - in a worker or in this process - runs with one intra-op thread, so a loss does
not depend on how many workers there are: a GA gives the same result with 1 or 4 workers (tests).
"""

from __future__ import annotations

import selectors
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.forked import ForkedWorker, SpawnedWorker, WorkerError, close_workers, start_workers
from engine.latency.measure import torch_threads

__all__ = ["ProcessFitness", "WorkerError"]


def _fork_breaks_autograd() -> bool:
    """On a machine with a CUDA GPU the autograd engine starts a thread per GPU at the first
    backward of the process, and a process forked after that cannot run autograd at all ("Unable
    to handle autograd's threading in combination with fork-based multiprocessing", seen on an
    H100 machine). There the workers are fresh interpreters (:class:`SpawnedWorker`: they receive
    the fitness function pickled, about 2 s each to start) instead of forks."""
    return torch.cuda.is_available()


class ProcessFitness:
    """``fitness(arch, slice_id)`` plus ``many(pairs)`` that scores several pairs in parallel.

    Use as a context manager (or call :meth:`close`) so the workers end with the search.
    """

    def __init__(self, fitness_fn: Callable[[Any, int], float], workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.fitness_fn = fitness_fn
        self.workers = workers
        self._pool: list[ForkedWorker] = []

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
        busy: dict[int, tuple[ForkedWorker, int, int]] = {}
        selector = selectors.DefaultSelector()
        try:
            for worker in pool:
                self._send(worker, pending, busy, selector)
            while busy:
                for key, _ in selector.select():
                    worker, start, count = busy.pop(key.fd)
                    selector.unregister(key.fd)
                    results[start : start + count] = worker.receive("fitness worker")
                    self._send(worker, pending, busy, selector)
        except BaseException:
            self.close()  # a half-answered pool cannot be reused
            raise
        finally:
            selector.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _send(worker: ForkedWorker, pending, busy: dict, selector: selectors.BaseSelector) -> None:
        chunk = next(pending, None)
        if chunk is None:
            return
        start, part = chunk
        worker.send(part)
        busy[worker.replies_fd] = (worker, start, len(part))
        selector.register(worker.replies_fd, selectors.EVENT_READ)

    def _score(self, pairs: Sequence[tuple[Any, int]]) -> list[float]:
        # Runs in a worker process (one torch thread there).
        return [float(self.fitness_fn(arch, slice_id)) for arch, slice_id in pairs]

    def _start(self) -> list[ForkedWorker]:
        if not self._pool:
            kind = SpawnedWorker if _fork_breaks_autograd() else ForkedWorker
            self._pool = start_workers(self._score, self.workers, kind)
        return self._pool

    def __getstate__(self) -> dict[str, Any]:
        # A spawned worker receives this object pickled; the pool stays with its owner.
        return {**self.__dict__, "_pool": []}

    def close(self) -> None:
        pool, self._pool = getattr(self, "_pool", []), []
        close_workers(pool)

    def __enter__(self) -> ProcessFitness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
