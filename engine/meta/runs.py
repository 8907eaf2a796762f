"""Presets and the one place a meta-training run is assembled from plain settings.

The CLI, the benchmarks and (later) the dashboard's worker all describe a run with a
:class:`RunSpec` (JSON-friendly), and :func:`build_run` turns it into a learner, a task source
and a :class:`~engine.meta.train.MetaTrainConfig`. The spec is stored in the checkpoint, so
``evaluate`` and ``--resume`` rebuild exactly the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.meta.maml import DEVICE_STRATEGIES, STRATEGIES, MamlConfig, MamlLearner
from engine.meta.synthetic import SyntheticTasks
from engine.meta.tasks import TaskSource
from engine.meta.train import MetaTrainConfig
from engine.seeding import derive_seed

BACKBONES = ("vgg9", "resnet12", "maml")
#: "mamlpp": MAML++ (LSLR, per-step BN, multi-step loss, order annealing); "maml": plain MAML
#: (Finn et al.: fixed inner rate, one BN for all steps, final-step loss), the paper's other baseline.
ALGORITHMS = ("mamlpp", "maml")
#: The few-shot datasets of engine.data (docs/DATASETS.md for their on-disk formats) and
#: "synthetic" (generated tasks, no files: tests and demos).
DATASETS = ("omniglot", "mini-imagenet", "cifar-fs", "fc100", "synthetic")
#: (channels, image size) per dataset: the sizes the few-shot literature uses for each.
IMAGE_SHAPES = {
    "omniglot": (1, 28),
    "mini-imagenet": (3, 84),
    "cifar-fs": (3, 32),
    "fc100": (3, 32),
    "synthetic": (1, 28),
}
MODEL_INIT_STREAM = 3
EVAL_SEED_STREAM = 4
#: (pool_size, global_expansion, adaptive_layers) of the full H-Meta-NAS search space.
DEFAULT_SPACE_SWITCHES = (5, True, True)


#: Worker processes: the fastest of our strategies on the 2-core CPUs measured; on the Intel one
#: also faster than the plain loop, on the AMD one about even with it (docs/BENCHMARKS.md).
DEFAULT_STRATEGY = "processes"
#: On a GPU all tasks of a meta-batch run as one batched kernel per layer (docs/BENCHMARKS.md).
DEFAULT_GPU_STRATEGY = "vmap"
DEVICES = tuple(DEVICE_STRATEGIES)


def default_strategy(device: str) -> str:
    """The strategy meta-training uses on ``device`` unless told otherwise."""
    return DEFAULT_GPU_STRATEGY if device == "cuda" else DEFAULT_STRATEGY


class RunSpecError(ValueError):
    """A run description naming something that does not exist."""


@dataclass(frozen=True)
class Preset:
    """Size of a run. ``channels`` scales the network: the super-net's base channels per layer
    (64 in the paper) or the MAML++ baseline's filters."""

    name: str
    epochs: int
    iterations_per_epoch: int
    meta_batch: int
    inner_steps: int
    multi_step_epochs: int
    first_order_epochs: int
    checkpoint_every: int
    queries: int
    channels: int
    eval_tasks: int
    meta_lr: float = 1e-3


