"""MetaNAS vs H-Meta-NAS vs MAML++ vs MAML at an equal meta-training wall-clock budget (Omniglot).

For each setting (5-way 1-shot and 20-way 1-shot by default; ``--ways``, ``--shots``) every
method meta-trains for the same share of ``--budget-minutes`` on this machine, with the same
cores (``--no-metanas``: the three methods of H-Meta-NAS Table 10 only):

- **MAML** and **MAML++**: the fixed 4-conv network (``backbone="maml"``, algorithm ``maml`` /
  ``mamlpp``), the `--preset`'s filters.
- **H-Meta-NAS**: the VGG9 super-net with progressive shrinking, then the GA (Algorithm 1) picks
  the sub-net with the lowest few-shot loss under a parameter budget equal to the 4-conv net's
  size (H-Meta-NAS Table 10's "at MAML's size"); the search runs once per setting and device, its
  time is reported as search time.
- **MetaNAS**: DARTS cells meta-trained with REPTILE and soft-pruning; every test task adapts
  weights and architecture and is pruned, so its search time is per task.

Every method is then tested on ``--eval-tasks`` Omniglot test tasks (the MAML++ character split;
MetaNAS on ``--metanas-eval-tasks`` tasks of its own from the same split with the same query count,
fewer because each task adapts weights *and* architecture of a DARTS network: about 10 s per
task on 2 CPU cores with the ``cpu`` preset), with accuracy ± 95 % CI,
parameters, MACs and the end-to-end latency of the deployed network on this CPU (TorchScript,
batch of one, ``--threads`` threads). H-Meta-NAS, MAML and MAML++ share the very same test tasks
(the adaption's reference-baseline evaluation).

    python benchmarks/method_comparison.py --budget-minutes 40 --pool 50 --generations 20
    python benchmarks/method_comparison.py --quick      # tiny networks, under a minute

Meta-training iterations are planned from a timing of this machine (``benchmarks/_budget.py``).
Last line: JSON with, per setting and method, ``acc``, ``ci95``, ``params``, ``macs``,
``latency_ms``, ``train_minutes`` and ``search_s`` (H-Meta-NAS: the GA; MetaNAS: per task).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._budget import cancel_after, meta_train_within  # noqa: E402
from engine.adaption import AdaptionRequest, run_adaption  # noqa: E402
from engine.cost import count_params  # noqa: E402
from engine.latency.measure import torch_threads  # noqa: E402
from engine.meta.runs import RunSpec  # noqa: E402
from engine.metanas.service import MetaNasRunSpec, evaluate_meta_state, train_task_source  # noqa: E402
from engine.metanas.train import CHECKPOINT_NAME as METANAS_CHECKPOINT  # noqa: E402
from engine.metanas.train import MetaState, reptile_meta_train  # noqa: E402
from engine.progress import JobCancelled  # noqa: E402
from engine.seeding import make_rngs  # noqa: E402

METHODS = ("MAML", "MAML++", "H-Meta-NAS", "MetaNAS")
#: MetaNAS preset per nasweb preset (same order of network size and training length).
METANAS_PRESET = {"tiny": "tiny", "cpu": "cpu", "paper": "paper"}


def metanas_within(spec: MetaNasRunSpec, budget_s: float, out: Path) -> tuple[MetaState, dict[str, Any]]:
    """Meta-train MetaNAS for ``budget_s``: meta-epochs planned from a timed run, cut at 1.25x."""
    probe = spec.config()
    source = train_task_source(spec, probe)
    # Time a warm-up epoch (weights only) and an epoch with architecture steps on a throwaway
    # run, and weight them by the share of warm-up in the planned schedule; the first epoch of
    # each pair warms the process up and is not counted.
    timing = probe.replace(meta_epochs=4, warmup_epochs=2, checkpoint_every=4)
    with torch_threads(spec.threads):
        state = reptile_meta_train(timing, source, rngs=make_rngs(spec.seed))
    warmup_s, search_s = state.history[1]["seconds"], state.history[3]["seconds"]
    warmup_share = probe.warmup_epochs / probe.meta_epochs
    per_epoch = warmup_share * warmup_s + (1 - warmup_share) * search_s
    epochs = max(4, int(budget_s / per_epoch))
    spec = replace(spec, meta_epochs=epochs)
    config = spec.config()
    started = time.perf_counter()
    completed = True
    with torch_threads(spec.threads):
        try:
            meta = reptile_meta_train(
                config,
                train_task_source(spec, config),
                rngs=make_rngs(spec.seed),
                progress=cancel_after(budget_s),
                checkpoint_dir=out,
            )
        except JobCancelled:
            completed = False
            meta = MetaState.load(out / METANAS_CHECKPOINT)
    report = {
        "meta_epochs_planned": epochs,
        "meta_epochs_done": meta.epochs_done,
        "metanas_preset": spec.preset,
        "warmup_epochs": config.warmup_epochs,
        "completed": completed,
        "train_minutes": round((time.perf_counter() - started) / 60, 2),
        "seconds_per_epoch_estimate": round(per_epoch, 4),
        "seconds_per_epoch_timed": {"warmup": round(warmup_s, 4), "search": round(search_s, 4)},
    }
    return meta, report


def _median_ms(measured: dict[str, Any] | None) -> float | None:
    return None if measured is None else round(float(measured["median_ms"]), 4)


def compare_setting(args: argparse.Namespace, ways: int, share_s: float, scratch: Path) -> dict[str, Any]:
    """Train the methods for ``share_s`` each on ``ways``-way ``args.shots``-shot, test them, return rows."""
    base = RunSpec(dataset="omniglot", ways=ways, shots=args.shots, preset=args.preset, threads=args.threads)
    trained = {
        "MAML": meta_train_within(base.with_(backbone="maml", algorithm="maml"), share_s, scratch / "maml"),
        "MAML++": meta_train_within(base.with_(backbone="maml"), share_s, scratch / "mamlpp"),
        "H-Meta-NAS": meta_train_within(base.with_(backbone="vgg9"), share_s, scratch / "supernet"),
    }
    metanas_spec = MetaNasRunSpec(
        dataset="omniglot",
        ways=ways,
        shots=args.shots,
        preset=METANAS_PRESET[args.preset],
        queries=base.query_count,
        threads=args.threads,
    )
    if "MetaNAS" in methods(args):
        meta, metanas_training = metanas_within(metanas_spec, share_s, scratch / "metanas")

    # H-Meta-NAS at the 4-conv net's size; MAML and MAML++ are tested on the same tasks as its
    # reference baselines.
    four_conv = trained["MAML++"].run.learner.model.extract()
    budget = count_params(four_conv)
    request = AdaptionRequest(
        supernet=str(trained["H-Meta-NAS"].checkpoint),
        constraint="params",
        budgets=(float(budget),),
        preset=args.adaption_preset,
        pool_size=args.pool,
        iterations=args.generations,
        test_tasks=args.eval_tasks,
        random_baseline=False,
        baseline_checkpoints=(str(trained["MAML"].checkpoint), str(trained["MAML++"].checkpoint)),
        export_onnx=False,
        measure_latency=True,
        threads=args.threads,
        search_workers=args.threads,
    )
    adaption = run_adaption(request, out_dir=scratch / "adaption")
    outcome = adaption.outcomes[0]
    baselines = {entry["name"].split(" ")[0]: entry for entry in adaption.baselines}
    rows: dict[str, Any] = {}
    for name in ("MAML", "MAML++"):
        entry = baselines[name]
        rows[name] = {
            "acc": entry["accuracy"]["mean"],
            "ci95": entry["accuracy"]["ci95"],
            "tasks": entry["accuracy"]["tasks"],
            "params": entry["params"],
            "macs": entry["macs"],
            "latency_ms": _median_ms(entry["measured_latency_ms"]),
            "train_minutes": trained[name].report["train_minutes"],
            "iterations": trained[name].report["iterations_done"],
            "search_s": None,
            "training": trained[name].report,
        }
    rows["H-Meta-NAS"] = {
        "acc": outcome.test_accuracy["mean"],
        "ci95": outcome.test_accuracy["ci95"],
        "tasks": outcome.test_accuracy["tasks"],
        "params": int(outcome.costs["params"]),
        "macs": int(outcome.costs["macs"]),
        "constraint_met": outcome.constraint_met,
        "latency_ms": _median_ms(outcome.model_card["latency_ms"]["measured_here"]),
        "train_minutes": trained["H-Meta-NAS"].report["train_minutes"],
        "iterations": trained["H-Meta-NAS"].report["iterations_done"],
        "search_s": round(adaption.search_s, 1),
        "search_note": "one GA search per (task distribution, device, budget)",
        "budget_params": budget,
        "arch": outcome.arch_code,
        "evaluations": adaption.evaluations,
        "ga": {"pool": request.ga_config().pool_size, "generations": request.ga_config().iterations},
        "training": trained["H-Meta-NAS"].report,
    }
    if "MetaNAS" not in methods(args):
        return rows
    evaluation = evaluate_meta_state(
        meta, metanas_spec, args.metanas_eval_tasks, seed=0, measure_device="cpu"
    )
    reference, per_task = evaluation["reference"], evaluation["tasks"]
    rows["MetaNAS"] = {
        "acc": reference["accuracy"]["mean"],
        "ci95": reference["accuracy"]["ci95"],
        "tasks": reference["accuracy"]["tasks"],
        "params": round(reference["params"]),
        "params_range": reference["params_range"],
        "macs": round(reference["macs"]),
        "latency_ms": reference["measured_latency_ms"],
        "train_minutes": metanas_training["train_minutes"],
        "iterations": metanas_training["meta_epochs_done"],
        "search_s": round(float(np.mean([task["adapt_seconds"] for task in per_task])), 3),
        "search_note": "architecture and weight adaption of every task (DARTS + soft-pruning)",
        "one_shot_acc": reference["one_shot_accuracy"]["mean"],
        "training": metanas_training,
    }
    return rows


def methods(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(m for m in METHODS if not (m == "MetaNAS" and args.no_metanas))


def _format(value: Any, pattern: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=48.0, help="meta-training budget of all runs together"
    )
    parser.add_argument("--preset", default="cpu", choices=tuple(METANAS_PRESET))
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument(
        "--no-metanas",
        action="store_true",
        help="MAML, MAML++ and H-Meta-NAS only (H-Meta-NAS Table 10's rows)",
    )
    parser.add_argument("--eval-tasks", type=int, default=600)
    parser.add_argument(
        "--metanas-eval-tasks",
        type=int,
        default=50,
        help="MetaNAS test tasks (each adapts and prunes its own network: ~10 s per task with the cpu preset)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adaption-preset", default="cpu", choices=("tiny", "cpu", "paper"))
    parser.add_argument(
        "--pool", type=int, default=None, help="GA pool size P (default: the adaption preset's)"
    )
    parser.add_argument(
        "--generations", type=int, default=None, help="GA iterations M (default: the preset's)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny presets, 5-way only, 0.1-minute budget, 20 (MetaNAS: 2) test tasks",
    )
    args = parser.parse_args()
    if args.quick:
        args.preset, args.adaption_preset, args.budget_minutes = "tiny", "tiny", 0.1
        args.ways, args.eval_tasks, args.metanas_eval_tasks = [5], 20, 2
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    share_s = args.budget_minutes * 60 / (len(methods(args)) * len(args.ways))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="method_comparison_") as scratch:
        for ways in args.ways:
            setting = f"{ways}w{args.shots}s"
            rows = compare_setting(args, ways, share_s, Path(scratch) / setting)
            results[setting] = rows
            print(
                f"\nOmniglot {ways}-way {args.shots}-shot, {share_s / 60:.1f} min of meta-training per method"
            )
            print("| method | accuracy | params | MACs | CPU latency (ms) | train (min) | search (s) |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for method in methods(args):
                row = rows[method]
                print(
                    f"| {method} | {100 * row['acc']:.2f} ± {100 * (row['ci95'] or 0):.2f} % | "
                    f"{row['params']:,} | {row['macs']:,} | {_format(row['latency_ms'], '{:.3f}')} | "
                    f"{row['train_minutes']} | {_format(row['search_s'], '{}')} |"
                )
    minutes = (time.perf_counter() - began) / 60
    print(f"total {minutes:.1f} min")
    summary: dict[str, Any] = {"minutes": round(minutes, 2), "budget_minutes": args.budget_minutes,
                               "preset": args.preset, "eval_tasks": args.eval_tasks, "quick": args.quick}  # fmt: skip
    for setting, rows in results.items():
        for method, row in rows.items():
            key = f"{method.lower().replace('+', 'p').replace('-', '')}_{setting}"
            summary[key] = {
                field: row[field]
                for field in ("acc", "ci95", "params", "macs", "latency_ms", "train_minutes", "search_s")
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
