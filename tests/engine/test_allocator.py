"""engine.allocator: compute workers keep freed memory instead of faulting it in again."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.forked import SpawnedWorker, start_workers

ROOT = Path(__file__).resolve().parents[2]


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not _is_glibc(), reason="mallopt thresholds are glibc's")


def scoring_page_faults(_request: object = None) -> int:
    """Minor page faults of GA fitness evaluations in the calling process: a 20-way VGG9
    super-net, 4 random tasks, 3 inner steps, one warm-up evaluation, then 6 other sub-nets (as
    in a search, each new one has other tensor sizes)."""
    from engine.search.adapt import LslrInnerLoop, SuperNetScorer
    from engine.seeding import make_rngs
    from engine.space import SearchSpace
    from engine.supernet import SuperNet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    space = SearchSpace.vgg9()
    scorer = SuperNetScorer(SuperNet(space, bn_steps=3), LslrInnerLoop(steps=3))
    generator = torch.Generator().manual_seed(0)
    tasks = [(torch.randn(20, 1, 28, 28, generator=generator), torch.arange(20)) * 2 for _ in range(4)]
    rng = make_rngs(1).numpy
    archs = [space.sample(rng) for _ in range(7)]
    scorer.score(archs[0], tasks)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for arch in archs[1:]:
        scorer.score(arch, tasks)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def large_block_page_faults(_request: object = None) -> int:
    """Minor page faults of writing a fresh 64 MiB tensor sixteen times, each freed before the next:
    above glibc's largest mmap threshold (32 MiB), like one 84x84 layer output of a Mini-ImageNet
    meta-batch."""
    torch.empty(16 << 20).fill_(1.0)  # the first one may fault in wherever it comes from
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(16):
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _python(code: str) -> str:
    """What ``code`` prints in a fresh interpreter with glibc's own allocator settings."""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return run.stdout


def _faults_in_a_default_process_and_a_worker(measure: str) -> tuple[int, int]:
    """Faults of ``measure`` (a function of this module) in a fresh interpreter with glibc's own
    thresholds, and in a spawned engine.forked worker (a forked one's first writes to its
    parent's memory would add copy-on-write faults)."""
    default = _python(f"from tests.engine.test_allocator import {measure} as f; print(f())")
    [worker] = start_workers(globals()[measure], 1, SpawnedWorker)
    try:
        worker.send(None)
        worker_faults = worker.receive()
    finally:
        worker.close()
    return int(default.strip().splitlines()[-1]), worker_faults


@needs_glibc
def test_retain_freed_memory_takes_effect_and_is_idempotent():
    # In a fresh interpreter: the setting is process-wide and would stay with the test process.
    printed = _python("from engine.allocator import retain_freed_memory as r; print(r(), r())")
    assert printed.split() == ["True", "True"]


@needs_glibc
def test_a_worker_process_faults_far_less_than_a_default_process_on_the_same_work():
    default_faults, worker_faults = _faults_in_a_default_process_and_a_worker("scoring_page_faults")
    # Seen: 47,000-66,000 faults by default against 23,500-23,700 in the worker (the rest is
    # the heap growing to the largest sub-net so far, which it must).
    assert worker_faults * 1.5 < default_faults, (worker_faults, default_faults)


@needs_glibc
def test_a_worker_reuses_blocks_above_the_largest_mmap_threshold():
    default_faults, worker_faults = _faults_in_a_default_process_and_a_worker("large_block_page_faults")
    # By default every 64 MiB block is a fresh mmap: 16,384 faults each, 262,144 for sixteen. A
    # worker serves them from its heap (M_MMAP_MAX 0). Seen in 24 fresh workers: at most two
    # blocks faulted in again, often none (the heap's layout varies from process to process; a
    # first version of this test that allowed none failed once in CI). Without M_MMAP_MAX 0 it
    # faults every block.
    assert default_faults > 16 * 15_000, default_faults
    assert worker_faults < 8 * 16_384, worker_faults