PRESETS = {
    # Seconds: tests, demos, smoke checks. Tiny network, few short iterations.
    "tiny": Preset("tiny", epochs=4, iterations_per_epoch=12, meta_batch=2, inner_steps=2, multi_step_epochs=2,
                   first_order_epochs=2, checkpoint_every=4, queries=3, channels=8, eval_tasks=60, meta_lr=5e-3),
    # About an hour on 2 idle CPU cores for 20-way (measured 0.52 s per second-order iteration of the
    # largest 20-way super-net, less for first-order and sampled sub-nets; 5-way about a third):
    # half-width network, 3 inner steps, first-order for the first half.
    "cpu": Preset("cpu", epochs=30, iterations_per_epoch=200, meta_batch=4, inner_steps=3, multi_step_epochs=8,
                  first_order_epochs=15, checkpoint_every=100, queries=3, channels=32, eval_tasks=600),
    # The MAML++ Omniglot protocol (H-Meta-NAS App. F): 100 x 500 iterations, meta-batch 8, 5 steps,
    # 1 query image per class (MAML++ num_target_samples), second order throughout.
    "paper": Preset("paper", epochs=100, iterations_per_epoch=500, meta_batch=8, inner_steps=5, multi_step_epochs=10,
                    first_order_epochs=0, checkpoint_every=500, queries=1, channels=64, eval_tasks=600),
}  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    dataset: str = "omniglot"
    ways: int = 20
    shots: int = 1
    backbone: str = "vgg9"
    preset: str = "cpu"
    #: Query images per class (``None``: the preset's).
    queries: int | None = None
    #: Total meta-iterations (``None``: the preset's), rounded up to whole epochs.
    iterations: int | None = None
    seed: int = 0
    threads: int = 2
    #: How a meta-batch's tasks share the cores (engine.meta.maml).
    strategy: str = DEFAULT_STRATEGY
    p_end: float = 0.25
    #: Decay speed alpha of progressive shrinking (H-Meta-NAS eq. 4; the paper picks 5 in Table 9).
    shrink_alpha: float = 5.0
    algorithm: str = "mamlpp"
    #: Search-space switches of the super-net (H-Meta-NAS Table 2's ablation, engine.space): the
    #: head's average-pool size, Global Expansion (edge layers' widths searchable) and Adaptive
    #: Number of Layers (depth searchable). Fixed 4-conv baselines (backbone "maml") have no search
    #: space, so these must stay at the defaults there.
    pool_size: int = 5
    global_expansion: bool = True
    adaptive_layers: bool = True
    #: Where the network and its tasks live: "cpu" or "cuda" (strategy "loop" or "vmap" there).
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise RunSpecError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.dataset not in DATASETS:
            raise RunSpecError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.backbone not in BACKBONES:
            raise RunSpecError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.preset not in PRESETS:
            raise RunSpecError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.ways < 2 or self.shots < 1 or (self.queries is not None and self.queries < 1):
            raise RunSpecError(
                f"need ways >= 2, shots >= 1, queries >= 1; got {self.ways}, {self.shots}, {self.queries}"
            )
        if self.iterations is not None and self.iterations < 1:
            raise RunSpecError(f"iterations must be >= 1, got {self.iterations}")
        if self.threads < 1:
            raise RunSpecError(f"threads must be >= 1, got {self.threads}")
        if self.strategy not in STRATEGIES:
            raise RunSpecError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.device not in DEVICES:
            raise RunSpecError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.strategy not in DEVICE_STRATEGIES[self.device]:
            raise RunSpecError(
                f"strategy {self.strategy!r} does not run on {self.device}; "
                f"choose one of {', '.join(DEVICE_STRATEGIES[self.device])}"
            )
        if (
            isinstance(self.shrink_alpha, bool)
            or not isinstance(self.shrink_alpha, int | float)
            or not math.isfinite(self.shrink_alpha)
            or self.shrink_alpha <= 0
        ):
            raise RunSpecError(f"shrink_alpha must be a finite number > 0, got {self.shrink_alpha!r}")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise RunSpecError(f"pool_size must be an int >= 1, got {self.pool_size!r}")
        for name in ("global_expansion", "adaptive_layers"):
            if not isinstance(getattr(self, name), bool):
                raise RunSpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        switches = (self.pool_size, self.global_expansion, self.adaptive_layers)
        if self.backbone == "maml" and switches != DEFAULT_SPACE_SWITCHES:
            raise RunSpecError(
                "pool_size/global_expansion/adaptive_layers are super-net search-space switches; "
                "the fixed 4-conv baseline (backbone 'maml') has no search space"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)  # specs stored before ``device`` existed get the default, "cpu"

    def with_(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)

    @property
    def preset_values(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def query_count(self) -> int:
        return self.queries if self.queries is not None else self.preset_values.queries


def train_config(spec: RunSpec) -> MetaTrainConfig:
    preset = spec.preset_values
    epochs, per_epoch = preset.epochs, preset.iterations_per_epoch
    if spec.iterations is not None:
        epochs = min(preset.epochs, spec.iterations)
        per_epoch = math.ceil(spec.iterations / epochs)
    if spec.algorithm == "maml":
        maml = MamlConfig.maml(
            inner_steps=preset.inner_steps,
            inner_lr=0.1,
            meta_lr=preset.meta_lr,
            strategy=spec.strategy,
            workers=spec.threads,
        )
    else:
        maml = MamlConfig(
            inner_steps=preset.inner_steps,
            inner_lr=0.1,
            meta_lr=preset.meta_lr,
            multi_step_epochs=min(preset.multi_step_epochs, epochs),
            first_order_epochs=min(preset.first_order_epochs, epochs),
            strategy=spec.strategy,
            workers=spec.threads,
        )
    from engine.meta.train import ShrinkConfig

    return MetaTrainConfig(
        maml=maml,
        epochs=epochs,
        iterations_per_epoch=per_epoch,
        meta_batch=preset.meta_batch,
        checkpoint_every=min(preset.checkpoint_every, epochs * per_epoch),
        seed=spec.seed,
        torch_threads=spec.threads,
        shrink=ShrinkConfig(p_end=spec.p_end, alpha=float(spec.shrink_alpha)),
    )


def build_space(spec: RunSpec) -> Any:
    """The search space of a super-net run (``None`` for the fixed MAML++ baseline)."""
    if spec.backbone == "maml":
        return None
    from engine.space import SearchSpace

    channels, size = IMAGE_SHAPES[spec.dataset]
    factory = SearchSpace.vgg9 if spec.backbone == "vgg9" else SearchSpace.resnet12
    space = factory(
        in_channels=channels,
        image_size=size,
        num_classes=spec.ways,
        pool_size=spec.pool_size,
        global_expansion=spec.global_expansion,
        adaptive_layers=spec.adaptive_layers,
    )
    scale = spec.preset_values.channels / 64
    if scale != 1:
        space = replace(
            space, base_channels=tuple(max(1, int(round(c * scale))) for c in space.base_channels)
        )
    return space


def build_model(spec: RunSpec, space: Any) -> nn.Module:
    # Plain MAML shares one set of BatchNorm statistics and weights across the inner steps.
    steps = 1 if spec.algorithm == "maml" else spec.preset_values.inner_steps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, MODEL_INIT_STREAM))
        if space is None:
            from engine.baselines import MamlConvNet

            channels, size = IMAGE_SHAPES[spec.dataset]
            return MamlConvNet(channels, size, spec.ways, filters=spec.preset_values.channels, bn_steps=steps)
        from engine.supernet import SuperNet

        return SuperNet(space, bn_steps=steps)


