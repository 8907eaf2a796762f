"""Meta-training loop: MAML++ over a model or a super-net with progressive shrinking.

One meta-batch trains one architecture (H-Meta-NAS sec. 3.3): the largest sub-net with
probability ``p`` (eq. 4, :func:`engine.meta.schedule.largest_probability`), otherwise a
uniformly sampled one. A fixed model (the MAML++ baseline) is the special case ``space=None``.

Checkpoints are written atomically every ``checkpoint_every`` iterations and hold everything
that decides the rest of the run (learner incl. LSLR, Adam, the cosine schedule, the task and
architecture generators, the iteration, the metrics history), so ``resume=True`` after a kill
continues exactly the run that would have happened without it.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.atomic import atomic_write, atomic_write_json
from engine.latency.measure import torch_threads
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.schedule import largest_probability
from engine.meta.tasks import TaskSource, batch_on
from engine.progress import JobCancelled, ProgressCallback, null_progress
from engine.seeding import make_rngs

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = 1

# Random streams of a run (engine.seeding.Rngs.child): kept apart so that e.g. sampling an
# architecture never shifts which tasks are drawn.
TASK_STREAM = 1
ARCH_STREAM = 2


class MetaTrainError(ValueError):
    """Invalid meta-training settings or an unusable checkpoint."""


@dataclass(frozen=True)
class ShrinkConfig:
    """Progressive shrinking (H-Meta-NAS eq. 4).

    ``p_end`` is not given in the paper; 0.25 is our default: after the decay a quarter of the
    meta-batches still train the largest network, which anchors the shared weights, while the
    rest spread over sampled sub-nets.
    """

    p_end: float = 0.25
    p_initial: float = 1.0
    alpha: float = 5.0
    start_fraction: float = 0.3

    def probability(self, epoch: float, total_epochs: int) -> float:
        return largest_probability(
            epoch,
            total_epochs,
            p_end=self.p_end,
            p_initial=self.p_initial,
            alpha=self.alpha,
            start_fraction=self.start_fraction,
        )


@dataclass(frozen=True)
class MetaTrainConfig:
    maml: MamlConfig = field(default_factory=MamlConfig)
    epochs: int = 100
    iterations_per_epoch: int = 500
    meta_batch: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    #: Intra-op threads of this process (the ``threads`` strategy runs ``maml.workers`` tasks at
    #: once with one intra-op thread each instead).
    torch_threads: int = 2
    shrink: ShrinkConfig = field(default_factory=ShrinkConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "meta_batch", "checkpoint_every", "torch_threads"):
            if getattr(self, name) < 1:
                raise MetaTrainError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTrainConfig:
        data = dict(data)
        return cls(
            maml=MamlConfig.from_dict(data.pop("maml")),
            shrink=ShrinkConfig(**data.pop("shrink")),
            **data,
        )

    def with_(self, **changes: Any) -> MetaTrainConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class MetaTrainResult:
    iterations: int
    history: list[dict[str, Any]]
    checkpoint: Path
    seconds: float


def make_optimizer(learner: MamlLearner, config: MetaTrainConfig) -> tuple[torch.optim.Adam, Any]:
    """Adam over meta-weights and LSLR rates, cosine-annealed per iteration (MAML++ "CA")."""
    params = [param for param in learner.parameters() if param.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.maml.meta_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.total_iterations, eta_min=config.maml.min_meta_lr
    )
    return optimizer, scheduler


def _save(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MetaTrainError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise MetaTrainError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def meta_train(
    learner: MamlLearner,
    tasks: TaskSource,
    config: MetaTrainConfig,
    *,
    out_dir: str | Path,
    space: Any = None,
    resume: bool = False,
    progress: ProgressCallback = null_progress,
    run_info: dict[str, Any] | None = None,
    stop_after: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> MetaTrainResult:
    """Meta-train ``learner`` on tasks from ``tasks``; checkpoints and metrics go to ``out_dir``.

    ``space`` (a :class:`engine.space.SearchSpace`) turns on super-net training with
    progressive shrinking; the model's forward then receives ``arch=...``. ``run_info`` is
    stored in the checkpoint (how to rebuild model and data) and must match on resume.
    ``stop_after`` ends this call after that many total iterations (checkpointing first),
    e.g. to split a run into slices; the run is resumable from there.
    """
    # The run's thread count, given back afterwards: a worker process runs other jobs next.
    with torch_threads(config.torch_threads):
        return _meta_train(
            learner, tasks, config, out_dir=out_dir, space=space, resume=resume, progress=progress,
            run_info=run_info, stop_after=stop_after, clock=clock,
        )  # fmt: skip


def _meta_train(
    learner: MamlLearner,
    tasks: TaskSource,
    config: MetaTrainConfig,
    *,
    out_dir: str | Path,
    space: Any,
    resume: bool,
    progress: ProgressCallback,
    run_info: dict[str, Any] | None,
    stop_after: int | None,
    clock: Callable[[], float],
) -> MetaTrainResult:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT_NAME
    rngs = make_rngs(config.seed)
    task_rng = rngs.child(TASK_STREAM).numpy
    arch_rng = rngs.child(ARCH_STREAM).numpy
    optimizer, scheduler = make_optimizer(learner, config)
    history: list[dict[str, Any]] = []
    start = 0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state["config"] != config.to_dict():
            raise MetaTrainError(f"{checkpoint_path}: checkpoint was written with a different configuration")
        if (run_info or {}) != state.get("run_info", {}):
            raise MetaTrainError(
                f"{checkpoint_path}: checkpoint belongs to a different run: {state.get('run_info')}"
            )
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        task_rng.bit_generator.state = state["task_rng"]
        arch_rng.bit_generator.state = state["arch_rng"]
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        start = int(state["iteration"])
    elif checkpoint_path.exists():
        raise MetaTrainError(f"{checkpoint_path} exists: pass resume=True to continue it or use a new folder")

    def checkpoint(iteration: int) -> None:
        _save(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "iteration": iteration,
                "config": config.to_dict(),
                "run_info": run_info or {},
                "learner": learner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "task_rng": task_rng.bit_generator.state,
                "arch_rng": arch_rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "history": history,
            },
        )
        atomic_write_json(
            out / METRICS_NAME, {"iteration": iteration, "total": config.total_iterations, "history": history}
        )

    total = config.total_iterations
    end = total if stop_after is None else min(total, stop_after)
    largest = space.largest() if space is not None else None
    device = next(learner.parameters()).device  # tasks are made on the CPU and sent there
    learner.train()
    began = clock()
    iteration = start
    try:
        while iteration < end:
            epoch = iteration // config.iterations_per_epoch
            forward_kwargs: dict[str, Any] = {}
            p_largest = 1.0
            is_largest = True
            if space is not None:
                p_largest = config.shrink.probability(epoch, config.epochs)
                draw = arch_rng.random()  # always drawn, so the stream does not depend on p
                is_largest = bool(draw < p_largest)
                forward_kwargs["arch"] = largest if is_largest else space.sample(arch_rng)
            batch = batch_on(tasks(task_rng, config.meta_batch), device)
            optimizer.zero_grad(set_to_none=True)
            step = learner.meta_step(batch, epoch=epoch, forward_kwargs=forward_kwargs)
            optimizer.step()
            scheduler.step()
            iteration += 1
            record = {
                "iteration": iteration,
                "epoch": epoch,
                "loss": round(step.loss, 6),
                "accuracy": round(step.accuracy, 6),
                "second_order": step.second_order,
                "p_largest": round(p_largest, 6),
                "largest": is_largest,
                "meta_lr": optimizer.param_groups[0]["lr"],
            }
            if space is not None and not is_largest:
                record["arch"] = forward_kwargs["arch"].to_dict()
            history.append(record)
            if iteration % config.checkpoint_every == 0 or iteration == end:
                checkpoint(iteration)
            elapsed = clock() - began
            rate = (iteration - start) / elapsed if elapsed > 0 else 0.0
            event = {
                "kind": "meta_train",
                "current": iteration,
                "total": total,
                "epoch": epoch,
                "loss": step.loss,
                "accuracy": step.accuracy,
                "second_order": step.second_order,
                "p_largest": p_largest,
                "largest": is_largest,
                "it_per_s": rate,
                "eta_s": (total - iteration) / rate if rate > 0 else None,
            }
            try:
                progress(event)
            except JobCancelled:
                if iteration % config.checkpoint_every != 0 and iteration != end:
                    checkpoint(iteration)
                raise
    finally:
        learner.close_workers()  # the processes strategy's workers end with the run
    if start == end:
        checkpoint(end)  # nothing to do (already complete): still leave files consistent
    return MetaTrainResult(
        iterations=iteration, history=history, checkpoint=checkpoint_path, seconds=clock() - began
    )


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / METRICS_NAME).read_text())
