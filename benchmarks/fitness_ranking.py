"""Benchmark: how well does a search slice's score rank sub-nets by their test accuracy?

The GA (Algorithm 1) and random search rank sub-nets by their mean query loss on a 16-task
validation slice (``search_metric="loss"``) or by its error rate (``"accuracy"``). Whichever
ranks sub-nets more like their accuracy on many test tasks is the better fitness. This script
scores ``--archs`` random sub-nets of a super-net on one slice (``--tasks`` tasks, ``--queries``
query images per class) and on ``--test-tasks`` test tasks (the super-net's own query count, the
adaption's test-task stream), then reports per score:

* ``spearman``: Spearman's rank correlation with test accuracy over all sub-nets, within each
  third of them by MACs (so that size alone does not carry it) and over the 40 best on the test;
* ``pick_regret``: test accuracy of the sub-net the score would pick, minus the best test
  accuracy, among the sub-nets within each MACs tercile's upper bound (three budgets).

    python -m engine meta-train --dataset omniglot --ways 20 --shots 1 --backbone vgg9 --preset cpu --out RUN
    PYTHONPATH=. python benchmarks/fitness_ranking.py --supernet RUN/checkpoint.pt --queries 3

``--quick`` (under a minute) meta-trains a tiny super-net for seconds and scores a few sub-nets
on a few tasks: a smoke check, not a figure. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._scoring import add_scoring_arguments, scoring_bench  # noqa: E402
from benchmarks._validation import spearman  # noqa: E402
from engine.adaption import TEST_TASK_STREAM  # noqa: E402
from engine.cost import arch_macs  # noqa: E402
from engine.meta.runs import task_source  # noqa: E402
from engine.search.package import arch_code  # noqa: E402
from engine.seeding import derive_seed  # noqa: E402

#: Seed stream of the random sub-nets (benchmarks/_scoring.scoring_bench).
ARCH_STREAM = 41
#: Scores, each lower-is-better, as the GA minimises them.
SCORES = ("loss", "error")
TOP = 40


def correlations(rows: list[dict], test: np.ndarray) -> dict[str, float]:
    return {name: round(spearman([row[name] for row in rows], -test), 3) for name in SCORES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scoring_arguments(
        parser,
        archs=200,
        archs_help="random sub-nets to rank",
        quick_help="tiny super-net trained for seconds, 12 sub-nets, 4 + 8 tasks (a smoke check)",
    )
    parser.add_argument("--test-tasks", type=int, default=200, help="test tasks per sub-net")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.test_tasks = 4, 8
    torch.set_num_threads(args.threads)
    bench = scoring_bench(args, parser, quick_iterations=30, quick_archs=12, arch_stream=ARCH_STREAM)
    space = bench.run.space
    _, batches = task_source(bench.spec, "test")
    test_batches = list(batches(args.test_tasks, 16, derive_seed(args.seed, TEST_TASK_STREAM)))
    archs = list({arch.canonical().to_json(): arch.canonical() for arch in bench.archs}.values())

    started = time.perf_counter()
    rows = []
    for arch in archs:
        search = bench.scorer.score(arch, bench.tasks)
        accuracies = [a for batch in test_batches for a in bench.scorer.score(arch, batch).task_accuracies]
        rows.append(
            {
                "arch": arch_code(arch),
                "depth": arch.n_used_layers,
                "macs": arch_macs(space, arch),
                "loss": search.loss,
                "error": 1.0 - search.accuracy,
                "test": float(np.mean(accuracies)),
            }
        )
    seconds = time.perf_counter() - started

    test = np.array([row["test"] for row in rows])
    macs = np.array([row["macs"] for row in rows], dtype=float)
    edges = np.quantile(macs, [0.0, 1 / 3, 2 / 3, 1.0])
    spearmans = {"all": correlations(rows, test)}
    for third in range(3):
        chosen = [i for i in range(len(rows)) if edges[third] <= macs[i] <= edges[third + 1]]
        spearmans[f"macs_third_{third + 1}"] = correlations([rows[i] for i in chosen], test[chosen])
    top = np.argsort(-test)[: min(TOP, len(rows))]
    spearmans[f"top_{len(top)}_by_test"] = correlations([rows[i] for i in top], test[top])
    regrets = {}
    for third in range(3):
        within = [i for i in range(len(rows)) if macs[i] <= edges[third + 1]]
        best = max(test[i] for i in within)
        regrets[f"macs_le_{third + 1}_3"] = {
            name: round(100 * (test[min(within, key=lambda i: rows[i][name])] - best), 2) for name in SCORES
        }

    for row in sorted(rows, key=lambda row: -row["test"])[:10]:
        print(
            f"test {100 * row['test']:6.2f} %  search error {100 * row['error']:6.2f} %  loss {row['loss']:.3f}  "
            f"{row['macs'] / 1e6:5.2f} M MACs  {row['arch']}"
        )
    for group, values in spearmans.items():
        print(
            f"Spearman with test accuracy, {group}: " + ", ".join(f"{k} {v:+.3f}" for k, v in values.items())
        )
    for group, values in regrets.items():
        print(f"pick regret (points), {group}: " + ", ".join(f"{k} {v:+.2f}" for k, v in values.items()))
    print(f"{len(rows)} sub-nets scored in {seconds:.1f} s")
    print(
        json.dumps(
            {
                **bench.summary_head(args),
                "archs": len(rows),
                "test_tasks": args.test_tasks,
                "seconds": round(seconds, 1),
                "spearman": spearmans,
                "pick_regret_points": regrets,
            }
        )
    )


if __name__ == "__main__":
    main()
