"""The GA's fitness and cost functions for a real (meta-trained) super-net.

Fitness (Algorithm 1's ``L(T, A)``, averaged over a slice): for every task of the slice, start
from the sub-net's inherited meta-weights, run the inner loop on the task's support set, and
take the cross-entropy on its query set. Lower is better.

The inner loop is injected (``InnerLoop``). :func:`inner_loop_from_learner` takes it from a
meta-trained :class:`engine.meta.maml.MamlLearner` (its adapted parameter names and learned
per-layer, per-step rates - the same rule as ``MamlLearner.evaluate_batch``, which returns only
accuracies, while the GA needs the query loss); :class:`LslrInnerLoop` with explicit rates
serves tests and ad-hoc use. Evaluation-time adaption needs no second-order terms - nothing is
meta-updated - so the inner loop takes plain gradients (no ``create_graph``): this is the exact
MAML++ inner loop, not a first-order approximation. The query pass runs under ``no_grad``.

BatchNorm: as in MAML and MAML++ evaluation, each inner step ``s`` normalises with the batch
statistics of the support set and the per-step BN affine row ``s``; the query pass uses the
last step's row. ``track_stats=False`` keeps the super-net's running statistics untouched, so
scoring an architecture never changes the super-net.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.cost import arch_macs, arch_params
from engine.progress import ProgressCallback, null_progress
from engine.search.constraints import Constraint
from engine.search.evolution import FitnessFn, GAConfig, SearchResult, run_ga
from engine.search.grouped import grouped_logits

Params = dict[str, torch.Tensor]
ForwardFn = Callable[[Params, torch.Tensor, int], torch.Tensor]
#: ``loss_fn(params, x, y, step)``: one task's cross-entropy with BN step ``step``.
BatchedLossFn = Callable[[Params, torch.Tensor, torch.Tensor, int], torch.Tensor]
#: ``logits_fn(params, x, step)``: logits ``[tasks, n, classes]`` of a stack of tasks ``[tasks, n, ...]``.
GroupedLogitsFn = Callable[[Params, torch.Tensor, int], torch.Tensor]

#: Largest activation (images x channels x pixels of the network input) that one vmapped chunk of
#: tasks may reach. It bounds memory at ~32 MB per saved tensor; small sub-nets on Omniglot score a
#: whole 16-task slice in one chunk, the widest paper-size ones a few tasks at a time.
MAX_BATCHED_ELEMENTS = 1 << 23

#: How :meth:`SuperNetScorer.score` runs a slice's tasks (all compute the same fitness; tests
#: compare them): "auto" (production: see :meth:`SuperNetScorer.scoring_path`), "grouped" (tasks
#: as channel groups of one forward, :mod:`engine.search.grouped`), "batched" (tasks vmapped on
#: the sliced sub-net), "sliced" (one task at a time on the sliced sub-net) or "reference" (one
#: at a time on the full super-net tensors, what benchmarks/ga_adaption.py times the production
#: path against). Forked search processes inherit it.
SCORING_PATHS = ("auto", "grouped", "batched", "sliced", "reference")
SCORING_PATH = "auto"

#: On a CPU, "auto" runs a slice's tasks together ("grouped") only while the sub-net's largest
#: activation per task (support images x channels x pixels of its biggest layer output) stays at
#: or below this; wider sub-nets are scored one task at a time. Batching saves PyTorch's
#: per-operation overhead, which dominates for narrow layers; for wide ones the stacked
#: activations fall out of the caches. Measured on the 2-core AMD EPYC with
#: benchmarks/scoring_paths.py (1 thread, `cpu`-preset super-net, 20-way 1-shot, 30 random
#: sub-nets, docs/BENCHMARKS.md): grouped won for all 9 sub-nets up to 94,080 elements, for 11 of
#: 12 at 125,440-188,160, and for 4 of 9 above. (With the vmapped way, before grouped, the limit
#: was 100,000.) On a GPU batching always pays, so "auto" always batches there (vmapped: the
#: grouped way has not been run on a GPU).
MAX_BATCHED_TASK_ACTIVATION = 200_000


class AdaptionInputError(ValueError):
    """Tasks, slices or a latency table that do not fit the super-net or the search space."""


@contextlib.contextmanager
def scoring_precision(precision: str) -> Iterator[None]:
    """Score in ``precision`` (engine.adaption_presets.SEARCH_PRECISIONS) for the duration.

    "bfloat16" is CPU autocast: convolutions and matrix products run in bfloat16 (and BatchNorm
    and the activations on their bfloat16 outputs), while the sub-net's weights, the inner
    loop's gradient updates and the losses stay float32 (autocast casts the weights on the way
    in, so their gradients come back float32). It is for the search only, whose choices need
    the ranking of architectures, not their last digits; on CPUs with bfloat16 instructions it
    is cheaper (docs/ADAPTION.md, "Search precision"). Scores stay deterministic per machine
    (one torch thread, oneDNN's fixed kernels)."""
    if precision == "float32":
        yield
        return
    if precision != "bfloat16":
        raise AdaptionInputError(f"scoring precision must be float32 or bfloat16, got {precision!r}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yield


class InnerLoop(Protocol):
    """``inner_loop(forward, params, support_x, support_y) -> fast_params``.

    ``forward(params, x, step)`` returns the logits of the architecture being scored with BN
    step ``step``; ``steps`` is how many inner steps the loop takes (the query pass uses BN step
    ``steps - 1``).
    """

    steps: int

    def __call__(
        self, forward: ForwardFn, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Params: ...


@dataclass
class LslrInnerLoop:
    """Gradient steps with per-parameter, per-step learning rates (MAML++'s LSLR update rule).

    ``learning_rates`` maps a parameter name (``layers.0.conv.weight`` ...) to a scalar or a
    tensor of ``steps`` rates; names not listed use ``default_lr``. ``adapted_names`` limits the
    update to those parameters (MAML++ keeps BN weights out of the inner loop); ``None`` adapts all.
    """

    steps: int = 5
    default_lr: float = 0.1
    learning_rates: Mapping[str, float | torch.Tensor] = field(default_factory=dict)
    adapted_names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise AdaptionInputError(f"inner-loop steps must be an int >= 1, got {self.steps!r}")
        if not math.isfinite(self.default_lr) or self.default_lr < 0:
            raise AdaptionInputError(f"default_lr must be finite and >= 0, got {self.default_lr!r}")
        for name, rates in self.learning_rates.items():
            if isinstance(rates, torch.Tensor) and rates.numel() not in (1, self.steps):
                raise AdaptionInputError(
                    f"learning rates of {name!r} have {rates.numel()} entries, expected 1 or {self.steps}"
                )

    def rate(self, name: str, step: int) -> float | torch.Tensor:
        rates = self.learning_rates.get(name, self.default_lr)
        if isinstance(rates, torch.Tensor):
            return rates.detach().reshape(-1)[step if rates.numel() > 1 else 0]
        return rates

    def __call__(
        self, forward: ForwardFn, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Params:
        fast = {name: tensor.detach() for name, tensor in params.items()}
        names = list(fast) if self.adapted_names is None else list(self.adapted_names)
        unknown = [name for name in names if name not in fast]
        if unknown:
            raise AdaptionInputError(f"inner loop asked to adapt unknown parameters {unknown[:3]}")
        for step in range(self.steps):
            with torch.enable_grad():
                leaves = {name: fast[name].detach().requires_grad_(True) for name in names}
                loss = F.cross_entropy(forward({**fast, **leaves}, support_x, step), support_y)
                grads = torch.autograd.grad(loss, [leaves[name] for name in names], allow_unused=True)
            for name, gradient in zip(names, grads, strict=True):
                leaf = leaves[name].detach()
                # Layers the sub-net does not use get no gradient: nothing to adapt there.
                fast[name] = leaf if gradient is None else leaf - self.rate(name, step) * gradient
        return fast

    def adapt_batched(
        self, loss_fn: BatchedLossFn, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> tuple[Params, Params]:
        """The same rule on a stack of tasks at once (``support_x``: ``[tasks, n, ...]``).

        ``loss_fn(params, x, y, step)`` is one task's support loss; ``torch.func.vmap`` runs it,
        and its gradient, over the task dimension. Every task starts from the same ``params``
        (not batched at step 0). Returns ``(fixed, fast)``: the parameters that do not adapt, and
        the adapted ones with a leading task dimension. Only names present in ``params`` adapt (a
        sliced sub-net holds just the tensors it uses; the others would get no gradient anyway).
        """
        wanted = params if self.adapted_names is None else self.adapted_names
        names = [name for name in wanted if name in params]
        fixed = {name: tensor.detach() for name, tensor in params.items() if name not in names}
        fast = {name: params[name].detach() for name in names}
        batched = False
        for step in range(self.steps):

            def support_loss(
                adapted: Params, x: torch.Tensor, y: torch.Tensor, step: int = step
            ) -> torch.Tensor:
                return loss_fn({**fixed, **adapted}, x, y, step)

            with torch.enable_grad():
                grads = vmap(grad(support_loss), in_dims=(0 if batched else None, 0, 0))(
                    fast, support_x, support_y
                )
            fast = {name: fast[name] - self.rate(name, step) * grads[name] for name in names}
            batched = True
        return fixed, fast

    def adapt_grouped(
        self, logits_fn: GroupedLogitsFn, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Params:
        """The same rule on a stack of tasks through one grouped forward (``support_x``:
        ``[tasks, n, ...]``; :mod:`engine.search.grouped`). ``logits_fn(params, x, step)`` returns
        ``[tasks, n, classes]``; the adapted parameters come back with a leading task dimension,
        the others as given. The loss summed over tasks has, for each task's own weights, that
        task's gradient, so one backward serves every task."""
        tasks, images = support_y.shape
        wanted = params if self.adapted_names is None else self.adapted_names
        names = [name for name in wanted if name in params]
        fast = {name: tensor.detach() for name, tensor in params.items()}
        for step in range(self.steps):
            with torch.enable_grad():
                leaves = {
                    name: (fast[name] if step else fast[name].expand(tasks, *fast[name].shape).clone())
                    .detach()
                    .requires_grad_(True)
                    for name in names
                }
                logits = logits_fn({**fast, **leaves}, support_x, step)
                loss = F.cross_entropy(
                    logits.reshape(tasks * images, -1), support_y.reshape(-1), reduction="sum"
                )
                grads = torch.autograd.grad(loss / images, [leaves[name] for name in names])
            for name, gradient in zip(names, grads, strict=True):
                fast[name] = leaves[name].detach() - self.rate(name, step) * gradient
        return fast


def inner_loop_from_learner(learner: Any, steps: int | None = None) -> LslrInnerLoop:
    """The inner loop of a meta-trained :class:`engine.meta.maml.MamlLearner`.

    Same rule as ``MamlLearner.evaluate_batch``: only ``learner.inner_names`` adapt (BN weights
    stay meta-learned), each with its learned per-step rate; ``steps`` defaults to the learner's
    evaluation steps.
    """
    config = learner.config
    steps = steps or config.eval_inner_steps or config.inner_steps
    learned = len(next(iter(learner.inner_lrs.values())))
    if steps > learned:
        raise AdaptionInputError(f"{steps} inner steps requested, the learner has rates for {learned}")
    return LslrInnerLoop(
        steps=steps,
        default_lr=float(config.inner_lr),
        learning_rates={
            name: learner.inner_lr(name).detach()[:steps].clone() for name in learner.inner_names
        },
        adapted_names=tuple(learner.inner_names),
    )


def slice_tasks(batch: Any) -> list[Any]:
    """The tasks of one slice: a sequence of tasks, or a stacked ``TaskBatch`` (``num_tasks``/``task(i)``).

    A stacked batch is split by indexing its ``[tasks, ...]`` tensors, because the two task
    batch types differ in ``task(i)``: ``engine.meta.tasks.TaskBatch`` returns a 4-tuple,
    ``engine.data.sampling.TaskBatch`` a one-task batch that still has the task dimension.
    """
    names = ("support_x", "support_y", "query_x", "query_y")
    if all(hasattr(batch, name) for name in names) and batch.support_x.dim() == 5:
        tensors = [getattr(batch, name) for name in names]
        return [tuple(t[index] for t in tensors) for index in range(tensors[0].shape[0])]
    if hasattr(batch, "num_tasks") and hasattr(batch, "task"):
        return [batch.task(index) for index in range(batch.num_tasks)]
    return list(batch)


def task_tensors(task: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(support_x, support_y, query_x, query_y)`` of a task object or 4-tuple."""
    if all(hasattr(task, name) for name in ("support_x", "support_y", "query_x", "query_y")):
        return task.support_x, task.support_y, task.query_x, task.query_y
    if isinstance(task, Sequence) and len(task) == 4:
        return tuple(task)  # type: ignore[return-value]
    raise AdaptionInputError(
        f"a task must have support_x/support_y/query_x/query_y or be a 4-tuple, got {type(task).__name__}"
    )


def task_slices(tasks: Sequence[Any], tasks_per_slice: int) -> list[list[Any]]:
    """Cut the validation tasks into consecutive slices of ``tasks_per_slice`` (a short tail is dropped)."""
    if isinstance(tasks_per_slice, bool) or not isinstance(tasks_per_slice, int) or tasks_per_slice < 1:
        raise AdaptionInputError(f"tasks_per_slice must be an int >= 1, got {tasks_per_slice!r}")
    if len(tasks) < tasks_per_slice:
        raise AdaptionInputError(
            f"need at least {tasks_per_slice} validation tasks for one slice, got {len(tasks)}"
        )
    count = len(tasks) // tasks_per_slice
    return [list(tasks[i * tasks_per_slice : (i + 1) * tasks_per_slice]) for i in range(count)]


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm with batch statistics (train mode) for the duration, then the previous mode."""
    was_training = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class ArchScore:
    """Query loss and accuracy of one architecture over some tasks, after the inner loop."""

    loss: float
    accuracy: float
    task_accuracies: tuple[float, ...]

    @classmethod
    def of(cls, losses: Sequence[float], accuracies: Sequence[float]) -> ArchScore:
        """Means over tasks of per-task query losses and accuracies."""
        return cls(
            loss=sum(losses) / len(losses),
            accuracy=sum(accuracies) / len(accuracies),
            task_accuracies=tuple(accuracies),
        )

    @property
    def accuracy_ci95(self) -> float:
        """Half-width of the normal 95 % confidence interval of the mean task accuracy."""
        n = len(self.task_accuracies)
        if n < 2:
            return math.nan
        mean = self.accuracy
        variance = sum((a - mean) ** 2 for a in self.task_accuracies) / (n - 1)
        return 1.96 * math.sqrt(variance / n)


def per_task_query_results(logits: torch.Tensor, query_y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-task mean query losses and accuracies from logits ``[tasks, queries, classes]``."""
    logits = logits.float()  # bfloat16 under scoring_precision("bfloat16"): reduce in float32
    losses = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none")
    losses = losses.view(query_y.shape).mean(dim=1)
    accuracies = (logits.argmax(dim=-1) == query_y).float().mean(dim=1)
    return [float(v) for v in losses], [float(v) for v in accuracies]


class SuperNetScorer:
    """Scores architectures of one super-net on tasks: inherited weights -> inner loop -> query."""

    def __init__(self, supernet: nn.Module, inner_loop: InnerLoop) -> None:
        self.supernet = supernet
        self.inner_loop = inner_loop
        bn_steps = int(getattr(supernet, "bn_steps", 1))
        self.query_step = min(inner_loop.steps, bn_steps) - 1
        self.bn_steps = bn_steps

    def _forward(self, arch: Any, buffers: Params) -> ForwardFn:
        supernet, bn_steps = self.supernet, self.bn_steps

        def forward(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            # Steps beyond the super-net's per-step BN rows reuse its last row (MAML++ convention).
            return functional_call(
                supernet,
                (params, buffers),
                (x,),
                {"arch": arch, "step": min(step, bn_steps - 1), "track_stats": False},
            )

        return forward

    def score(self, arch: Any, tasks: Sequence[Any]) -> ArchScore:
        """Query loss and accuracy of ``arch`` after the inner loop on each task's support set.

        Tasks of one shape are scored together (:meth:`score_grouped` on a CPU,
        :meth:`score_batched` on a GPU), in chunks; otherwise one by one (:meth:`score_each`), on
        the sliced sub-net where the inner loop is an :class:`LslrInnerLoop`. All do the same
        arithmetic (tests compare them); the batched ones send every operation through PyTorch
        once per chunk instead of once per task.
        """
        tasks = slice_tasks(tasks)
        if not tasks:
            raise AdaptionInputError("no tasks to score the architecture on")
        tensors = [tuple(task_tensors(task)) for task in tasks]
        path = self.scoring_path(arch, tensors)
        if path not in ("batched", "grouped"):
            return self.score_each(arch, tasks, sliced=path == "sliced")
        score_chunk = self.score_grouped if path == "grouped" else self.score_batched
        losses, accuracies = [], []
        per_chunk = self.tasks_per_chunk(arch, tensors[0][0])
        for start in range(0, len(tensors), per_chunk):
            chunk_losses, chunk_accuracies = score_chunk(arch, tensors[start : start + per_chunk])
            losses.extend(chunk_losses)
            accuracies.extend(chunk_accuracies)
        return ArchScore.of(losses, accuracies)

    def scoring_path(self, arch: Any, tensors: Sequence[tuple[torch.Tensor, ...]]) -> str:
        """ "grouped", "batched", "sliced" or "reference": how :meth:`score` runs these tasks
        under ``SCORING_PATH``. Only same-shape tasks can be batched, and only an
        :class:`LslrInnerLoop` names the tensors a sliced sub-net must adapt. The choice
        depends on the architecture and the task shapes alone, never on timings, so a search
        stays deterministic per seed whichever process scores an architecture."""
        if SCORING_PATH not in SCORING_PATHS:
            raise AdaptionInputError(f"SCORING_PATH must be one of {SCORING_PATHS}, got {SCORING_PATH!r}")
        sliceable = isinstance(self.inner_loop, LslrInnerLoop) and hasattr(self.supernet, "sliced_parameters")
        if SCORING_PATH == "reference" or not sliceable:
            return "reference"
        if SCORING_PATH == "sliced":
            return "sliced"
        uniform = all(tuple(t.shape for t in task) == tuple(t.shape for t in tensors[0]) for task in tensors)
        if not uniform:
            return "sliced"
        if SCORING_PATH in ("batched", "grouped"):
            return SCORING_PATH
        if self.supernet.head.weight.device.type != "cpu":
            return "batched"
        fits = self.largest_activation(arch, tensors[0][0]) <= MAX_BATCHED_TASK_ACTIVATION
        return "grouped" if fits else "sliced"

    def largest_activation(self, arch: Any, support_x: torch.Tensor) -> int:
        """Elements of the sub-net's biggest layer output for one task's support set."""
        biggest = max(
            spec.out_channels * math.ceil(spec.in_size / spec.stride) ** 2
            for spec in self.supernet.space.layer_specs(arch)
            if spec.op != "head"
        )
        return support_x.shape[0] * biggest

    def tasks_per_chunk(self, arch: Any, support_x: torch.Tensor) -> int:
        space = self.supernet.space
        widest = max(space.channels(arch, index) for index in range(arch.n_used_layers))
        per_task = support_x.shape[0] * widest * support_x.shape[-1] * support_x.shape[-2]
        return max(1, MAX_BATCHED_ELEMENTS // max(1, per_task))

    def _check_labels(self, support_y: torch.Tensor) -> None:
        num_classes = getattr(getattr(self.supernet, "space", None), "num_classes", None)
        if num_classes is not None and int(support_y.max()) >= num_classes:
            raise AdaptionInputError(
                f"task labels go up to {int(support_y.max())} but the super-net is {num_classes}-way"
            )

    def _stacked(
        self, arch: Any, tasks: Sequence[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Params]:
        """The tasks' tensors stacked ``[tasks, ...]`` on the super-net's device (labels
        checked), and the sub-net's sliced parameters, detached."""
        device = self.supernet.head.weight.device
        support_x, support_y, query_x, query_y = (
            torch.stack([task[i] for task in tasks]).to(device) for i in range(4)
        )
        self._check_labels(support_y)
        params = {name: tensor.detach() for name, tensor in self.supernet.sliced_parameters(arch).items()}
        return support_x, support_y, query_x, query_y, params

    def score_batched(
        self, arch: Any, tasks: Sequence[tuple[torch.Tensor, ...]]
    ) -> tuple[list[float], list[float]]:
        """Per-task query losses and accuracies of ``arch`` on same-shape tasks, all at once."""
        supernet = self.supernet
        support_x, support_y, query_x, query_y, params = self._stacked(arch, tasks)
        logits_of = self._forward(arch, {name: b.detach() for name, b in supernet.named_buffers()})

        def task_loss(params: Params, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
            return F.cross_entropy(logits_of(params, x, step), y)

        with batch_statistics(supernet):
            fixed, fast = self.inner_loop.adapt_batched(task_loss, params, support_x, support_y)
            with torch.no_grad():

                def query_logits(adapted: Params, x: torch.Tensor) -> torch.Tensor:
                    return logits_of({**fixed, **adapted}, x, self.query_step)

                logits = vmap(query_logits)(fast, query_x)
        return per_task_query_results(logits, query_y)

    def score_grouped(
        self, arch: Any, tasks: Sequence[tuple[torch.Tensor, ...]]
    ) -> tuple[list[float], list[float]]:
        """Per-task query losses and accuracies of ``arch`` on same-shape tasks, all at once
        through :func:`engine.search.grouped.grouped_logits` (no ``vmap``)."""
        supernet = self.supernet
        support_x, support_y, query_x, query_y, params = self._stacked(arch, tasks)

        def logits_of(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            return grouped_logits(supernet, arch, params, x, step)

        fast = self.inner_loop.adapt_grouped(logits_of, params, support_x, support_y)
        with torch.no_grad():
            logits = logits_of(fast, query_x, self.query_step)
        return per_task_query_results(logits, query_y)

    def score_each(self, arch: Any, tasks: Sequence[Any], sliced: bool = False) -> ArchScore:
        """One task at a time. The reference (``sliced=False``) runs the inner loop on the full
        super-net tensors; ``sliced=True`` on the sub-net's cut tensors only (same arithmetic,
        no gradient or update of the unused parts; needs an :class:`LslrInnerLoop`)."""
        tasks = slice_tasks(tasks)
        if not tasks:
            raise AdaptionInputError("no tasks to score the architecture on")
        params = {name: p.detach() for name, p in self.supernet.named_parameters()}
        inner_loop = self.inner_loop
        if sliced:
            if not isinstance(inner_loop, LslrInnerLoop):
                raise AdaptionInputError(
                    "sliced scoring needs an LslrInnerLoop (it names the adapted tensors)"
                )
            params = {name: p.detach() for name, p in self.supernet.sliced_parameters(arch).items()}
            wanted = params if inner_loop.adapted_names is None else inner_loop.adapted_names
            inner_loop = replace(inner_loop, adapted_names=[name for name in wanted if name in params])
        buffers = {name: b.detach() for name, b in self.supernet.named_buffers()}
        forward = self._forward(arch, buffers)
        device = next(iter(params.values())).device
        losses, accuracies = [], []
        with batch_statistics(self.supernet):
            for task in tasks:
                support_x, support_y, query_x, query_y = (t.to(device) for t in task_tensors(task))
                self._check_labels(support_y)
                fast = inner_loop(forward, params, support_x, support_y)
                with torch.no_grad():
                    logits = forward(fast, query_x, self.query_step).float()
                    losses.append(float(F.cross_entropy(logits, query_y)))
                    accuracies.append(float((logits.argmax(dim=1) == query_y).float().mean()))
        return ArchScore.of(losses, accuracies)


def supernet_fitness(
    supernet: nn.Module, space: Any, task_batches: Sequence[Sequence[Any]], inner_loop: InnerLoop
) -> FitnessFn:
    """``fitness(arch, slice_id)``: mean query loss over slice ``slice_id`` of ``task_batches``.

    Each slice is a list of tasks or a stacked ``engine.meta.tasks.TaskBatch``. With a trained
    ``MamlLearner``: ``supernet_fitness(learner.model, space, slices, inner_loop_from_learner(learner))``.
    """
    if getattr(supernet, "space", space) != space:
        raise AdaptionInputError("the super-net was built for another search space")
    slices = [slice_tasks(batch) for batch in task_batches]
    if not slices or any(len(tasks) == 0 for tasks in slices):
        raise AdaptionInputError("task_batches must be a non-empty list of non-empty task slices")
    scorer = SuperNetScorer(supernet, inner_loop)

    def fitness(arch: Any, slice_id: int) -> float:
        return scorer.score(arch, slices[slice_id]).loss

    return fitness


def make_costs_fn(space: Any, lut: Any | None = None) -> Callable[[Any], dict[str, float]]:
    """Exact params and MACs from the space's LayerSpecs, plus ``latency_ms`` from a LatencyTable.

    A table built for another search space, or missing entries of this one, is refused up
    front rather than failing in the middle of a search.
    """
    if lut is not None:
        recorded = lut.metadata.get("search_space")
        if recorded is not None and recorded != space.to_dict():
            raise AdaptionInputError(
                f"latency table of device {lut.device!r} was built for another search space "
                f"({recorded.get('backbone')}, {recorded.get('image_size')}px, {recorded.get('num_classes')}-way)"
            )
        missing = lut.missing(space)
        if missing:
            raise AdaptionInputError(
                f"latency table of device {lut.device!r} lacks {len(missing)} layers of this search space "
                f"(e.g. {missing[0]!r})"
            )

    def costs(arch: Any) -> dict[str, float]:
        result = {"params": float(arch_params(space, arch)), "macs": float(arch_macs(space, arch))}
        if lut is not None:
            result["latency_ms"] = float(lut.predict(space, arch))
        return result

    return costs


def adapt_to_budget(
    supernet: nn.Module,
    space: Any,
    validation_tasks: Sequence[Any],
    constraints: Sequence[Constraint],
    inner_loop: InnerLoop,
    config: GAConfig | None = None,
    *,
    lut: Any | None = None,
    progress: ProgressCallback = null_progress,
    **ga_kwargs: Any,
) -> SearchResult:
    """Algorithm 1 on a real super-net: validation tasks cut into ``config.tasks_per_slice`` slices."""
    config = config if config is not None else GAConfig()
    slices = task_slices(validation_tasks, config.tasks_per_slice)
    config = GAConfig.from_dict({**config.to_dict(), "num_slices": len(slices)})
    return run_ga(
        space,
        supernet_fitness(supernet, space, slices, inner_loop),
        make_costs_fn(space, lut),
        constraints,
        config,
        progress=progress,
        **ga_kwargs,
    )
