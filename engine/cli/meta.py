"""``meta-train`` and ``evaluate`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.meta.maml import STRATEGIES
from engine.meta.runs import BACKBONES, DATASETS, DEVICES, PRESETS, RunSpec, default_strategy
from engine.meta.service import evaluate_run, execute_meta_training, load_run
from engine.progress import ProgressEvent


class TerminalProgress:
    """tqdm bar for ``meta_train``/``evaluate`` events (the CLI's only use of tqdm)."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=description, unit="it", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, event: ProgressEvent) -> None:
        if event.get("total") is not None and self._bar.total != event["total"]:
            self._bar.total = event["total"]
        self._bar.n = event["current"]
        if event["kind"] == "meta_train":
            self._bar.set_postfix(
                loss=f"{event['loss']:.3f}",
                acc=f"{event['accuracy']:.3f}",
                p=f"{event['p_largest']:.2f}",
                order=2 if event["second_order"] else 1,
                refresh=False,
            )
        else:
            self._bar.set_postfix(acc=f"{event['accuracy']:.4f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="omniglot")
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument(
        "--queries", type=int, default=None, help="query images per class (default: preset's)"
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="vgg9",
        help="super-net backbone, or 'maml' (MAML++ baseline)",
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    parser.add_argument(
        "--iterations", type=int, default=None, help="total meta-iterations (default: preset's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU cores to use (never more than you have)")
    parser.add_argument(
        "--device", choices=DEVICES, default="cpu", help="where to train: this CPU or a CUDA GPU"
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="how a meta-batch's tasks are run: worker processes on the CPU, one vmapped batch on a GPU "
        "(the defaults); 'loop' is the per-task reference",
    )
    parser.add_argument(
        "--p-end", type=float, default=0.25, help="final probability of training the largest sub-net"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, metrics, run.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--eval-tasks", type=int, default=None, help="test tasks evaluated at the end (0 = none)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _meta_train(args: argparse.Namespace) -> int:
    spec = RunSpec(
        dataset=args.dataset,
        ways=args.ways,
        shots=args.shots,
        backbone=args.backbone,
        preset=args.preset,
        queries=args.queries,
        iterations=args.iterations,
        seed=args.seed,
        threads=args.threads,
        strategy=args.strategy or default_strategy(args.device),
        p_end=args.p_end,
        device=args.device,
    )
    bar = None if args.quiet else TerminalProgress("meta-train")
    try:
        summary = execute_meta_training(
            spec,
            args.out,
            resume=args.resume,
            progress=bar or (lambda event: None),
            eval_tasks=args.eval_tasks,
        )
    finally:
        if bar:
            bar.close()
    print(json.dumps(summary))
    return 0


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder written by meta-train")
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--arch", default="largest", help="'largest', 'smallest' or an Arch JSON (super-net runs)"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default=None, help="where to evaluate (default: where it was trained)"
    )
    parser.add_argument("--quiet", action="store_true")


def _evaluate(args: argparse.Namespace) -> int:
    run, state = load_run(args.run, device=args.device)
    bar = None if args.quiet else TerminalProgress(f"evaluate ({args.split})")
    try:
        result = evaluate_run(
            run, args.tasks, split=args.split, arch=args.arch, progress=bar or (lambda event: None)
        )
    finally:
        if bar:
            bar.close()
    result["iteration"] = state["iteration"]
    print(f"accuracy {100 * result['mean']:.2f}% ± {100 * result['ci95']:.2f}% over {result['tasks']} tasks")
    print(json.dumps(result))
    return 0


COMMANDS = {
    "meta-train": (
        "MAML++ meta-training of a super-net (progressive shrinking) or a baseline",
        _add_train_arguments,
        _meta_train,
    ),
    "evaluate": ("few-shot test accuracy ± 95% CI of a meta-trained run", _add_evaluate_arguments, _evaluate),
}
