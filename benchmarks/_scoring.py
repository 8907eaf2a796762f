"""What the benchmarks that time the GA's fitness share: their arguments, the super-net (a given
checkpoint, or with ``--quick`` a tiny one meta-trained for seconds), its scorer, the validation
tasks and random sub-nets, and switching the scoring path."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import engine.search.adapt as adapt_module
from benchmarks._validation import validation_tasks
from engine.adaption import load_supernet
from engine.meta.runs import RunSpec
from engine.meta.service import execute_meta_training
from engine.meta.train import CHECKPOINT_NAME
from engine.search.adapt import SuperNetScorer, inner_loop_from_learner
from engine.seeding import derive_seed


def add_scoring_arguments(
    parser: argparse.ArgumentParser, *, archs: int, archs_help: str, quick_help: str
) -> None:
    parser.add_argument("--supernet", type=Path, help="a super-net checkpoint (python -m engine meta-train)")
    parser.add_argument("--archs", type=int, default=archs, help=archs_help)
    parser.add_argument("--tasks", type=int, default=16, help="validation tasks per evaluation (a GA slice)")
    parser.add_argument("--queries", type=int, default=1, help="query images per class (the GA's default)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (a search process has 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=quick_help)


@dataclass
class ScoringBench:
    spec: RunSpec
    run: Any
    iteration: int
    scorer: SuperNetScorer
    tasks: list[Any]
    archs: list[Any]

    def summary_head(self, args: argparse.Namespace) -> dict[str, Any]:
        """The JSON keys saying what was timed, first in every such benchmark's last line."""
        return {
            "supernet": str(args.supernet) if args.supernet else "tiny (--quick)",
            "preset": self.spec.preset,
            "ways": self.spec.ways,
            "meta_iterations": self.iteration,
            "archs": len(self.archs),
            "tasks": args.tasks,
            "queries_per_class": args.queries,
            "threads": args.threads,
        }


def scoring_bench(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    quick_iterations: int,
    quick_archs: int,
    arch_stream: int,
) -> ScoringBench:
    """Load ``--supernet`` (or meta-train the tiny one with ``--quick``), then its scorer, the
    validation tasks and the random sub-nets (seed stream ``arch_stream``) to time."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.supernet
        if checkpoint is None:
            if not args.quick:
                parser.error("--supernet is required without --quick")
            spec = RunSpec(dataset="omniglot", ways=20, shots=1, backbone="vgg9", preset="tiny",
                           iterations=quick_iterations, seed=args.seed, threads=args.threads)  # fmt: skip
            execute_meta_training(spec, Path(scratch), eval_tasks=0)
            checkpoint = Path(scratch) / CHECKPOINT_NAME
        spec, run, iteration = load_supernet(checkpoint)
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    tasks = validation_tasks(spec.with_(queries=args.queries), args.tasks, args.seed)
    rng = np.random.default_rng(derive_seed(args.seed, arch_stream))
    archs = [run.space.sample(rng) for _ in range(quick_archs if args.quick else args.archs)]
    return ScoringBench(spec, run, iteration, scorer, tasks, archs)


@contextlib.contextmanager
def scoring_path(path: str) -> Iterator[None]:
    """Score with ``path`` (engine.search.adapt.SCORING_PATH) for the duration; forked search
    processes inherit it."""
    adapt_module.SCORING_PATH = path
    try:
        yield
    finally:
        adapt_module.SCORING_PATH = "auto"
