"""How well a meta-trained super-net's inherited weights serve its sub-nets.

Issue 10's "why": the meta-weights must let *every* sub-net adapt to a new few-shot task in a
few steps, and the GA (issue 6) can only pick well among sub-nets that differ in real quality.
This script measures where that holds and where it does not, on validation tasks, with the
learner's own inner loop (as the GA's fitness and the evaluation do):

* the largest sub-net, and sub-nets that differ from it in one dimension only (random
  activations, kernels, widths or depth, the rest as the largest), then fully random ones;
* each dimension at one value everywhere (e.g. every kernel 3), to see which choices fail;
* the learned per-step inner rates (LSLR) scaled by 0.3 / 1 / 3 on the random sub-nets: if a
  larger step helps them, the rates learned mostly on the largest sub-net are too small for them;
* ``--retrain N``: one sub-net (every width 1.0, the rest as the largest) meta-trained alone for N
  more iterations from its inherited weights (the paper's re-training stage), before/after:
  the part of the gap that weight sharing costs.

    python benchmarks/subnet_quality.py [--quick] [--train-iterations 1500] [--supernet CKPT]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._validation import mean_ci, validation_tasks  # noqa: E402
from engine.adaption import load_supernet, retrain_subnet  # noqa: E402
from engine.meta.runs import RunSpec  # noqa: E402
from engine.meta.service import execute_meta_training  # noqa: E402
from engine.meta.train import CHECKPOINT_NAME  # noqa: E402
from engine.search.adapt import SuperNetScorer, inner_loop_from_learner  # noqa: E402
from engine.seeding import derive_seed  # noqa: E402

DIMENSIONS = ("activation", "kernel", "width", "depth")
RATE_SCALES = (0.3, 1.0, 3.0)


def with_layers(arch, **fields):
    """``arch`` with ``fields`` set on every layer."""
    return dataclasses.replace(
        arch, layers=tuple(dataclasses.replace(layer, **fields) for layer in arch.layers)
    )


def one_dimension_random(space, largest, dimension: str, rng) -> object:
    """The largest sub-net with ``dimension`` drawn at random (per layer, or the depth)."""
    sample = space.sample(rng)
    if dimension == "depth":
        return largest.with_depth(sample.depth)
    layers = tuple(
        dataclasses.replace(layer, **{dimension: getattr(drawn, dimension)})
        for layer, drawn in zip(largest.layers, sample.layers, strict=True)
    )
    return dataclasses.replace(largest, layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="few iterations, archs and tasks (under a minute)"
    )
    parser.add_argument("--supernet", default=None, help="checkpoint to study instead of training a tiny one")
    parser.add_argument("--train-iterations", type=int, default=None, help="tiny super-net (1500; quick 96)")
    parser.add_argument("--archs", type=int, default=None, help="random sub-nets per family (15; quick 4)")
    parser.add_argument("--tasks", type=int, default=None, help="validation tasks (64; quick 16)")
    parser.add_argument(
        "--retrain",
        type=int,
        default=None,
        help="re-training iterations of one sub-net (600; quick 24; 0 skips)",
    )
    parser.add_argument(
        "--p-end",
        type=float,
        default=None,
        help="end probability of the largest sub-net (RunSpec default 0.25)",
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quick = args.quick
    arch_count = args.archs or (4 if quick else 15)
    task_count = args.tasks or (16 if quick else 64)
    retrain_iterations = (24 if quick else 600) if args.retrain is None else args.retrain
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="subnet_quality_"))

    started = time.perf_counter()
    if args.supernet:
        checkpoint = Path(args.supernet)
        source = str(checkpoint)
    else:
        spec = RunSpec(
            dataset="omniglot", ways=args.ways, shots=1, backbone="vgg9", preset="tiny",
            iterations=args.train_iterations or (96 if quick else 1500), seed=args.seed, threads=args.threads,
        )  # fmt: skip
        if args.p_end is not None:
            spec = spec.with_(p_end=args.p_end)
        execute_meta_training(spec, folder / "supernet", eval_tasks=0)  # the accuracies come below
        checkpoint = folder / "supernet" / CHECKPOINT_NAME
        source = f"tiny preset trained here, p_end {spec.p_end:g}"
    spec, run, trained_iterations = load_supernet(checkpoint)
    source = f"{source} ({spec.preset} preset, {trained_iterations} meta-iterations)"
    train_s = time.perf_counter() - started
    space = run.space
    tasks = validation_tasks(spec, task_count, args.seed)
    print(
        f"sub-net quality: Omniglot {spec.ways}-way {spec.shots}-shot {spec.backbone} super-net, {source}, "
        f"{len(tasks)} validation tasks, {arch_count} random sub-nets per family; trained/loaded in {train_s:.1f} s"
    )
    base_loop = inner_loop_from_learner(run.learner)
    scorer = SuperNetScorer(run.learner.model, base_loop)

    def accuracy(arch) -> float:
        return float(scorer.score(arch, tasks).accuracy)

    largest = space.largest()
    largest_acc = accuracy(largest)
    print(f"largest sub-net: {100 * largest_acc:.2f} %")
    rng = np.random.default_rng(derive_seed(args.seed, 11))
    families = {
        dimension: [one_dimension_random(space, largest, dimension, rng) for _ in range(arch_count)]
        for dimension in DIMENSIONS
    }
    families["all"] = [space.sample(rng) for _ in range(arch_count)]
    family_rows = {}
    for name, archs in families.items():
        accuracies = [accuracy(arch) for arch in archs]
        mean, ci = mean_ci(accuracies)
        family_rows[name] = {"mean": round(mean, 4), "ci95": round(ci, 4), "min": round(min(accuracies), 4)}
        label = "every dimension random" if name == "all" else f"only {name} random"
        print(f"{label:>24}: {100 * mean:.2f} ± {100 * ci:.2f} % (worst {100 * min(accuracies):.2f} %)")

    uniform = {}
    for activation in space.activations:
        uniform[f"activation={activation}"] = accuracy(with_layers(largest, activation=activation))
    for kernel in space.kernels:
        uniform[f"kernel={kernel}"] = accuracy(with_layers(largest, kernel=kernel))
    for width in space.widths:
        uniform[f"width={width:g}"] = accuracy(with_layers(largest, width=width))
    for depth in space.depths:
        uniform[f"depth={depth}"] = accuracy(largest.with_depth(depth))
    print("one value everywhere, the rest as the largest:")
    print("  " + ", ".join(f"{key} {100 * value:.1f} %" for key, value in uniform.items()))

    rate_rows = {}
    for scale in RATE_SCALES:
        scaled = dataclasses.replace(
            base_loop,
            learning_rates={name: rates * scale for name, rates in base_loop.learning_rates.items()},
        )
        scaled_scorer = SuperNetScorer(run.learner.model, scaled)
        random_mean, _ = mean_ci(
            [float(scaled_scorer.score(arch, tasks).accuracy) for arch in families["all"]]
        )
        largest_scaled = float(scaled_scorer.score(largest, tasks).accuracy)
        rate_rows[f"{scale:g}"] = {"random": round(random_mean, 4), "largest": round(largest_scaled, 4)}
        print(
            f"inner rates x{scale:g}: random sub-nets {100 * random_mean:.2f} %, largest {100 * largest_scaled:.2f} %"
        )

    retrain = None
    if retrain_iterations > 0:
        arch = with_layers(largest, width=1.0)
        result = retrain_subnet(
            checkpoint, arch, iterations=retrain_iterations, out=folder / "retrain", test_tasks=task_count,
            threads=args.threads, seed=args.seed,
        )  # fmt: skip
        retrain = {
            "arch": "every width 1.0, the rest as the largest",
            "iterations": retrain_iterations,
            "before": round(result.accuracy_before["mean"], 4),
            "after": round(result.accuracy_after["mean"], 4),
            "seconds": round(result.seconds, 1),
        }
        print(
            f"re-trained alone for {retrain_iterations} iterations (every width 1.0): "
            f"{100 * retrain['before']:.2f} % -> {100 * retrain['after']:.2f} % on {task_count} test tasks"
        )
    print(json.dumps({
        "benchmark": "subnet_quality", "quick": quick, "supernet": source, "ways": spec.ways,
        "tasks": len(tasks), "archs_per_family": arch_count, "largest_acc": round(largest_acc, 4),
        "random_acc": family_rows["all"]["mean"], "families": family_rows,
        "uniform": {key: round(value, 4) for key, value in uniform.items()}, "inner_rate_scale": rate_rows,
        "retrain": retrain, "train_s": round(train_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
