"""MAML++ (Antoniou et al., "How to train your MAML") over any functional model.

The model only has to follow the engine convention ``forward(x, step=..., **forward_kwargs)``
where ``step`` selects the per-step BatchNorm row (the super-net also takes ``arch=...``). The
learner runs it through :func:`torch.func.functional_call` with a dict of fast weights, so the
model itself knows nothing about meta-learning (the learn2learn split).

Two ways to compute the same meta-gradient:

* ``strategy="loop"`` -- the reference: tasks one after another, the sum of their query losses,
  one ``backward()`` (how the MAML++ reference code works; benchmarks/maml_speed.py runs it
  under :func:`engine.kernels.reference_kernels`, i.e. with ATen's BatchNorm and max-pool instead
  of the hand-written kernels every strategy uses by default: second-order inner loops run under
  :func:`engine.kernels.double_backward_kernels`);
* ``strategy="threads"`` -- tasks are independent until their gradients are summed, so
  ``workers`` threads each adapt a share of the tasks (one intra-op thread each, so the core
  count is respected) and take their own task's meta-gradient with ``torch.autograd.grad``; the
  per-task gradients are then summed in task order. The math is the same as the loop (tests
  check the gradients agree, second order included). On a small CPU whole tasks split better
  than each tiny op does (a 20-image batch of 28x28 images splits badly across cores).
* ``strategy="processes"`` -- the production path on CPUs: the same per-task work and the same
  task-order sum as ``threads``, but in ``workers`` worker processes (:class:`engine.forked.SpawnedWorker`),
  which receive the meta-parameters and their tasks each meta-batch and send back the per-task
  gradients. Measured on 2-core CPUs, two worker threads did the work of about 1.5 cores and
  two processes of about 1.9 (docs/META_TRAINING.md). Call :meth:`MamlLearner.close_workers` (or
  let :func:`engine.meta.train.meta_train` do it) when done.

* ``strategy="vmap"`` -- the production path on GPUs: ``torch.func.vmap`` over the tasks of
  a meta-batch, the inner loop through ``torch.func.grad`` and one ``backward()`` of the mean
  task loss, so each layer runs as one batched (grouped) kernel for all tasks instead of one
  small kernel per task. Same math as the loop (tests check the gradients and the running
  statistics agree). Each task gets its own copy of the BatchNorm running statistics, as in the
  loop, and the copies are averaged afterwards.

Measured and rejected on the 2-core CPU (see docs/META_TRAINING.md): ``vmap`` over tasks and a
hand-written grouped convolution (groups = tasks, [N, T*C, H, W] layout) -- the mkldnn
grouped-convolution double backward is 3-6x slower than the per-task loop there. ``vmap`` stays
selectable on the CPU (tests run it there) but is meant for CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from engine.forked import ForkedWorker, SpawnedWorker, close_workers, start_workers
from engine.kernels import double_backward_kernels
from engine.latency.measure import torch_threads
from engine.meta.schedule import per_step_loss_weights, use_second_order
from engine.meta.tasks import TaskBatch

STRATEGIES = ("loop", "threads", "processes", "vmap")
#: Strategies that run wherever the model's tensors live (``threads``/``processes`` share CPU cores).
DEVICE_STRATEGIES = {"cpu": STRATEGIES, "cuda": ("loop", "vmap")}


class MamlConfigError(ValueError):
    """A MAML/MAML++ setting outside its valid range."""


@dataclass(frozen=True)
class MamlConfig:
    """Inner-loop and outer-loop settings. Defaults are MAML++ on Omniglot."""

    inner_steps: int = 5
    inner_lr: float = 0.1
    #: LSLR: one learnable inner learning rate per parameter tensor and step.
    learnable_inner_lr: bool = True
    #: MSL: epochs over which the per-step query losses anneal to final-step only (0 = final only).
    multi_step_epochs: int = 10
    second_order: bool = True
    #: DA: first-order for this many epochs, then second-order (only if ``second_order``).
    first_order_epochs: int = 0
    #: MAML++ keeps BN weights out of the inner loop (they are meta-learned per step instead).
    inner_bn_params: bool = False
    meta_lr: float = 1e-3
    #: CA: cosine annealing of the Adam meta learning rate down to this value.
    min_meta_lr: float = 1e-5
    #: Inner steps at evaluation (``None`` = ``inner_steps``).
    eval_inner_steps: int | None = None
    strategy: str = "threads"
    #: Worker threads of the ``threads`` strategy (never more than the cores you were given).
    workers: int = 2
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise MamlConfigError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.inner_lr <= 0 or not math.isfinite(self.inner_lr):
            raise MamlConfigError(f"inner_lr must be a positive number, got {self.inner_lr}")
        if self.multi_step_epochs < 0 or self.first_order_epochs < 0:
            raise MamlConfigError("multi_step_epochs and first_order_epochs must be >= 0")
        if self.meta_lr <= 0 or self.min_meta_lr < 0 or self.min_meta_lr > self.meta_lr:
            raise MamlConfigError(
                f"need 0 <= min_meta_lr <= meta_lr, 0 < meta_lr; got {self.min_meta_lr}, {self.meta_lr}"
            )
        if self.eval_inner_steps is not None and self.eval_inner_steps < 1:
            raise MamlConfigError(f"eval_inner_steps must be >= 1, got {self.eval_inner_steps}")
        if self.strategy not in STRATEGIES:
            raise MamlConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.workers < 1:
            raise MamlConfigError(f"workers must be >= 1, got {self.workers}")

    @classmethod
    def maml(cls, *, second_order: bool = True, **overrides: Any) -> MamlConfig:
        """Plain MAML (Finn et al.): fixed inner lr, final-step loss, one BN for all steps."""
        base = dict(
            learnable_inner_lr=False, multi_step_epochs=0, first_order_epochs=0, second_order=second_order
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MamlConfig:
        return cls(**dict(data))

    def with_(self, **changes: Any) -> MamlConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class MetaStepResult:
    """What one meta-batch did: mean weighted query loss and final-step query accuracy."""

    loss: float
    accuracy: float
    task_losses: tuple[float, ...]
    task_accuracies: tuple[float, ...]
    second_order: bool


@dataclass(frozen=True)
class _TaskOutcome:
    loss: torch.Tensor | None
    accuracy: float
    buffers: dict[str, torch.Tensor]


def _task_tensors(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task ``index`` of any batch with ``support_x/support_y/query_x/query_y`` [tasks, ...] tensors."""
    return batch.support_x[index], batch.support_y[index], batch.query_x[index], batch.query_y[index]