def task_source(spec: RunSpec, split: str) -> tuple[TaskSource, Callable[[int, int, int], Iterator[Any]]]:
    """(training source ``source(rng, count)``, ``eval_batches(tasks, batch, seed)``) for ``split``."""
    queries = spec.query_count
    if spec.dataset == "synthetic":
        # Disjoint class pools per split, like a real dataset's train/test characters.
        offset = {"train": 0, "val": 1, "test": 2}[split]
        source = SyntheticTasks(spec.ways, spec.shots, queries, seed=derive_seed(spec.seed, 100 + offset))

        def synthetic_batches(tasks: int, batch: int, seed: int) -> Iterator[Any]:
            from engine.meta.evaluate import batches_from_source

            return batches_from_source(source, np.random.default_rng(seed), tasks, batch)

        return source, synthetic_batches
    return _dataset_source(spec, split, queries)


def check_dataset(dataset: str, ways: int) -> None:
    """Refuse, before any training, a run (of any method) whose dataset files are missing or whose
    ``ways``-way tasks need more classes than one of the dataset's splits has
    (engine.data.registry.check_split_classes: split files only, no images)."""
    if dataset == "synthetic":
        return
    from engine.data.errors import DatasetError
    from engine.data.registry import check_split_classes

    try:
        check_split_classes(dataset, ways)
    except DatasetError as error:
        raise RunSpecError(str(error)) from error


def _dataset_source(
    spec: RunSpec, split: str, queries: int
) -> tuple[TaskSource, Callable[[int, int, int], Iterator[Any]]]:
    from engine.data.registry import load_dataset
    from engine.data.sampling import TaskSampler
    from engine.paths import download_allowed

    if spec.dataset == "omniglot":
        # H-Meta-NAS App. F / MAML++: MAML++'s character split, rotations by multiples of 90
        # degrees as augmentation of the training tasks (not as extra classes).
        dataset = load_dataset(
            "omniglot",
            split,
            protocol=OMNIGLOT_PROTOCOL,
            rotations_as_classes=False,
            download=download_allowed(),
        )
    else:
        # Natural images: no rotation augmentation; the dataset's own normalisation.
        dataset = load_dataset(spec.dataset, split, image_size=IMAGE_SHAPES[spec.dataset][1])
    sampler = TaskSampler(
        dataset,
        spec.ways,
        spec.shots,
        queries,
        spec.seed,
        augment_rotations=split == "train" and spec.dataset == "omniglot",
    )

    def source(rng: np.random.Generator, count: int) -> Any:
        return sampler.render(sampler.plan(count, rng))

    def batches(tasks: int, batch: int, seed: int) -> Iterator[Any]:
        return sampler.fixed_tasks(tasks, seed).batches(batch)

    return source, batches


OMNIGLOT_PROTOCOL = "mamlpp"


@dataclass(frozen=True)
class Run:
    spec: RunSpec
    config: MetaTrainConfig
    space: Any
    learner: MamlLearner

    @property
    def info(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict()}


def spec_on_device(spec: RunSpec, device: str) -> RunSpec:
    """``spec`` moved to ``device`` (a GPU-trained run evaluated or searched on a CPU, or the other
    way round) with that device's default strategy; the per-task reference ``loop`` stays.
    An unknown ``device`` is refused by RunSpec's own check."""
    if device == spec.device:
        return spec
    strategy = spec.strategy if spec.strategy == "loop" else default_strategy(device)
    return spec.with_(device=device, strategy=strategy)


def build_run(spec: RunSpec) -> Run:
    """The run ``spec`` describes, its learner on ``spec.device``.

    Raises RunSpecError when that device is "cuda" and this machine has no usable GPU.
    """
    if spec.device == "cuda":
        if not torch.cuda.is_available():
            raise RunSpecError("device 'cuda' asked for, but torch sees no CUDA GPU on this machine")
        # Full float32 convolutions and matmuls, not TF32: the meta-gradient then matches the
        # CPU's to float32 rounding (TF32 moved it by 16-20 % on the benchmark's random net), and
        # the few-shot nets are too small for TF32 to save time (docs/BENCHMARKS.md).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    config = train_config(spec)
    space = build_space(spec)
    model = build_model(spec, space)
    learner = MamlLearner(model, config.maml).to(spec.device)
    return Run(spec=spec, config=config, space=space, learner=learner)
