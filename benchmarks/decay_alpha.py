"""H-Meta-NAS Table 9 at small scale: the decay speed alpha of progressive shrinking (eq. 4).

For each alpha, meta-train the same super-net (same seed, same tasks, only alpha differs), then
report what the paper reports: the accuracy averaged over random sub-networks (the same ones for
every alpha) on validation tasks, after the MAML++ inner loop from the inherited weights. Also
the largest sub-network's accuracy, since a slow decay favours it.

Paper (Mini-ImageNet 5-way 1-shot, 100 sub-nets): alpha 0.1 / 0.5 / 5 / 10 / 50 ->
0.424 / 0.4145 / 0.5464 / 0.5323 / 0.4423. Here: Omniglot 5-way 1-shot (Mini-ImageNet is not on
this machine), the ``tiny`` preset, far fewer meta-iterations - a small-scale check of the trend.

    python benchmarks/decay_alpha.py [--quick] [--train-iterations 600] [--subnets 20]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._validation import mean_ci, validation_tasks  # noqa: E402
from engine.adaption import load_supernet  # noqa: E402
from engine.meta.runs import RunSpec, build_run  # noqa: E402
from engine.meta.service import execute_meta_training  # noqa: E402
from engine.meta.train import CHECKPOINT_NAME  # noqa: E402
from engine.search.adapt import SuperNetScorer, inner_loop_from_learner  # noqa: E402
from engine.seeding import derive_seed  # noqa: E402

PAPER = {0.1: 0.424, 0.5: 0.4145, 5.0: 0.5464, 10.0: 0.5323, 50.0: 0.4423}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two alphas, few iterations (under a minute)")
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="default: the paper's five")
    parser.add_argument(
        "--train-iterations", type=int, default=None, help="meta-iterations per alpha (600; quick 24)"
    )
    parser.add_argument(
        "--subnets", type=int, default=None, help="random sub-networks averaged (20; quick 6)"
    )
    parser.add_argument(
        "--tasks", type=int, default=None, help="validation tasks per sub-network (48; quick 16)"
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quick = args.quick
    alphas = args.alphas or ([0.5, 5.0] if quick else sorted(PAPER))
    iterations = args.train_iterations or (24 if quick else 600)
    subnet_count = args.subnets or (6 if quick else 20)
    task_count = args.tasks or (16 if quick else 48)
    torch.set_num_threads(args.threads)
    base = RunSpec(
        dataset="omniglot", ways=args.ways, shots=1, backbone="vgg9", preset="tiny",
        iterations=iterations, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="decay_alpha_"))
    space = build_run(base).space
    rng = np.random.default_rng(derive_seed(args.seed, 9))
    subnets = [space.sample(rng) for _ in range(subnet_count)]
    tasks = validation_tasks(base, task_count, args.seed)
    print(
        f"Table 9 at small scale: Omniglot {base.ways}-way 1-shot, tiny super-net, {iterations} meta-iterations "
        f"per alpha, {subnet_count} random sub-nets x {len(tasks)} validation tasks; folder {folder}"
    )
    rows = []
    for alpha in alphas:
        spec = base.with_(shrink_alpha=alpha)
        out = folder / f"alpha_{alpha:g}"
        started = time.perf_counter()
        execute_meta_training(spec, out, eval_tasks=0)  # the accuracies come below
        train_s = time.perf_counter() - started
        _, run, _ = load_supernet(out / CHECKPOINT_NAME)
        scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
        accuracies = [scorer.score(arch, tasks).accuracy for arch in subnets]
        mean, ci = mean_ci(accuracies)
        largest = scorer.score(space.largest(), tasks).accuracy
        rows.append(
            {
                "alpha": alpha,
                "avg_subnet_accuracy": round(mean, 4),
                "ci95": round(ci, 4),
                "largest_accuracy": round(largest, 4),
                "train_s": round(train_s, 1),
                "paper_avg_accuracy": PAPER.get(alpha),
            }
        )
        print(
            f"alpha {alpha:>5g}: average over {subnet_count} sub-nets {100 * mean:.2f} ± {100 * ci:.2f} %, "
            f"largest {100 * largest:.2f} %, trained in {train_s:.1f} s"
            + (f" (paper, Mini-ImageNet: {100 * PAPER[alpha]:.2f} %)" if alpha in PAPER else "")
        )
    best = max(rows, key=lambda row: row["avg_subnet_accuracy"])
    print(json.dumps({
        "benchmark": "decay_alpha", "quick": quick, "rows": rows, "best_alpha": best["alpha"],
        "train_iterations": iterations, "subnets": subnet_count, "tasks": len(tasks), "ways": base.ways,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
