"""``adapt`` and ``retrain`` subcommands (hardware-constrained adaption of a meta-trained super-net)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.adaption import (
    ADAPTION_PRESETS,
    FINAL_METRICS,
    TASK_SOURCES,
    WEIGHTS,
    AdaptionRequest,
    retrain_subnet,
    run_adaption,
)
from engine.adaption_presets import SEARCH_PRECISIONS
from engine.cpu import bfloat16_flags
from engine.meta.runs import DEVICES
from engine.progress import ProgressEvent
from engine.search.evolution import DEEPEN_MODES, FINALISTS_FROM

STATE_NAME = ".adaption-state.json"


class AdaptProgress:
    """tqdm bar over all GA generations of the sweep, then one line per later stage."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = tqdm(desc="adapt", unit="gen", dynamic_ncols=True, file=sys.stderr)
        self._stage: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event["kind"] == "adapt":
            self._bar.total = event["total"]
            self._bar.n = event["current"]
            self._bar.set_postfix(
                budget=f"{event['budget_index'] + 1}/{event['budgets']}",
                best=f"{event['best_fitness']:.3f}" if event["best_fitness"] is not None else "inf",
                evals=event["evaluations"],
                hits=event["cache_hits"],
                refresh=False,
            )
            self._bar.refresh()
        elif event["kind"] == "adapt_stage":
            if event["stage"] != self._stage:
                self._stage = event["stage"]
                self._bar.close()
                self._bar = self._tqdm(
                    desc=event["stage"].replace("_", " "),
                    total=event["total"],
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            self._bar.n = event["current"]
            self._bar.refresh()
        elif event["kind"] == "meta_train":
            self._bar.total = event["total"]
            self._bar.n = event["current"]
            self._bar.set_postfix(loss=f"{event['loss']:.3f}", acc=f"{event['accuracy']:.3f}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _quiet(event: ProgressEvent) -> None:
    return None


def _add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--supernet", required=True, help="super-net checkpoint written by meta-train")
    parser.add_argument("--lut", default=None, help="latency table (JSON) of the target device")
    parser.add_argument(
        "--budget",
        action="append",
        required=True,
        help="e.g. latency_ms=3, params=70K, macs=5M; repeat for a sweep (one kind)",
    )
    parser.add_argument("--support", default=None, help="support set: zip or folder of N class folders")
    parser.add_argument("--task-source", choices=TASK_SOURCES, default="validation")
    parser.add_argument("--weights", choices=WEIGHTS, default=None, help="default: finetuned with --support")
    parser.add_argument("--preset", choices=tuple(ADAPTION_PRESETS), default="cpu")
    parser.add_argument("--pool", type=int, default=None, help="GA pool size P (default: preset's)")
    parser.add_argument("--iterations", type=int, default=None, help="GA iterations M (default: preset's)")
    parser.add_argument("--tasks-per-slice", type=int, default=None)
    parser.add_argument("--slices", type=int, default=None, help="validation slices")
    parser.add_argument(
        "--final-slices",
        type=int,
        default=None,
        help="held-out slices of fresh tasks the final choice scores its candidates on (0: the search slices)",
    )
    parser.add_argument(
        "--final-metric",
        choices=FINAL_METRICS,
        default=None,
        help="what the final choice minimises on the held-out slices: loss or accuracy (error rate)",
    )
    parser.add_argument(
        "--search-metric",
        choices=FINAL_METRICS,
        default=None,
        help="what the GA and random search minimise on the search slices: loss (Algorithm 1's; the "
        "tiny and paper presets') or accuracy (the query error rate; the cpu preset's)",
    )
    parser.add_argument(
        "--finalists-from",
        choices=FINALISTS_FROM,
        default=None,
        help="the GA's finalists: the last generation's best, or the best of every architecture it scored",
    )
    parser.add_argument(
        "--warm-start",
        type=int,
        default=None,
        help="each budget's GA starts with at most this many of the best fitting sub-nets the looser "
        "budgets' GAs scored (they run first; 0: random initial pools, in the given order)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="stop a budget's GA once its best 10 %% (its elites) stayed the same this many generations "
        "in a row (0: run all iterations)",
    )
    parser.add_argument(
        "--deepen",
        choices=DEEPEN_MODES,
        default=None,
        help="what the layers a mutation adds hold: stored (the choices they carried, every preset's) "
        "or copy-last (the choices of the last layer before them)",
    )
    parser.add_argument(
        "--depth-elites",
        type=int,
        default=None,
        help="besides a GA's best 10 %%, the best this many sub-nets of every depth survive and parent "
        "children (0, every preset's: the best 10 %% only)",
    )
    parser.add_argument(
        "--search-precision",
        choices=SEARCH_PRECISIONS,
        default=None,
        help="arithmetic of the search slices' scores: float32 (every preset's) or bfloat16 (CPU "
        "autocast, cheaper on CPUs with bfloat16 instructions; the final choice and the test "
        "tasks stay float32)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-tasks", type=int, default=None, help="test tasks for accuracy (0: skip)")
    parser.add_argument(
        "--search-queries", type=int, default=None, help="query images per class while searching"
    )
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--invert-support", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--baseline", action="append", default=[], help="MAML/MAML++ baseline checkpoint")
    parser.add_argument("--no-random", action="store_true", help="skip the random-search baseline")
    parser.add_argument("--no-onnx", action="store_true", help="TorchScript only")
    parser.add_argument("--measure-latency", action="store_true", help="time the packages on this machine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the search scores candidates")
    parser.add_argument(
        "--fitness-memo",
        default=None,
        help="SQLite file of few-shot losses shared by requests of one super-net (e.g. next to its "
        "checkpoint): later requests - other devices, other budgets - reuse what earlier ones scored",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (one package per budget)")
    parser.add_argument(
        "--state", type=Path, default=None, help=f"resumable state (default OUT/{STATE_NAME})"
    )
    parser.add_argument("--quiet", action="store_true")


def _adapt(args: argparse.Namespace) -> int:
    request = AdaptionRequest.from_budget_strings(
        args.budget,
        supernet=args.supernet,
        lut=args.lut,
        preset=args.preset,
        pool_size=args.pool,
        iterations=args.iterations,
        tasks_per_slice=args.tasks_per_slice,
        num_slices=args.slices,
        final_slices=args.final_slices,
        final_metric=args.final_metric,
        search_metric=args.search_metric,
        finalists_from=args.finalists_from,
        warm_start=args.warm_start,
        patience=args.patience,
        deepen=args.deepen,
        depth_elites=args.depth_elites,
        search_precision=args.search_precision,
        seed=args.seed,
        task_source=args.task_source,
        support=args.support,
        invert_support={"auto": None, "yes": True, "no": False}[args.invert_support],
        weights=args.weights,
        finetune_steps=args.finetune_steps,
        search_queries=args.search_queries,
        test_tasks=args.test_tasks,
        random_baseline=not args.no_random,
        baseline_checkpoints=tuple(args.baseline),
        export_onnx=not args.no_onnx,
        measure_latency=args.measure_latency,
        threads=args.threads,
        device=args.device,
        fitness_memo=args.fitness_memo,
    )
    if request.search_precision_value == "bfloat16" and not bfloat16_flags():
        # Allowed (the scores are right), but the user asked for speed and will not get it.
        print(
            "warning: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16); bfloat16 search "
            "is emulated here and slower than float32",
            file=sys.stderr,
        )
    state = args.state if args.state is not None else args.out / STATE_NAME
    bar = None if args.quiet else AdaptProgress()
    try:
        result = run_adaption(request, out_dir=args.out, progress=bar or _quiet, state_path=state)
    finally:
        if bar:
            bar.close()
    for outcome in result.outcomes:
        accuracy = outcome.test_accuracy
        text = (
            f"{100 * accuracy['mean']:.2f}% ± {100 * accuracy['ci95']:.2f}%" if accuracy else "not evaluated"
        )
        print(
            f"{outcome.slug}: {outcome.arch_code}  costs {outcome.costs}  test accuracy {text}  -> {outcome.package}"
        )
    summary: dict[str, Any] = {
        "out": str(args.out),
        "evaluations": result.evaluations,
        "cache_hits": result.cache_hits,
        "memo_hits": result.memo_hits,
        "ms_per_evaluation": result.ms_per_evaluation,
        "search_s": round(result.search_s, 3),
        "constraints_met": result.constraints_met,
        "packages": [outcome.package for outcome in result.outcomes],
    }
    print(json.dumps(summary))
    return 0


def _add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--supernet", required=True, help="super-net checkpoint written by meta-train")
    parser.add_argument("--arch", required=True, help="Arch JSON, or a package folder's model_card.json")
    parser.add_argument("--iterations", type=int, required=True, help="meta-iterations of re-training")
    parser.add_argument("--test-tasks", type=int, default=0, help="test tasks before/after (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quiet", action="store_true")


def _retrain(args: argparse.Namespace) -> int:
    text = args.arch
    if Path(text).is_file():
        data = json.loads(Path(text).read_text())
        arch = data.get("architecture", data)
    else:
        try:
            arch = json.loads(text)
        except ValueError as error:
            raise ValueError(f"--arch is neither a file nor Arch JSON: {error}") from None
    bar = None if args.quiet else AdaptProgress()
    try:
        result = retrain_subnet(
            args.supernet,
            arch,
            iterations=args.iterations,
            out=args.out,
            progress=bar or _quiet,
            test_tasks=args.test_tasks,
            threads=args.threads,
            seed=args.seed,
        )
    finally:
        if bar:
            bar.close()
    print(json.dumps(result.to_dict()))
    return 0


COMMANDS = {
    "adapt": (
        "hardware-constrained GA adaption of a meta-trained super-net: one model package per budget",
        _add_adapt_arguments,
        _adapt,
    ),
    "retrain": (
        "meta-train one fixed sub-net further from its inherited super-net weights",
        _add_retrain_arguments,
        _retrain,
    ),
}
