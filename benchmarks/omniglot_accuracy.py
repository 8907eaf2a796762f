"""Omniglot few-shot accuracy reachable within a wall-clock budget on this machine.

For 5-way 1-shot and 20-way 1-shot, meta-trains (i) the MAML++ 4-conv baseline and (ii) the
VGG9 super-net (progressive shrinking), each within an equal share of ``--budget-minutes``,
then reports test accuracy ± 95 % CI over ``--eval-tasks`` test tasks (MAML++ character
split, 600 tasks by default) for the baseline, the super-net's largest sub-net and a small
sub-net, with parameters and MACs of each.

The number of meta-iterations is set from a short timing of this machine so the cosine
schedule and progressive shrinking span the whole budget (a run is cut if it overshoots).

    python benchmarks/omniglot_accuracy.py --budget-minutes 60 [--preset cpu] [--threads 2]
    python benchmarks/omniglot_accuracy.py --quick          # tiny networks, ~1 minute

Last line: JSON with acc_5w1s, ci_5w1s, acc_20w1s, ci_20w1s (the MAML++ baseline), minutes,
params, macs (baseline, 20-way head), peak_rss_mb, and per-model details.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.cost import arch_macs, arch_params, count_macs, count_params  # noqa: E402
from engine.meta.evaluate import evaluate  # noqa: E402
from engine.meta.runs import EVAL_SEED_STREAM, RunSpec, build_run, task_source  # noqa: E402
from engine.meta.train import meta_train  # noqa: E402
from engine.progress import JobCancelled  # noqa: E402
from engine.seeding import derive_seed  # noqa: E402
from engine.space import Arch, LayerChoice  # noqa: E402


def small_arch(space: Any) -> Arch:
    """A fixed small sub-net: half width, 3x3 kernels, ReLU, all layers."""
    layers = len(space.base_channels)
    arch = Arch(backbone=space.backbone, layers=(LayerChoice(3, 0.5, "relu"),) * layers, depth=layers)
    space.validate(arch)
    return arch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds_per_iteration(spec: RunSpec) -> float:
    """Time two meta-iterations of a throwaway copy of the run (second order, the slower phase)."""
    run = build_run(spec)
    source, _ = task_source(spec, "train")
    rng = np.random.default_rng(0)
    kwargs = {"arch": run.space.largest()} if run.space is not None else {}
    late_epoch = run.config.epochs  # second order, final-step loss
    run.learner.meta_step(source(rng, run.config.meta_batch), epoch=late_epoch, forward_kwargs=kwargs)
    start = time.perf_counter()
    for _ in range(2):
        run.learner.meta_step(source(rng, run.config.meta_batch), epoch=late_epoch, forward_kwargs=kwargs)
    return (time.perf_counter() - start) / 2


def train_and_evaluate(spec: RunSpec, budget_s: float, eval_tasks: int, out: Path) -> dict[str, Any]:
    per_iteration = seconds_per_iteration(spec)
    iterations = max(4, int(budget_s / per_iteration))
    spec = spec.with_(iterations=iterations)
    run = build_run(spec)
    source, _ = task_source(spec, "train")
    _, test_batches = task_source(spec, "test")
    deadline = time.perf_counter() + 1.25 * budget_s

    def stop_at_deadline(event: dict[str, Any]) -> None:
        if time.perf_counter() > deadline:
            raise JobCancelled()

    started = time.perf_counter()
    completed = True
    try:
        result = meta_train(
            run.learner, source, run.config, out_dir=out, space=run.space, progress=stop_at_deadline
        )
        done = result.iterations
    except JobCancelled:
        completed = False
        done = json.loads((out / "metrics.json").read_text())["iteration"]
    train_s = time.perf_counter() - started
    seed = derive_seed(spec.seed, EVAL_SEED_STREAM)
    report: dict[str, Any] = {
        "backbone": spec.backbone,
        "ways": spec.ways,
        "iterations_planned": run.config.total_iterations,
        "iterations_done": done,
        "completed": completed,
        "train_minutes": round(train_s / 60, 2),
        "s_per_iteration_estimate": round(per_iteration, 3),
    }
    channels, size = 1, 28
    if run.space is None:
        result_eval = evaluate(run.learner, test_batches(eval_tasks, 8, seed))
        deployable = run.learner.model.extract(step=-1)
        report["baseline"] = {
            **result_eval.to_dict(),
            "params": count_params(deployable),
            "macs": count_macs(deployable, (channels, size, size)),
        }
    else:
        for name, arch in (("largest", run.space.largest()), ("small", small_arch(run.space))):
            result_eval = evaluate(
                run.learner, test_batches(eval_tasks, 8, seed), forward_kwargs={"arch": arch}
            )
            report[name] = {
                **result_eval.to_dict(),
                "params": arch_params(run.space, arch),
                "macs": arch_macs(run.space, arch),
                "arch": arch.to_dict(),
            }
    report["eval_minutes"] = round((time.perf_counter() - started - train_s) / 60, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=60.0, help="training budget for all four runs"
    )
    parser.add_argument("--preset", default="cpu", choices=("tiny", "cpu", "paper"))
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 0.6-minute budget, 100 test tasks")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.budget_minutes, args.eval_tasks = "tiny", 0.6, 100
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    runs = [(ways, backbone) for ways in (5, 20) for backbone in ("maml", "vgg9")]
    share = args.budget_minutes * 60 / len(runs)
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="omniglot_accuracy_") as scratch:
        for ways, backbone in runs:
            spec = RunSpec(
                dataset="omniglot",
                ways=ways,
                shots=1,
                backbone=backbone,
                preset=args.preset,
                threads=args.threads,
            )
            report = train_and_evaluate(spec, share, args.eval_tasks, Path(scratch) / f"{backbone}_{ways}")
            reports[f"{backbone}_{ways}w1s"] = report
            models = {
                key: value for key, value in report.items() if isinstance(value, dict) and "mean" in value
            }
            for model, figures in models.items():
                print(
                    f"{ways:2d}-way 1-shot {backbone:5s} {model:8s}: {100 * figures['mean']:.2f}% ± {100 * figures['ci95']:.2f}% "
                    f"({figures['tasks']} tasks), {figures['params']:,} params, {figures['macs']:,} MACs; "
                    f"{report['iterations_done']}/{report['iterations_planned']} iterations in {report['train_minutes']} min"
                )
    minutes = (time.perf_counter() - began) / 60
    base5, base20 = reports["maml_5w1s"]["baseline"], reports["maml_20w1s"]["baseline"]
    print(f"total {minutes:.1f} min, peak RSS {peak_rss_mb():.0f} MB")
    print(
        json.dumps(
            {
                "acc_5w1s": round(base5["mean"], 4),
                "ci_5w1s": round(base5["ci95"], 4),
                "acc_20w1s": round(base20["mean"], 4),
                "ci_20w1s": round(base20["ci95"], 4),
                "minutes": round(minutes, 2),
                "params": base20["params"],
                "macs": base20["macs"],
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "preset": args.preset,
                "budget_minutes": args.budget_minutes,
                "supernet_largest_5w1s": round(reports["vgg9_5w1s"]["largest"]["mean"], 4),
                "supernet_small_5w1s": round(reports["vgg9_5w1s"]["small"]["mean"], 4),
                "supernet_largest_20w1s": round(reports["vgg9_20w1s"]["largest"]["mean"], 4),
                "supernet_small_20w1s": round(reports["vgg9_20w1s"]["small"]["mean"], 4),
                "supernet_small_macs_20w1s": reports["vgg9_20w1s"]["small"]["macs"],
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