def _is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) or "norm" in type(module).__name__.lower()


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters owned directly by normalisation modules (BN weights/biases)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if _is_norm_module(module):
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _lslr_key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


def _support_gradients(
    model: nn.Module,
    fast: dict[str, torch.Tensor],
    inner_names: tuple[str, ...],
    buffers: dict[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    forward_kwargs: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """``torch.func.grad`` of one task's support loss with respect to its adapted weights (inside
    ``vmap``). The buffers are an argument, not captured, because BatchNorm updates them in
    place and ``grad`` refuses in-place changes to tensors captured from outside."""

    def support_loss(adapted: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, {**fast, **adapted, **buffers}, (support_x,), dict(forward_kwargs))
        return F.cross_entropy(logits, support_y)

    return torch.func.grad(support_loss)({name: fast[name] for name in inner_names}, buffers)


def _inner_step(
    model: nn.Module,
    fast: dict[str, torch.Tensor],
    inner_names: tuple[str, ...],
    rates: Mapping[str, torch.Tensor],
    step: int,
    buffers: dict[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    forward_kwargs: Mapping[str, Any],
    detach: bool = False,
) -> dict[str, torch.Tensor]:
    """One LSLR inner step of one task inside ``vmap``: ``fast`` with its inner weights moved
    against their support gradients. ``detach`` makes the step first order for the outer
    ``backward()`` (the rates still get their gradient)."""
    grads = _support_gradients(model, fast, inner_names, buffers, support_x, support_y, forward_kwargs)
    updated = dict(fast)
    for name in inner_names:
        change = grads[name].detach() if detach else grads[name]
        updated[name] = fast[name] - rates[name][step] * change
    return updated


class _ProcessWorkers(list):
    """A learner's worker processes. Never copied or pickled with the learner: a copy that ended
    them when garbage-collected would end the original's workers."""

    def __init__(self) -> None:
        super().__init__()
        self.owner_pid = os.getpid()

    def __deepcopy__(self, memo: dict) -> _ProcessWorkers:
        return _ProcessWorkers()

    def __reduce__(self) -> tuple:
        return (_ProcessWorkers, ())


class MamlLearner(nn.Module):
    """A model plus the MAML++ meta-parameters that belong to the learning rule (LSLR).

    ``learner.parameters()`` = the model's meta-weights and the inner learning rates: give them
    all to the meta-optimizer. ``state_dict()`` holds both.
    """

    def __init__(self, model: nn.Module, config: MamlConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        norm_names = norm_parameter_names(model)
        self.inner_names: tuple[str, ...] = tuple(
            name for name, _ in model.named_parameters() if config.inner_bn_params or name not in norm_names
        )
        if not self.inner_names:
            raise MamlConfigError("the model has no parameters to adapt in the inner loop")
        steps = max(config.inner_steps, config.eval_inner_steps or 0)
        self.inner_lrs = nn.ParameterDict(
            {
                _lslr_key(name): nn.Parameter(
                    torch.full((steps,), float(config.inner_lr)), requires_grad=config.learnable_inner_lr
                )
                for name in self.inner_names
            }
        )
        bn_steps = getattr(model, "bn_steps", None)
        self.bn_steps: int | None = int(bn_steps) if bn_steps is not None else None
        # Structure-only copies for worker threads: functional_call temporarily swaps a module's
        # tensors, so two threads must never run through the same module object. Kept out of
        # the module tree (not in state_dict, not in parameters()).
        object.__setattr__(self, "_replicas", [])
        # Worker processes of the ``processes`` strategy (started on first use).
        object.__setattr__(self, "_workers", _ProcessWorkers())

    # ----------------------------------------------------------------- helpers
    def inner_lr(self, name: str) -> torch.Tensor:
        return self.inner_lrs[_lslr_key(name)]

    def bn_step(self, step: int) -> int:
        """The BN row used at inner step ``step`` (the last row for steps beyond the model's rows)."""
        return step if self.bn_steps is None else min(step, self.bn_steps - 1)

    def _replica(self, index: int) -> nn.Module:
        replicas: list[nn.Module] = self._replicas  # type: ignore[assignment]
        while len(replicas) <= index:
            replicas.append(copy.deepcopy(self.model))
        replica = replicas[index]
        replica.train(self.model.training)
        return replica

    def _run_workers(self, work: Callable[[int], None], workers: int) -> None:
        """Run ``work(0..workers-1)``, in threads with one intra-op thread each when ``workers > 1``."""
        if workers == 1:
            work(0)
            return
        for worker in range(workers):  # create replicas here, not racing inside the threads
            self._replica(worker)
        with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work, worker) for worker in range(workers)]:
                future.result()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def loss_weights(self, epoch: int) -> np.ndarray:
        return per_step_loss_weights(epoch, self.config.inner_steps, self.config.multi_step_epochs)

    def second_order_at(self, epoch: int) -> bool:
        return use_second_order(epoch, self.config.second_order, self.config.first_order_epochs)

    # -------------------------------------------------------------- inner loop
    def _adapt_task(
        self,
        module: nn.Module,
        params: dict[str, torch.Tensor],
        task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        weights: np.ndarray,
        create_graph: bool,
        forward_kwargs: Mapping[str, Any],
    ) -> _TaskOutcome:
        """Adapt to one task's support set; return the weighted multi-step query loss.

        Query step ``s`` is evaluated with the fast weights after ``s + 1`` updates and BN row
        ``s`` (as in the MAML++ reference code).
        """
        # A second-order step differentiates this graph twice: BatchNorm's closed-form double backward.
        with double_backward_kernels() if create_graph else contextlib.nullcontext():
            support_x, support_y, query_x, query_y = task
            support_x, query_x = self._prepare(support_x), self._prepare(query_x)
            buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
            fast = dict(params)
            steps = len(weights)
            total: torch.Tensor | None = None
            accuracy = 0.0

            def logits_of(x: torch.Tensor, bn_step: int) -> torch.Tensor:
                # The current fast weights (``fast`` is updated in place below).
                kwargs = {**forward_kwargs, "step": bn_step}
                return functional_call(module, {**fast, **buffers}, (x,), kwargs, strict=False)

            for step in range(steps):
                bn_step = self.bn_step(step)
                support_loss = F.cross_entropy(logits_of(support_x, bn_step), support_y)
                adapted = [fast[name] for name in self.inner_names]
                grads = torch.autograd.grad(
                    support_loss, adapted, create_graph=create_graph, allow_unused=True
                )
                for name, grad in zip(self.inner_names, grads, strict=True):
                    if grad is not None:  # unused by this sub-net: nothing to adapt
                        fast[name] = fast[name] - self.inner_lr(name)[step] * grad
                last = step == steps - 1
                if weights[step] > 0 or last:
                    query_logits = logits_of(query_x, bn_step)
                    weighted = float(weights[step]) * F.cross_entropy(query_logits, query_y)
                    total = weighted if total is None else total + weighted
                    if last:
                        accuracy = (query_logits.detach().argmax(dim=1) == query_y).float().mean().item()
        return _TaskOutcome(loss=total, accuracy=accuracy, buffers=buffers)

    def _merge_buffers(self, outcomes: list[_TaskOutcome]) -> None:
        """New running statistics = mean over tasks of each task's updated statistics.

        Every task starts from the same statistics, so the result does not depend on task
        order (needed for the loop and thread strategies to agree). Statistics never enter the
        training loss: BN always normalises with the batch statistics of the task's own batch.
        """
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                values = [outcome.buffers[name] for outcome in outcomes]
                if buffer.is_floating_point():
                    buffer.copy_(torch.stack(values).mean(dim=0))
                else:
                    buffer.copy_(values[-1])

    # ---------------------------------------------------------------- training
    def meta_step(
        self,
        batch: TaskBatch,
        *,
        epoch: int,
        forward_kwargs: Mapping[str, Any] | None = None,
        strategy: str | None = None,
    ) -> MetaStepResult:
        """Accumulate the meta-gradient of the mean task loss into ``.grad`` of the learner's parameters.

        The caller zeroes gradients and steps the optimizer (so gradients can be inspected).
        """
        strategy = strategy or self.config.strategy
        if strategy not in STRATEGIES:
            raise MamlConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        kwargs = dict(forward_kwargs or {})
        weights = self.loss_weights(epoch)
        second_order = self.second_order_at(epoch)
        if strategy == "loop":
            outcomes = self._meta_step_loop(batch, weights, second_order, kwargs)
        elif strategy == "vmap":
            outcomes = self._meta_step_vmap(batch, weights, second_order, kwargs)
        elif strategy == "threads":
            outcomes = self._meta_step_threads(batch, weights, second_order, kwargs)
        else:
            outcomes = self._meta_step_processes(batch, weights, second_order, kwargs)
        self._merge_buffers(outcomes)
        losses = tuple(float(outcome.loss) for outcome in outcomes)  # type: ignore[arg-type]
        accuracies = tuple(outcome.accuracy for outcome in outcomes)
        return MetaStepResult(
            loss=float(np.mean(losses)),
            accuracy=float(np.mean(accuracies)),
            task_losses=losses,
            task_accuracies=accuracies,
            second_order=second_order,
        )

    def _meta_step_loop(
        self, batch: TaskBatch, weights: np.ndarray, second_order: bool, kwargs: dict[str, Any]
    ) -> list[_TaskOutcome]:
        params = dict(self.model.named_parameters())
        outcomes = [
            self._adapt_task(
                self.model,
                params,
                _task_tensors(batch, index),
                weights=weights,
                create_graph=second_order,
                forward_kwargs=kwargs,
            )
            for index in range(batch.num_tasks)
        ]
        total = torch.stack([outcome.loss for outcome in outcomes]).sum()  # type: ignore[misc]
        (total / batch.num_tasks).backward()
        return [
            _TaskOutcome(loss=outcome.loss.detach(), accuracy=outcome.accuracy, buffers=outcome.buffers)
            for outcome in outcomes
        ]  # type: ignore[union-attr]

    def _meta_step_vmap(
        self, batch: TaskBatch, weights: np.ndarray, second_order: bool, kwargs: dict[str, Any]
    ) -> list[_TaskOutcome]:
        tasks = batch.num_tasks
        params = dict(self.model.named_parameters())
        task_buffers = self._per_task_buffers(tasks)
        task_loss = self._vmapped_task_loss(params, weights, create_graph=second_order, kwargs=kwargs)
        losses, accuracies = vmap(task_loss)(
            task_buffers, batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )
        (losses.sum() / tasks).backward()
        losses, accuracies = losses.detach(), accuracies.tolist()
        return [
            _TaskOutcome(
                loss=losses[index],
                accuracy=accuracies[index],
                buffers={name: values[index] for name, values in task_buffers.items()},
            )
            for index in range(tasks)
        ]

    def _per_task_buffers(self, tasks: int) -> dict[str, torch.Tensor]:
        """A copy of the running statistics per task, vmapped like the images: BatchNorm updates
        each task's own copy, as the loop's per-task clones (ElasticBatchNorm2d)."""
        return {
            name: buffer.detach().unsqueeze(0).expand(tasks, *buffer.shape).clone()
            for name, buffer in self.model.named_buffers()
        }

    def _vmapped_task_loss(
        self,
        params: dict[str, torch.Tensor],
        weights: np.ndarray,
        *,
        create_graph: bool,
        kwargs: Mapping[str, Any],
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """One task's weighted multi-step query loss and final query accuracy, as a pure function
        of (its buffers, support_x, support_y, query_x, query_y) for ``torch.func.vmap``.

        The same steps as :meth:`_adapt_task`; ``torch.func.grad`` takes the inner gradients
        (differentiable for the outer ``backward()`` unless first order, where they are detached).
        """
        model, inner_names = self.model, self.inner_names
        rates = {name: self.inner_lr(name) for name in inner_names}  # learnable: not detached
        steps = len(weights)

        def task_loss(
            buffers: dict[str, torch.Tensor],
            support_x: torch.Tensor,
            support_y: torch.Tensor,
            query_x: torch.Tensor,
            query_y: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            support_x, query_x = self._prepare(support_x), self._prepare(query_x)
            fast = dict(params)
            total: torch.Tensor | None = None
            accuracy = torch.zeros((), device=query_y.device)
            for step in range(steps):
                step_kwargs = {**kwargs, "step": self.bn_step(step)}
                fast = _inner_step(
                    model, fast, inner_names, rates, step, buffers, support_x, support_y, step_kwargs,
                    detach=not create_graph,
                )  # fmt: skip
                last = step == steps - 1
                if weights[step] > 0 or last:
                    query_logits = functional_call(model, {**fast, **buffers}, (query_x,), step_kwargs)
                    weighted = float(weights[step]) * F.cross_entropy(query_logits, query_y)
                    total = weighted if total is None else total + weighted
                    if last:
                        accuracy = (query_logits.detach().argmax(dim=1) == query_y).float().mean()
            return total, accuracy  # type: ignore[return-value]

        return task_loss

    def _meta_step_threads(
        self, batch: TaskBatch, weights: np.ndarray, second_order: bool, kwargs: dict[str, Any]
    ) -> list[_TaskOutcome]:
        meta_params = self._meta_parameters()
        model_params = dict(self.model.named_parameters())
        tasks = batch.num_tasks
        workers = min(self.config.workers, tasks)
        grads: list[tuple[torch.Tensor | None, ...] | None] = [None] * tasks
        outcomes: list[_TaskOutcome | None] = [None] * tasks

        def work(worker: int) -> None:
            module = self._replica(worker)
            for index in range(worker, tasks, workers):
                grads[index], outcomes[index] = self._task_meta_gradient(
                    module,
                    model_params,
                    meta_params,
                    _task_tensors(batch, index),
                    num_tasks=tasks,
                    weights=weights,
                    second_order=second_order,
                    forward_kwargs=kwargs,
                )

        self._run_workers(work, workers)
        self._accumulate(meta_params, grads)  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]

    def _meta_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.parameters() if param.requires_grad]

    def _task_meta_gradient(
        self,
        module: nn.Module,
        params: dict[str, torch.Tensor],
        meta_params: list[nn.Parameter],
        task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        num_tasks: int,
        weights: np.ndarray,
        second_order: bool,
        forward_kwargs: Mapping[str, Any],
    ) -> tuple[tuple[torch.Tensor | None, ...], _TaskOutcome]:
        """One task's share of the meta-gradient (its loss over ``num_tasks``) and its outcome.

        The one piece of work both parallel strategies run per task, so they agree bit for bit.
        """
        outcome = self._adapt_task(
            module, params, task, weights=weights, create_graph=second_order, forward_kwargs=forward_kwargs
        )
        loss: torch.Tensor = outcome.loss  # type: ignore[assignment]
        grads = torch.autograd.grad(loss / num_tasks, meta_params, allow_unused=True)
        return grads, _TaskOutcome(loss.detach(), outcome.accuracy, outcome.buffers)

    @staticmethod
    def _accumulate(meta_params: list[nn.Parameter], grads: list[tuple[torch.Tensor | None, ...]]) -> None:
        """Add the per-task gradients to ``.grad``, summed in task order (deterministic whatever
        order the threads or processes finished in)."""
        for position, param in enumerate(meta_params):
            total: torch.Tensor | None = None
            for task_grads in grads:
                grad = task_grads[position]
                if grad is not None:
                    total = grad if total is None else total + grad
            if total is not None:
                param.grad = total if param.grad is None else param.grad + total

    def _meta_step_processes(
        self, batch: TaskBatch, weights: np.ndarray, second_order: bool, kwargs: dict[str, Any]
    ) -> list[_TaskOutcome]:
        tasks = batch.num_tasks
        count = min(self.config.workers, tasks)
        if count == 1:  # nothing to share: no process to feed
            return self._meta_step_threads(batch, weights, second_order, kwargs)
        workers = self._start_workers()[:count]
        # The current meta-parameters and running statistics travel with every request: the
        # workers' copies were sent once and the optimizer has moved on since.
        state = {name: tensor.detach() for name, tensor in self.state_dict().items()}
        for offset, worker in enumerate(workers):
            indices = list(range(offset, tasks, len(workers)))
            worker.send(
                {
                    "state": state,
                    "training": self.model.training,
                    "tasks": [(index, _task_tensors(batch, index)) for index in indices],
                    "num_tasks": tasks,
                    "weights": weights,
                    "second_order": second_order,
                    "forward_kwargs": kwargs,
                }
            )
        grads: list[tuple[torch.Tensor | None, ...] | None] = [None] * tasks
        outcomes: list[_TaskOutcome | None] = [None] * tasks
        try:
            for worker in workers:
                for index, task_grads, outcome in worker.receive("meta-batch worker"):
                    grads[index], outcomes[index] = task_grads, outcome
        except BaseException:
            self.close_workers()  # a half-answered pool cannot be reused
            raise
        self._accumulate(self._meta_parameters(), grads)  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]

    def _start_workers(self) -> list[ForkedWorker]:
        workers: list[ForkedWorker] = self._workers  # type: ignore[assignment]
        if not workers:
            workers.extend(start_workers(self._serve_tasks, self.config.workers, SpawnedWorker))
        return workers

    def _serve_tasks(self, request: dict[str, Any]) -> list[tuple[Any, ...]]:
        """In a worker process: adapt to each task sent and return its meta-gradient."""
        self.load_state_dict(request["state"])
        self.model.train(request["training"])
        meta_params = self._meta_parameters()
        params = dict(self.model.named_parameters())
        replies = []
        for index, task in request["tasks"]:
            task_grads, outcome = self._task_meta_gradient(
                self.model,
                params,
                meta_params,
                task,
                num_tasks=request["num_tasks"],
                weights=request["weights"],
                second_order=request["second_order"],
                forward_kwargs=request["forward_kwargs"],
            )
            replies.append((index, task_grads, outcome))
        return replies

    def close_workers(self) -> None:
        """End the ``processes`` strategy's worker processes (they restart on the next meta-step)."""
        workers = getattr(self, "_workers", None)
        if workers and workers.owner_pid == os.getpid():  # never from a copy in another process
            close_workers(workers)
            workers.clear()

    def __del__(self) -> None:
        self.close_workers()

    # -------------------------------------------------------------- evaluation
    def evaluate_batch(
        self,
        batch: TaskBatch,
        *,
        forward_kwargs: Mapping[str, Any] | None = None,
        steps: int | None = None,
    ) -> list[float]:
        """Query accuracy of each task after adapting on its support set. Leaves the model unchanged.

        Evaluation normalises with batch statistics (transductive, as MAML++ does) and runs the
        query under ``no_grad``; the inner loop needs only first-order gradients of the support loss.
        """
        steps = steps or self.config.eval_inner_steps or self.config.inner_steps
        if steps > len(next(iter(self.inner_lrs.values()))):
            raise MamlConfigError(f"evaluation steps {steps} exceed the learned inner learning rates")
        kwargs = dict(forward_kwargs or {})
        tasks = batch.num_tasks
        if self.config.strategy == "vmap":
            return self._evaluate_vmap(batch, steps, kwargs)
        # Evaluation has no meta-gradient to return, so threads serve both parallel strategies.
        workers = min(self.config.workers, tasks) if self.config.strategy != "loop" else 1
        accuracies: list[float] = [0.0] * tasks

        def work(worker: int) -> None:
            module = self._replica(worker) if workers > 1 else self.model
            for index in range(worker, tasks, workers):
                accuracies[index] = self._evaluate_task(module, _task_tensors(batch, index), steps, kwargs)

        self._run_workers(work, workers)
        return accuracies

    def _evaluate_vmap(self, batch: TaskBatch, steps: int, kwargs: dict[str, Any]) -> list[float]:
        """:meth:`_evaluate_task` for all tasks of ``batch`` at once (``torch.func.vmap``)."""
        model, inner_names = self.model, self.inner_names
        params = {name: param.detach() for name, param in model.named_parameters()}
        rates = {name: self.inner_lr(name).detach() for name in inner_names}
        task_buffers = self._per_task_buffers(batch.num_tasks)  # updated, then dropped

        def task_accuracy(
            buffers: dict[str, torch.Tensor],
            support_x: torch.Tensor,
            support_y: torch.Tensor,
            query_x: torch.Tensor,
            query_y: torch.Tensor,
        ) -> torch.Tensor:
            support_x, query_x = self._prepare(support_x), self._prepare(query_x)
            fast = dict(params)
            for step in range(steps):
                step_kwargs = {**kwargs, "step": self.bn_step(step)}
                fast = _inner_step(
                    model, fast, inner_names, rates, step, buffers, support_x, support_y, step_kwargs
                )
            logits = functional_call(
                model, {**fast, **buffers}, (query_x,), {**kwargs, "step": self.bn_step(steps - 1)}
            )
            return (logits.argmax(dim=1) == query_y).float().mean()

        with torch.no_grad():
            accuracies = vmap(task_accuracy)(
                task_buffers, batch.support_x, batch.support_y, batch.query_x, batch.query_y
            )
        return accuracies.tolist()

    def _evaluate_task(
        self,
        module: nn.Module,
        task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        steps: int,
        kwargs: dict[str, Any],
    ) -> float:
        support_x, support_y, query_x, query_y = task
        support_x, query_x = self._prepare(support_x), self._prepare(query_x)
        buffers = {name: buffer.detach().clone() for name, buffer in self.model.named_buffers()}
        fast = {name: param.detach() for name, param in self.model.named_parameters()}
        for step in range(steps):
            adapted = [fast[name].requires_grad_() for name in self.inner_names]
            with torch.enable_grad():
                logits = functional_call(
                    module,
                    {**fast, **buffers},
                    (support_x,),
                    {**kwargs, "step": self.bn_step(step)},
                    strict=False,
                )
                grads = torch.autograd.grad(F.cross_entropy(logits, support_y), adapted, allow_unused=True)
            with torch.no_grad():
                for name, grad in zip(self.inner_names, grads, strict=True):
                    if grad is not None:
                        fast[name] = fast[name].detach() - self.inner_lr(name)[step].detach() * grad
                    else:
                        fast[name] = fast[name].detach()
        with torch.no_grad():
            logits = functional_call(
                module,
                {**fast, **buffers},
                (query_x,),
                {**kwargs, "step": self.bn_step(steps - 1)},
                strict=False,
            )
            return (logits.argmax(dim=1) == query_y).float().mean().item()
