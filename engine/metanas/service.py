"""MetaNAS runs end to end: what the dashboard's worker calls (mirrors ``engine.meta.service``).

``execute_metanas_training(spec, out)`` meta-trains a :class:`MetaNasRunSpec` into folder ``out``
(run.json, the REPTILE checkpoint, summary.json), resumable after a crash or a cancellation, then
evaluates it on test tasks: each task gets its own adapted, pruned network, which is counted
(parameters, MACs) and timed end to end on this machine, because a DARTS cell is not a chain of
layers a latency lookup table could add up. The summary's ``reference`` is the method's point on a
Pareto chart (mean accuracy ± 95 % CI, mean costs).

``adapt_metanas(run_dir, out_dir, ...)`` is one adaption request: adapt weights and architecture
to a task (the user's support set, or a test task of the run's dataset), prune, export TorchScript
with a model card, measure the exported model end to end, and evaluate the method on test tasks.
Progress events are per meta-epoch and per evaluated task (``kind`` ``meta_train`` with the same
keys as H-Meta-NAS meta-training, ``metanas_eval``, ``metanas_adapt``); per-step events of the task
learner are not forwarded (thousands per run).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.atomic import atomic_write_json
from engine.cost import count_macs, count_params
from engine.latency.measure import measure_module, torch_threads
from engine.meta.evaluate import confidence_interval95
from engine.meta.runs import DATASETS as RUN_DATASETS
from engine.meta.runs import IMAGE_SHAPES as RUN_IMAGE_SHAPES
from engine.meta.runs import RunSpecError
from engine.meta.runs import check_dataset as check_run_dataset
from engine.metanas.adapt import TaskModel, adapt_task, export_task_model
from engine.metanas.config import PRESET_NAMES, MetaNasConfig
from engine.metanas.tasks import SyntheticTaskSource, TaskSource, sampler_task_source
from engine.metanas.train import CHECKPOINT_NAME, MetaNasCheckpointError, MetaState, reptile_meta_train
from engine.progress import ProgressCallback, null_progress
from engine.seeding import derive_seed, make_rngs

METHOD = "metanas"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
ADAPTION_FILE = "metanas_adaption.json"
CARD_FORMAT = "nasweb-metanas-model/1"
#: The datasets of H-Meta-NAS runs (engine.meta.runs), at the same image shapes, except that
#: synthetic tasks are smaller here so that engine tests stay fast.
DATASETS = RUN_DATASETS
IMAGE_SHAPES = {**RUN_IMAGE_SHAPES, "synthetic": (1, 12)}
#: Test tasks evaluated after meta-training / per adaption request, per preset.
EVAL_TASKS = {"tiny": 4, "cpu": 100, "paper": 600, "paper_miniimagenet": 600}
#: Query images per class of meta-training and test tasks (``None`` in the spec: this).
DEFAULT_QUERIES = {"tiny": 3}
DEFAULT_QUERY_COUNT = 5
OMNIGLOT_PROTOCOL = "mamlpp"
# derive_seed streams of one run's seed.
TEST_TASK_STREAM = 21
EVAL_ADAPT_STREAM = 22
LATENCY_REPEATS = 20
LATENCY_WARMUP = 3


class MetaNasRunError(ValueError):
    """A MetaNAS run or adaption that cannot be carried out; the message names the cause."""


@dataclass(frozen=True)
class MetaNasRunSpec:
    """A MetaNAS meta-training run as plain JSON-friendly values (stored in run.json)."""

    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    preset: str = "tiny"
    queries: int | None = None
    #: Meta-epochs (``None``: the preset's); the warm-up keeps its share of the preset's schedule.
    meta_epochs: int | None = None
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise MetaNasRunError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.preset not in PRESET_NAMES:
            raise MetaNasRunError(f"unknown MetaNAS preset {self.preset!r}; choose one of {PRESET_NAMES}")
        for name, minimum in (("ways", 2), ("shots", 1), ("seed", 0), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise MetaNasRunError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("queries", "meta_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MetaNasRunError(f"{name} must be a positive integer or null, got {value!r}")
        self.config()  # a MetaNasConfigError (ValueError) names a bad combination

    @property
    def query_count(self) -> int:
        if self.queries is not None:
            return self.queries
        return DEFAULT_QUERIES.get(self.preset, DEFAULT_QUERY_COUNT)

    def config(self) -> MetaNasConfig:
        base = MetaNasConfig.preset(self.preset)
        channels, size = IMAGE_SHAPES[self.dataset]
        changes: dict[str, Any] = {"n_way": self.ways, "in_channels": channels, "image_size": size}
        if self.meta_epochs is not None:
            warmup = round(base.warmup_epochs * self.meta_epochs / base.meta_epochs)
            changes.update(
                meta_epochs=self.meta_epochs,
                warmup_epochs=min(warmup, self.meta_epochs),
                checkpoint_every=min(base.checkpoint_every, self.meta_epochs),
            )
        return base.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaNasRunSpec:
        values = dict(data)
        method = values.pop("method", METHOD)
        if method != METHOD:
            raise MetaNasRunError(f"not a MetaNAS run spec (method {method!r})")
        return cls(**values)


# ------------------------------------------------------------------------------------ tasks
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def train_task_source(spec: MetaNasRunSpec, config: MetaNasConfig) -> TaskSource:
    """Meta-training tasks: ``meta_train_shots`` support images per class (A.2), rotations as augmentation."""
    if spec.dataset == "synthetic":
        return SyntheticTaskSource(
            n_way=spec.ways,
            shots=config.meta_train_shots,
            query_shots=spec.query_count,
            in_channels=config.in_channels,
            image_size=config.image_size,
        )
    from engine.data.sampling import TaskSampler

    sampler = TaskSampler(
        _dataset(spec, "train"),
        spec.ways,
        config.meta_train_shots,
        spec.query_count,
        spec.seed,
        augment_rotations=spec.dataset == "omniglot",
    )
    return sampler_task_source(sampler)


def test_tasks(spec: MetaNasRunSpec, count: int, seed: int) -> Iterator[Task]:
    """``count`` fixed ``ways``-way ``shots``-shot tasks of the test split, one at a time."""
    if spec.dataset == "synthetic":
        source = SyntheticTaskSource(
            n_way=spec.ways,
            shots=spec.shots,
            query_shots=spec.query_count,
            image_size=IMAGE_SHAPES["synthetic"][1],
        )
        generator = make_rngs(seed).torch
        for _ in range(count):
            yield source.sample_task(generator)
        return
    from engine.data.sampling import TaskSampler

    sampler = TaskSampler(_dataset(spec, "test"), spec.ways, spec.shots, spec.query_count, seed)
    for batch in sampler.fixed_tasks(count, seed).batches(16):
        for index in range(batch.num_tasks):
            yield batch.support_x[index], batch.support_y[index], batch.query_x[index], batch.query_y[index]


def _dataset(spec: MetaNasRunSpec, split: str) -> Any:
    from engine.data.registry import load_dataset

    if spec.dataset == "omniglot":
        return load_dataset("omniglot", split, protocol=OMNIGLOT_PROTOCOL, rotations_as_classes=False)
    return load_dataset(spec.dataset, split, image_size=IMAGE_SHAPES[spec.dataset][1])


def check_dataset(spec: MetaNasRunSpec) -> None:
    """Missing files or a split with fewer classes than ``ways``: refused before a run starts
    (the rule of every method, engine.meta.runs.check_dataset, as this module's error)."""
    try:
        check_run_dataset(spec.dataset, spec.ways)
    except RunSpecError as error:
        raise MetaNasRunError(str(error)) from error


# ------------------------------------------------------------------------------ measurement
def network_costs(
    task_model: TaskModel, config: MetaNasConfig, *, measure_device: str | None, threads: int
) -> dict[str, Any]:
    """Parameters and MACs of the pruned network, and its end-to-end latency (batch of one) when asked."""
    shape = (config.in_channels, config.image_size, config.image_size)
    costs: dict[str, Any] = {
        "params": count_params(task_model.network),
        "macs": count_macs(task_model.network, shape),
        "latency_ms": None,
        "latency": None,
    }
    if measure_device is not None:
        stats = measure_module(
            task_model.network,
            (1, *shape),
            repeats=LATENCY_REPEATS,
            warmup=LATENCY_WARMUP,
            threads=threads,
            device=measure_device,
        )
        costs["latency_ms"] = stats.median_ms
        costs["latency"] = {**stats.to_dict(), "device": measure_device, "batch_size": 1}
    return costs


@torch.no_grad()
def _query_metrics(task_model: TaskModel, query_x: torch.Tensor, query_y: torch.Tensor) -> dict[str, float]:
    metrics = task_model.evaluate(query_x, query_y)
    metrics["query_loss"] = float(F.cross_entropy(task_model.predict(query_x), query_y))
    return metrics


def _accuracy(values: Sequence[float], *, split: str, dataset: str) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    ci = confidence_interval95(array)
    return {
        "mean": float(array.mean()),
        "ci95": ci if math.isfinite(ci) else None,
        "tasks": int(array.size),
        "split": split,
        "dataset": dataset,
    }


def evaluate_meta_state(
    meta: MetaState,
    spec: MetaNasRunSpec,
    tasks: int,
    *,
    seed: int,
    measure_device: str | None = "cpu",
    progress: ProgressCallback = null_progress,
) -> dict[str, Any]:
    """Adapt, prune and evaluate ``tasks`` test tasks; the method's Pareto point and the per-task figures."""
    if tasks < 1:
        raise MetaNasRunError(f"tasks must be >= 1, got {tasks}")
    rngs = make_rngs(derive_seed(seed, EVAL_ADAPT_STREAM))
    per_task = []
    for index, (support_x, support_y, query_x, query_y) in enumerate(
        test_tasks(spec, tasks, derive_seed(seed, TEST_TASK_STREAM))
    ):
        task_model = adapt_task(meta, support_x, support_y, rngs=rngs.child(index))
        costs = network_costs(task_model, meta.config, measure_device=measure_device, threads=spec.threads)
        per_task.append(
            {
                **_query_metrics(task_model, query_x, query_y),
                "params": costs["params"],
                "macs": costs["macs"],
                "latency_ms": costs["latency_ms"],
                "kept_operations": task_model.genotype.kept_operation_count(),
                "adapt_seconds": task_model.adapt_seconds,
            }
        )
        progress({"kind": "metanas_eval", "current": index + 1, "total": tasks,
                  "message": f"MetaNAS: adapted and measured test task {index + 1}/{tasks}"})  # fmt: skip
    return {"reference": reference_point(per_task, spec, meta), "tasks": per_task}


def reference_point(per_task: list[dict[str, Any]], spec: MetaNasRunSpec, meta: MetaState) -> dict[str, Any]:
    """MetaNAS as one point of a Pareto chart: mean accuracy ± CI, mean costs over the task networks."""
    latencies = [t["latency_ms"] for t in per_task if t["latency_ms"] is not None]
    config = meta.config
    return {
        "name": "MetaNAS",
        "method": METHOD,
        "accuracy": _accuracy([t["pruned_accuracy"] for t in per_task], split="test", dataset=spec.dataset),
        "one_shot_accuracy": _accuracy(
            [t["one_shot_accuracy"] for t in per_task], split="test", dataset=spec.dataset
        ),
        "loss": float(np.mean([t["query_loss"] for t in per_task])),
        "params": float(np.mean([t["params"] for t in per_task])),
        "params_range": [min(t["params"] for t in per_task), max(t["params"] for t in per_task)],
        "macs": float(np.mean([t["macs"] for t in per_task])),
        "measured_latency_ms": float(np.median(latencies)) if latencies else None,
        "latency_note": "median over the tasks' pruned networks of their end-to-end median (TorchScript, "
        "batch of one) on the machine that evaluated the run; DARTS cells do not fit a layer LUT",
        "accuracy_protocol": (
            f"{len(per_task)} {spec.dataset} test tasks ({spec.ways}-way {spec.shots}-shot, "
            f"{spec.query_count} queries per class): each task adapts weights and architecture "
            f"({config.test_arch_steps}+{config.test_weight_steps} steps), is pruned at "
            f"{config.prune_threshold} and its pruned network classifies the query set (batch statistics); "
            "costs are means over the task networks"
        ),
        "meta_epochs": meta.epochs_done,
    }


# ------------------------------------------------------------------------------ meta-training
def _forward_meta_epochs(progress: ProgressCallback, total_started: float) -> ProgressCallback:
    """MetaNAS meta-epoch events in the shape of H-Meta-NAS meta-training events (same charts)."""

    def forward(event: dict[str, Any]) -> None:
        if event.get("stage") != "meta_train":
            return
        current, total = event["current"], event["total"]
        elapsed = time.perf_counter() - total_started
        rate = current / elapsed if elapsed > 0 else None
        progress(
            {
                "kind": "meta_train",
                "method": METHOD,
                "current": current,
                "total": total,
                "loss": event["support_loss"],
                "accuracy": event["query_accuracy"],
                "phase": event["phase"],
                "it_per_s": rate,
                "eta_s": (total - current) / rate if rate else None,
                "message": f"MetaNAS meta-epoch {current}/{total} ({event['phase']})",
            }
        )

    return forward


def execute_metanas_training(
    spec: MetaNasRunSpec,
    out: str | Path,
    *,
    resume: bool = False,
    progress: ProgressCallback = null_progress,
    eval_tasks: int | None = None,
    measure_device: str | None = "cpu",
) -> dict[str, Any]:
    """Meta-train (or continue) the run in ``out``, evaluate it on test tasks, write and return summary.json."""
    out = Path(out)
    run_file = out / RUN_FILE
    if resume and run_file.exists():
        stored = MetaNasRunSpec.from_dict(json.loads(run_file.read_text())["spec"])
        if stored != spec:
            raise MetaNasRunError(f"{run_file} describes a different run: {stored}")
    config = spec.config()
    check_dataset(spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {"spec": spec.to_dict(), "config": config.to_dict()})
    started = time.perf_counter()
    with torch_threads(spec.threads):
        meta = reptile_meta_train(
            config,
            train_task_source(spec, config),
            rngs=make_rngs(spec.seed),
            progress=_forward_meta_epochs(progress, started),
            checkpoint_dir=out,
            resume=resume and (out / CHECKPOINT_NAME).exists(),
        )
        train_seconds = time.perf_counter() - started
        summary: dict[str, Any] = {
            "method": METHOD,
            "iterations": meta.epochs_done,
            "seconds": round(train_seconds, 2),
        }
        last = meta.history[-20:]
        if last:
            summary["train_accuracy_last20"] = float(np.mean([r["query_accuracy"] for r in last]))
        tasks = EVAL_TASKS[spec.preset] if eval_tasks is None else eval_tasks
        if tasks > 0:
            evaluation = evaluate_meta_state(
                meta, spec, tasks, seed=spec.seed, measure_device=measure_device, progress=progress
            )
            summary["test"] = evaluation["reference"]["accuracy"]
            summary["test_one_shot"] = evaluation["reference"]["one_shot_accuracy"]
            summary["reference"] = evaluation["reference"]
            summary["test_tasks"] = evaluation["tasks"]
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def load_metanas_run(out: str | Path) -> tuple[MetaNasRunSpec, MetaState]:
    """The run in folder ``out``: its spec and its meta-learned weights and architecture."""
    out = Path(out)
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise MetaNasRunError(f"{run_file} not found: is {out} a MetaNAS run folder?")
    try:
        spec = MetaNasRunSpec.from_dict(json.loads(run_file.read_text())["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise MetaNasRunError(f"{run_file}: not a MetaNAS run ({error})") from None
    checkpoint = out / CHECKPOINT_NAME
    if not checkpoint.exists():
        raise MetaNasRunError(f"{checkpoint} not found: the run has not finished a meta-epoch")
    try:
        meta = MetaState.load(checkpoint)
    except MetaNasCheckpointError as error:
        raise MetaNasRunError(str(error)) from None
    if meta.config.to_dict() != spec.config().to_dict():
        raise MetaNasRunError(f"{checkpoint} was written with another configuration than {run_file}")
    return spec, meta


# ------------------------------------------------------------------------------ adaption
@dataclass(frozen=True)
class MetaNasAdaptionRequest:
    """One adaption of a MetaNAS run: the task (support set or a test task), budgets to check, measurement."""

    run_dir: str
    #: Budgets are not search constraints (MetaNAS is not hardware-aware): each is checked and reported.
    constraint: str = "params"
    budgets: tuple[float, ...] = ()
    support: str | None = None
    #: Test tasks for the method's accuracy (0: skip).
    eval_tasks: int = 4
    seed: int = 0
    #: "cpu"/"cuda": time the networks end to end there; None: no latency.
    measure_device: str | None = "cpu"
    #: Written into the card: where the latency was measured and why there.
    measure_note: str = ""
    threads: int = 1

    def __post_init__(self) -> None:
        from engine.search.constraints import COST_KINDS

        if self.constraint not in COST_KINDS:
            raise MetaNasRunError(f"constraint must be one of {COST_KINDS}, got {self.constraint!r}")
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        if any(not math.isfinite(b) or b <= 0 for b in self.budgets):
            raise MetaNasRunError(f"budgets must be finite and positive, got {list(self.budgets)}")
        if self.eval_tasks < 0 or self.eval_tasks == 1:
            raise MetaNasRunError("eval_tasks must be 0 (skip) or >= 2 (a confidence interval)")
        if self.measure_device not in (None, "cpu", "cuda"):
            raise MetaNasRunError(
                f"measure_device must be 'cpu', 'cuda' or null, got {self.measure_device!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["budgets"] = list(self.budgets)
        return data


def _support_task(
    request: MetaNasAdaptionRequest, spec: MetaNasRunSpec, config: MetaNasConfig
) -> tuple[Task, Any]:
    """The user's images split per class: the first half (at least one) to query, the rest to adapt on."""
    from engine.adaption import DATASET_PREPROCESSING
    from engine.data.errors import DatasetError
    from engine.data.image_folder import load_support_set

    path = Path(request.support)  # type: ignore[arg-type]
    normalization, invert = DATASET_PREPROCESSING[spec.dataset]
    try:
        support = load_support_set(
            path,
            image_size=config.image_size,
            channels=config.in_channels,
            normalization=normalization,
            workers=1,
        )
    except (DatasetError, OSError) as error:
        raise MetaNasRunError(f"support set {path}: {error}") from None
    if support.ways != spec.ways:
        raise MetaNasRunError(
            f"support set {path} has {support.ways} classes but the MetaNAS run is {spec.ways}-way: "
            f"give exactly {spec.ways} class folders"
        )
    x = support.x
    if invert:  # Omniglot networks are trained on white strokes on black
        from engine.search.package import Preprocessing

        x = Preprocessing(
            config.in_channels, config.image_size, normalization.mean, normalization.std, True
        ).invert_tensor(x)
    labels = support.y.numpy()
    by_class = [np.flatnonzero(labels == c) for c in range(support.ways)]
    small = [support.class_names[c] for c, idx in enumerate(by_class) if len(idx) < 2]
    if small:
        raise MetaNasRunError(
            f"every class needs >= 2 images (adapt on some, measure accuracy on the rest): {small}"
        )
    order = make_rngs(derive_seed(request.seed, TEST_TASK_STREAM)).numpy
    adapt_idx, query_idx = [], []
    for indices in by_class:
        shuffled = order.permutation(indices)
        queries = max(1, len(shuffled) // 2)
        query_idx.extend(shuffled[:queries])
        adapt_idx.extend(shuffled[queries:])
    a, q = torch.as_tensor(np.asarray(adapt_idx)), torch.as_tensor(np.asarray(query_idx))
    y = support.y
    return (x[a].contiguous(), y[a], x[q].contiguous(), y[q]), support


def _genotype_code(task_model: TaskModel) -> str:
    """A short readable summary of a pruned genotype: kept operations per cell type."""
    genotype = task_model.genotype
    parts = []
    for cell_type in ("normal", "reduce"):
        ops = [op for node in genotype.cell(cell_type) for edge in node.edges for op in edge.operations]
        parts.append(f"{cell_type[0]}{len(ops)}")
    return f"darts-{'-'.join(parts)}-{task_model.genotype.kept_operation_count()}ops"


def adapt_metanas(
    request: MetaNasAdaptionRequest,
    out_dir: str | Path,
    *,
    progress: ProgressCallback = null_progress,
) -> dict[str, Any]:
    """Adapt a MetaNAS run to one task, export it with a card, evaluate the method; returns (and writes) the result.

    The package folder ``out_dir/model`` (model.pt, model_card.json) is built in a staging folder and
    renamed into place; then ``out_dir/metanas_adaption.json``. Bad input raises
    :class:`MetaNasRunError` before anything is written.
    """
    from engine.search.constraints import Constraint
    from engine.search.package import Preprocessing

    started = time.perf_counter()
    spec, meta = load_metanas_run(request.run_dir)
    config = meta.config
    out = Path(out_dir)
    with torch_threads(request.threads):
        if request.support is not None:
            task, support = _support_task(request, spec, config)
            task_note = f"your support set: {len(task[1])} images adapted on, {len(task[3])} held out to measure accuracy"
            classes: Any = list(support.class_names)
        else:
            task = next(test_tasks(spec, 1, derive_seed(request.seed, TEST_TASK_STREAM + 100)))
            task_note = f"one {spec.ways}-way {spec.shots}-shot test task of {spec.dataset}"
            classes = "labels 0..N-1 of that test task (the model is specific to it)"
        progress({"kind": "metanas_adapt", "stage": "adapt", "current": 0, "total": 3,
                  "message": "MetaNAS: adapting weights and architecture to the task"})  # fmt: skip
        support_x, support_y, query_x, query_y = task
        task_model = adapt_task(
            meta, support_x, support_y, rngs=make_rngs(derive_seed(request.seed, EVAL_ADAPT_STREAM))
        )
        task_metrics = _query_metrics(task_model, query_x, query_y)
        progress({"kind": "metanas_adapt", "stage": "measure", "current": 1, "total": 3,
                  "message": "MetaNAS: measuring the pruned network end to end"})  # fmt: skip
        costs = network_costs(
            task_model, config, measure_device=request.measure_device, threads=request.threads
        )
        evaluation = None
        if request.eval_tasks > 0:
            evaluation = evaluate_meta_state(
                meta, spec, request.eval_tasks, seed=request.seed, measure_device=request.measure_device,
                progress=progress,
            )  # fmt: skip
        checks = []
        for budget in request.budgets:
            constraint = Constraint(request.constraint, budget)
            cost = {"params": costs["params"], "macs": costs["macs"], "latency_ms": costs["latency_ms"]}[
                request.constraint
            ]
            checks.append(
                {**constraint.to_dict(), "text": constraint.describe(), "cost": cost,
                 "met": None if cost is None else bool(cost <= constraint.base_limit)}
            )  # fmt: skip
        normalization, invert = _preprocessing_of(spec)
        preprocessing = Preprocessing(
            channels=config.in_channels, image_size=config.image_size, mean=normalization.mean,
            std=normalization.std, invert=invert,
        )  # fmt: skip
        task_accuracy = {
            "mean": task_metrics["pruned_accuracy"], "ci95": None, "tasks": 1,
            "split": "support set (held-out half)" if request.support else "test", "dataset": spec.dataset,
        }  # fmt: skip
        accuracy = (
            task_accuracy
            if request.support is not None or evaluation is None
            else evaluation["reference"]["accuracy"]
        )
        card = {
            "format": CARD_FORMAT,
            "method": METHOD,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {"torchscript": "model.pt", "card": "model_card.json"},
            "arch_code": _genotype_code(task_model),
            "genotype": task_model.genotype.to_dict(),
            "params": costs["params"],
            "macs": costs["macs"],
            "predicted_latency_ms": None,
            "measured_latency_ms": costs["latency_ms"],
            "latency_ms": {
                "lut_predicted": None,
                "lut_note": "DARTS cells (several operations per edge, summed) are not a chain of layers a "
                "lookup table could add up: the whole exported network is measured instead",
                "measured_here": costs["latency"],
                "measured_note": request.measure_note or ("not measured" if costs["latency"] is None else ""),
            },
            "budgets": checks,
            "budget_note": "MetaNAS is not hardware-aware: budgets do not steer the search, they are checked",
            "accuracy": accuracy,
            "task_accuracy": {**task_metrics, "note": task_note},
            "accuracy_protocol": (
                evaluation["reference"]["accuracy_protocol"]
                if evaluation and not request.support
                else f"pruned network on the held-out query images of {task_note}"
            ),  # fmt: skip
            "method_accuracy": evaluation["reference"] if evaluation else None,
            "classes": classes,
            "task": task_note,
            "preprocessing": preprocessing.to_dict(),
            "bn_statistics": "BatchNorm keeps no running statistics (as in MetaNAS meta-training): every call "
            "normalises with the statistics of its batch, so classify a whole query set in one call",
            "adaption": {
                "arch_steps": config.test_arch_steps,
                "weight_steps": config.test_weight_steps,
                "temperature": task_model.temperature,
                "prune_threshold": config.prune_threshold,
                "one_shot_parameters": task_model.one_shot_parameters,
                "adapt_seconds": task_model.adapt_seconds,
            },
            "metanas_run": {
                "run_dir": str(request.run_dir),
                "meta_epochs": meta.epochs_done,
                "spec": spec.to_dict(),
            },
        }
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".staging-{uuid.uuid4().hex[:12]}"
        try:
            staging.mkdir()
            export_task_model(task_model, staging / "model.pt")
            atomic_write_json(staging / "model_card.json", _json_safe(card))
            target = out / "model"
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress({"kind": "metanas_adapt", "stage": "export", "current": 3, "total": 3,
                  "message": "MetaNAS: exported the task model"})  # fmt: skip
        result = {
            "method": METHOD,
            "request": request.to_dict(),
            "package": str(out / "model"),
            "model_card": card,
            "costs": {"params": costs["params"], "macs": costs["macs"], "latency_ms": costs["latency_ms"]},
            "loss": task_metrics["query_loss"],
            "evaluation": evaluation,
            "elapsed_s": time.perf_counter() - started,
        }
        result = _json_safe(result)
        atomic_write_json(out / ADAPTION_FILE, result)
    return result


def _preprocessing_of(spec: MetaNasRunSpec) -> tuple[Any, bool]:
    from engine.adaption import DATASET_PREPROCESSING

    return DATASET_PREPROCESSING[spec.dataset]


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (strict JSON), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


__all__ = [
    "METHOD",
    "MetaNasAdaptionRequest",
    "MetaNasRunError",
    "MetaNasRunSpec",
    "adapt_metanas",
    "evaluate_meta_state",
    "execute_metanas_training",
    "load_metanas_run",
]
