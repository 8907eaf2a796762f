"""One meta-training run from a RunSpec to a summary: what the CLI and the dashboard's worker call.

The run folder holds run.json (spec + config), the checkpoint written by meta_train, metrics and
summary.json. Calling again with ``resume=True`` after a crash continues from the last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import atomic_write_json
from engine.latency.measure import torch_threads
from engine.meta.evaluate import evaluate
from engine.meta.runs import (
    EVAL_SEED_STREAM,
    Run,
    RunSpec,
    build_run,
    check_dataset,
    spec_on_device,
    task_source,
)
from engine.meta.train import CHECKPOINT_NAME, MetaTrainError, load_checkpoint, meta_train
from engine.progress import ProgressCallback, null_progress
from engine.seeding import derive_seed

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


def resolve_arch(run: Run, choice: str | dict | None) -> Any:
    """'largest', 'smallest', an Arch dict/JSON, or None for fixed baselines."""
    if run.space is None:
        return None
    if choice in (None, "largest"):
        return run.space.largest()
    if choice == "smallest":
        return run.space.smallest()
    from engine.space import Arch

    arch = Arch.from_dict(choice) if isinstance(choice, dict) else Arch.from_json(choice)
    run.space.validate(arch)
    return arch


def evaluate_run(
    run: Run,
    tasks: int,
    *,
    split: str = "test",
    arch: Any = "largest",
    progress: ProgressCallback = null_progress,
) -> dict[str, Any]:
    """Accuracy mean ± 95 % CI over ``tasks`` fixed tasks of ``split`` for one (sub-)net."""
    _, batches = task_source(run.spec, split)
    chosen = resolve_arch(run, arch)
    kwargs = {"arch": chosen} if chosen is not None else {}
    result = evaluate(
        run.learner,
        batches(tasks, run.config.meta_batch, derive_seed(run.spec.seed, EVAL_SEED_STREAM)),
        forward_kwargs=kwargs,
        total_tasks=tasks,
        progress=progress,
    )
    data = result.to_dict()
    data["split"] = split
    data["arch"] = chosen.to_dict() if chosen is not None else None
    return data


def execute_meta_training(
    spec: RunSpec,
    out: str | Path,
    *,
    resume: bool = False,
    progress: ProgressCallback = null_progress,
    eval_tasks: int | None = None,
) -> dict[str, Any]:
    """Meta-train (or continue) the run in ``out``, evaluate it, write and return summary.json."""
    out = Path(out)
    run_file = out / RUN_FILE
    if resume and run_file.exists():
        stored = RunSpec.from_dict(json.loads(run_file.read_text())["spec"])
        if stored != spec:
            raise MetaTrainError(f"{run_file} describes a different run: {stored}")
    # Missing files or too few classes: refused before the run folder is written.
    check_dataset(spec.dataset, spec.ways)
    run = build_run(spec)
    atomic_write_json(run_file, {"spec": spec.to_dict(), "config": run.config.to_dict()})
    # Training and its evaluation at the run's thread count (conv results depend on it), restored
    # afterwards for the worker's next job.
    with torch_threads(run.config.torch_threads):
        train_source, _ = task_source(spec, "train")
        started = time.perf_counter()
        result = meta_train(
            run.learner,
            train_source,
            run.config,
            out_dir=out,
            space=run.space,
            resume=resume and (out / CHECKPOINT_NAME).exists(),
            progress=progress,
            run_info=run.info,
        )
        summary: dict[str, Any] = {
            "iterations": result.iterations,
            "seconds": round(time.perf_counter() - started, 2),
        }
        last = result.history[-20:]
        if last:
            summary["train_accuracy_last20"] = float(np.mean([record["accuracy"] for record in last]))
        tasks = spec.preset_values.eval_tasks if eval_tasks is None else eval_tasks
        if tasks > 0:
            summary["test"] = evaluate_run(run, tasks, split="test", arch="largest", progress=progress)
            if run.space is not None:
                summary["test_smallest"] = evaluate_run(
                    run, tasks, split="test", arch="smallest", progress=progress
                )
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def load_run(out: str | Path, device: str | None = None) -> tuple[Run, dict[str, Any]]:
    """The run in folder ``out`` with its checkpoint's weights loaded, and the checkpoint state.

    ``device`` moves it elsewhere than it was trained (a GPU-trained run evaluated on a CPU), with
    that device's default strategy (:func:`engine.meta.runs.spec_on_device`).
    """
    out = Path(out)
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise MetaTrainError(f"{run_file} not found: is {out} a meta-train run folder?")
    spec = RunSpec.from_dict(json.loads(run_file.read_text())["spec"])
    run = build_run(spec if device is None else spec_on_device(spec, device))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    run.learner.load_state_dict(state["learner"])
    return run, state
