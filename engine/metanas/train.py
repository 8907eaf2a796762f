"""Task learning (first-order DARTS with soft-pruning) and REPTILE meta-learning (Algorithm 2).

Task learner (eq. 3): every step draws a mini-batch from the support set, does one
forward/backward pass of the one-shot model at the current temperature and updates the
weights ``w`` and the architecture ``alpha`` (operations and input combinations) with two
Adam optimisers on that same gradient. The temperature is annealed linearly from
``temperature_max`` to ``temperature_min`` over the architecture steps (eqs. 5-7).

Meta learner (eq. 9, REPTILE for both): after task training on every task of a meta
batch, ``phi <- phi + eps * mean_tasks(W_task - phi)`` with ``eps = meta_lr_weights``
for weights and ``meta_lr_arch`` for architecture parameters.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.atomic import atomic_write
from engine.metanas.config import MetaNasConfig
from engine.metanas.search_net import MetaNasSearchNet, temperature_at
from engine.metanas.tasks import TaskSource, as_task_batch, check_images, check_labels
from engine.progress import JobCancelled, ProgressCallback, null_progress
from engine.seeding import Rngs, make_rngs

CHECKPOINT_NAME = "metanas_meta_state.pt"
CHECKPOINT_FORMAT = 1

#: Sub-stream numbers of the run's Rngs (see ``Rngs.child``).
_INIT_STREAM = 0
_EPOCH_STREAM_OFFSET = 1


class MetaNasCheckpointError(ValueError):
    """A checkpoint does not belong to this run (config or seed differ) or is unreadable."""


# ---------------------------------------------------------------------------------------- task learner
@dataclass(frozen=True)
class TaskTrainResult:
    final_temperature: float
    final_support_loss: float
    steps: int
    arch_steps: int


def final_temperature(config: MetaNasConfig, arch_steps: int) -> float:
    """The temperature at the end of task training: ``t_min`` after annealing, ``t_max`` without (warm-up)."""
    return config.temperature_min if arch_steps > 0 else config.temperature_max


def train_on_task(
    net: MetaNasSearchNet,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    config: MetaNasConfig,
    *,
    steps: int,
    arch_steps: int,
    rngs: Rngs,
    progress: ProgressCallback = null_progress,
) -> TaskTrainResult:
    """Adapt ``net`` in place: ``steps`` weight updates, the first ``arch_steps`` of them also update alpha.

    A fresh pair of Adam optimisers is used per task, so the result depends only on the
    starting parameters, the support data and ``rngs``.
    """
    check_images("support_x", support_x, config.in_channels, batched=False)
    check_labels("support_y", support_y, config.n_way, expected_shape=(int(support_x.shape[0]),))
    if steps < 1 or not 0 <= arch_steps <= steps:
        raise ValueError(
            f"need steps >= 1 and 0 <= arch_steps <= steps, got steps={steps}, arch_steps={arch_steps}"
        )
    weight_optimizer = torch.optim.Adam(
        net.weight_parameters(),
        lr=config.weight_lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay_weights,
    )
    arch_optimizer = torch.optim.Adam(
        net.arch_parameters(),
        lr=config.arch_lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay_arch,
    )
    net.train()
    count = int(support_x.shape[0])
    loss_value = float("nan")
    for step in range(steps):
        if arch_steps > 0:
            temperature = temperature_at(step, arch_steps, config.temperature_max, config.temperature_min)
        else:
            temperature = config.temperature_max
        if config.task_batch_size < count:
            index = torch.randperm(count, generator=rngs.torch)[: config.task_batch_size]
            batch_x, batch_y = support_x[index], support_y[index]
        else:
            batch_x, batch_y = support_x, support_y
        weight_optimizer.zero_grad(set_to_none=True)
        arch_optimizer.zero_grad(set_to_none=True)
        # One forward/backward pass gives the gradients of both w and alpha on the same data (eq. 3).
        loss = F.cross_entropy(net(batch_x, temperature), batch_y)
        loss.backward()
        weight_optimizer.step()
        if step < arch_steps:
            arch_optimizer.step()
        loss_value = float(loss.detach())
        progress(
            {
                "kind": "metanas",
                "stage": "task_train",
                "current": step + 1,
                "total": steps,
                "temperature": temperature,
                "support_loss": loss_value,
            }
        )
    return TaskTrainResult(
        final_temperature=final_temperature(config, arch_steps),
        final_support_loss=loss_value,
        steps=steps,
        arch_steps=arch_steps,
    )


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


# ---------------------------------------------------------------------------------------- meta learner
def reptile_update(
    meta_params: Mapping[str, torch.Tensor],
    task_params: list[Mapping[str, torch.Tensor]],
    step_sizes: Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """REPTILE: ``phi + eps * (mean_i W_i - phi)`` per tensor, ``eps = step_sizes[name]``."""
    if not task_params:
        raise ValueError("reptile_update needs at least one task's parameters")
    updated = {}
    for name, phi in meta_params.items():
        if name not in step_sizes:
            raise KeyError(f"no REPTILE step size for parameter {name!r}")
        mean_task = torch.stack([params[name] for params in task_params]).mean(dim=0)
        updated[name] = phi + step_sizes[name] * (mean_task - phi)
    return updated


@dataclass(frozen=True)
class MetaState:
    """Meta-learned weights and architecture ``(w_meta, alpha_meta)`` after ``epochs_done`` meta-epochs."""

    config: MetaNasConfig
    state_dict: dict[str, torch.Tensor]
    epochs_done: int
    seed: int
    history: tuple[dict[str, Any], ...] = field(default=())

    def to_net(self) -> MetaNasSearchNet:
        """A fresh one-shot model holding these parameters (the caller may adapt it freely)."""
        net = MetaNasSearchNet(self.config, rngs=make_rngs(self.seed))
        net.load_state_dict(self.state_dict)
        return net

    def save(self, path: str | Path) -> Path:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "epochs_done": self.epochs_done,
            "state_dict": self.state_dict,
            "history": list(self.history),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

    @classmethod
    def load(cls, path: str | Path) -> MetaState:
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise MetaNasCheckpointError(f"cannot read MetaNAS checkpoint {path}: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise MetaNasCheckpointError(f"{path} is not a MetaNAS checkpoint of format {CHECKPOINT_FORMAT}")
        return cls(
            config=MetaNasConfig.from_dict(payload["config"]),
            state_dict=payload["state_dict"],
            epochs_done=int(payload["epochs_done"]),
            seed=int(payload["seed"]),
            history=tuple(payload["history"]),
        )


def epoch_rngs(rngs: Rngs, epoch: int) -> Rngs:
    """The generators of meta-epoch ``epoch`` (task sampling: ``.child(0)``, task i: ``.child(i + 1)``)."""
    return rngs.child(_EPOCH_STREAM_OFFSET + epoch)


def initial_meta_state(config: MetaNasConfig, rngs: Rngs) -> MetaState:
    net = MetaNasSearchNet(config, rngs=rngs.child(_INIT_STREAM))
    state = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    return MetaState(config=config, state_dict=state, epochs_done=0, seed=rngs.seed)


def reptile_meta_train(
    config: MetaNasConfig,
    task_source: TaskSource,
    *,
    rngs: Rngs,
    progress: ProgressCallback = null_progress,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> MetaState:
    """Meta-train weights and architecture with REPTILE around DARTS task learning.

    The first ``config.warmup_epochs`` meta-epochs train weights only (no architecture
    updates, temperature ``t_max``). With ``checkpoint_dir`` the meta state is written
    atomically every ``config.checkpoint_every`` epochs, at the end and when the job is
    cancelled; ``resume=True`` continues from it and gives the same result as an
    uninterrupted run when ``task_source`` draws its randomness from the rngs it is given.
    """
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = initial_meta_state(config, rngs)
    if resume:
        if checkpoint_path is None:
            raise MetaNasCheckpointError("resume=True needs a checkpoint_dir")
        if checkpoint_path.exists():
            state = _load_matching_checkpoint(checkpoint_path, config, rngs.seed)
    net = state.to_net()
    arch_names = {name for name, _ in net.named_arch_parameters()}
    step_sizes = {
        name: (config.meta_lr_arch if name in arch_names else config.meta_lr_weights)
        for name in state.state_dict
    }
    meta_params = dict(state.state_dict)
    history = list(state.history)
    epochs_done = state.epochs_done

    def snapshot() -> MetaState:
        return MetaState(config, dict(meta_params), epochs_done, rngs.seed, tuple(history))

    for epoch in range(state.epochs_done, config.meta_epochs):
        started = time.perf_counter()
        streams = epoch_rngs(rngs, epoch)
        batch = as_task_batch(
            task_source(config.meta_batch_size, streams.child(0)),
            n_way=config.n_way,
            in_channels=config.in_channels,
        )
        warmup = epoch < config.warmup_epochs
        arch_steps = 0 if warmup else config.task_train_steps
        task_params = []
        losses, accuracies = [], []
        for task in range(len(batch)):
            net.load_state_dict(meta_params)
            result = train_on_task(
                net,
                batch.support_x[task],
                batch.support_y[task],
                config,
                steps=config.task_train_steps,
                arch_steps=arch_steps,
                rngs=streams.child(task + 1),
            )
            with torch.no_grad():
                logits = net(batch.query_x[task], result.final_temperature)
            accuracies.append(accuracy(logits, batch.query_y[task]))
            losses.append(result.final_support_loss)
            task_params.append({name: t.detach().clone() for name, t in net.state_dict().items()})
        meta_params = reptile_update(meta_params, task_params, step_sizes)
        epochs_done = epoch + 1
        record = {
            "epoch": epochs_done,
            "phase": "warmup" if warmup else "search",
            "support_loss": sum(losses) / len(losses),
            "query_accuracy": sum(accuracies) / len(accuracies),
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if checkpoint_path is not None and (
            epochs_done % config.checkpoint_every == 0 or epochs_done == config.meta_epochs
        ):
            snapshot().save(checkpoint_path)
        try:
            progress(
                {
                    "kind": "metanas",
                    "stage": "meta_train",
                    "current": epochs_done,
                    "total": config.meta_epochs,
                    **{k: v for k, v in record.items() if k != "epoch"},
                }
            )
        except JobCancelled:
            if checkpoint_path is not None:
                snapshot().save(checkpoint_path)
            raise
    return snapshot()


def _load_matching_checkpoint(path: Path, config: MetaNasConfig, seed: int) -> MetaState:
    state = MetaState.load(path)
    if state.config.to_dict() != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if state.config.to_dict().get(k) != v)
        raise MetaNasCheckpointError(
            f"checkpoint {path} was written with a different config (fields {changed})"
        )
    if state.seed != seed:
        raise MetaNasCheckpointError(
            f"checkpoint {path} was written with seed {state.seed}, this run uses {seed}"
        )
    return state
