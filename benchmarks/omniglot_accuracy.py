"""Omniglot few-shot accuracy reachable within a wall-clock budget on this machine.

For 5-way 1-shot and 20-way 1-shot, meta-trains (i) the MAML++ 4-conv baseline and (ii) the
VGG9 super-net (progressive shrinking), each within an equal share of ``--budget-minutes``,
then reports test accuracy ± 95 % CI over ``--eval-tasks`` test tasks (MAML++ character
split, 600 tasks by default) for the baseline, the super-net's largest sub-net and a small
sub-net, with parameters and MACs of each.

The number of meta-iterations is set from a short timing of this machine (each kind of step:
first/second order, largest/sampled sub-net, averaged over the run's schedule;
``benchmarks/_budget.py``) so the cosine schedule and progressive shrinking span the whole budget
(a run is cut at 1.25x its share if it overshoots).

    python benchmarks/omniglot_accuracy.py --budget-minutes 60 [--preset cpu] [--threads 2]
    python benchmarks/omniglot_accuracy.py --quick          # tiny networks, ~1 minute
    python benchmarks/omniglot_accuracy.py --preset paper --device cuda --budget-minutes 240

On ``--device cuda`` training and evaluation run on this machine's GPU (the ``vmap`` strategy) and
``peak_gpu_mb`` reports the GPU memory high-water mark.

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

import torch  # noqa: E402

from benchmarks._budget import meta_train_within  # noqa: E402
from engine.cost import arch_macs, arch_params, count_macs, count_params  # noqa: E402
from engine.meta.evaluate import evaluate  # noqa: E402
from engine.meta.runs import DEVICES, EVAL_SEED_STREAM, RunSpec, default_strategy, task_source  # noqa: E402
from engine.seeding import derive_seed  # noqa: E402
from engine.space import Arch, LayerChoice  # noqa: E402


def small_arch(space: Any) -> Arch:
    """A fixed small sub-net: half width, 3x3 kernels, ReLU, all layers."""
    layers = len(space.base_channels)
    arch = Arch(backbone=space.backbone, layers=(LayerChoice(3, 0.5, "relu"),) * layers, depth=layers)
    space.validate(arch)
    return arch


def peak_rss_mb(workers: int) -> float:
    """Peak memory of a meta-training job: this process plus its meta-batch worker processes.

    ``RUSAGE_CHILDREN`` gives the largest finished child's peak; counting it once per worker
    (and ignoring the pages they share with this process) makes this an upper bound.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers * child) / 1024


def train_and_evaluate(spec: RunSpec, budget_s: float, eval_tasks: int, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    trained = meta_train_within(spec, budget_s, out)
    spec, run, report = trained.spec, trained.run, trained.report
    _, test_batches = task_source(spec, "test")
    train_s = time.perf_counter() - started
    seed = derive_seed(spec.seed, EVAL_SEED_STREAM)
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
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to train and evaluate")
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
                device=args.device,
                strategy=default_strategy(args.device),
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
    workers = args.threads if args.device == "cpu" else 0  # the vmap strategy has no worker processes
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    base5, base20 = reports["maml_5w1s"]["baseline"], reports["maml_20w1s"]["baseline"]
    print(
        f"total {minutes:.1f} min, peak RSS {peak_rss_mb(workers):.0f} MB "
        f"(this process {peak_rss_mb(0):.0f} MB + {workers} meta-batch workers)"
        + (f", peak GPU memory {gpu_mb:.0f} MB" if gpu_mb is not None else "")
    )
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
                "peak_rss_mb": round(peak_rss_mb(workers), 1),
                "peak_gpu_mb": None if gpu_mb is None else round(gpu_mb, 1),
                "device": args.device,
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
