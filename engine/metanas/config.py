"""MetaNAS hyper-parameters as one frozen value object with named presets.

The ``paper`` preset is Appendix A.2 of Elsken et al., "Meta-Learning of Neural
Architectures for Few-Shot Learning" (CVPR 2020) for Omniglot, Section 5.1. Values
the extracted paper text leaves blank (task learning rates, architecture weight
decay, temperature range, pruning threshold) are taken from the authors' released
Omniglot setting and are listed in docs/METANAS.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: The candidate operations of the paper's few-shot search space (Section 5.1).
#: There is no "none"/zero operation: the paper's list does not contain one.
OPERATIONS: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "conv_1x5_5x1",
    "conv_3x3",
    "sep_conv_3x3",
    "dil_conv_3x3",
)


class MetaNasConfigError(ValueError):
    """A MetaNAS configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class MetaNasConfig:
    """Everything that defines a MetaNAS run (search space, task learner, meta learner)."""

    name: str = "paper"

    # Task / data shape (the task source must produce tasks of this shape).
    n_way: int = 20
    in_channels: int = 1
    image_size: int = 28
    #: Examples per class in the support set of meta-training tasks (A.2 "shots during meta training").
    meta_train_shots: int = 15

    # Search space (Section 5.1).
    channels: int = 28
    num_cells: int = 4
    reduction_cells: tuple[int, ...] = (1, 3)
    nodes_per_cell: int = 3
    #: k of eq. 7: every intermediate node is soft-assigned to combinations of this many inputs.
    inputs_per_node: int = 2
    stem_multiplier: int = 3
    operations: tuple[str, ...] = OPERATIONS
    #: Std of the Gaussian initialisation of all architecture parameters (DARTS: 1e-3).
    alpha_init_std: float = 1e-3

    # Meta learner: REPTILE on weights and architecture (eqs. 4 and 9).
    meta_epochs: int = 30_000
    #: Meta-epochs at the start during which the architecture is not adapted (A.2: 15,000).
    warmup_epochs: int = 15_000
    meta_batch_size: int = 10
    meta_lr_weights: float = 1.0
    meta_lr_arch: float = 0.6

    # Task learner: first-order DARTS with Adam on the same support data for both (eq. 3).
    task_batch_size: int = 20
    task_train_steps: int = 5
    #: Meta-testing: first this many steps adapt weights and architecture ...
    test_arch_steps: int = 50
    #: ... then this many steps adapt the weights only (A.2: "50+50").
    test_weight_steps: int = 50
    weight_lr: float = 5e-3
    arch_lr: float = 5e-3
    weight_decay_weights: float = 0.0
    weight_decay_arch: float = 1e-3
    adam_betas: tuple[float, float] = (0.0, 0.999)

    # Soft-pruning (Section 4, eqs. 5-7): linear temperature annealing over the architecture steps.
    temperature_max: float = 1.0
    temperature_min: float = 0.05
    #: Operations and input combinations whose weight is not above this are pruned (Section 4: 0.01).
    prune_threshold: float = 0.01

    # Book-keeping.
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive_ints = (
            "n_way",
            "in_channels",
            "image_size",
            "meta_train_shots",
            "channels",
            "num_cells",
            "nodes_per_cell",
            "inputs_per_node",
            "stem_multiplier",
            "meta_epochs",
            "meta_batch_size",
            "task_batch_size",
            "task_train_steps",
            "test_arch_steps",
            "checkpoint_every",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MetaNasConfigError(f"MetaNasConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_epochs", "test_weight_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MetaNasConfigError(
                    f"MetaNasConfig.{name} must be a non-negative integer, got {value!r}"
                )
        if self.n_way < 2:
            raise MetaNasConfigError(f"MetaNasConfig.n_way must be at least 2, got {self.n_way}")
        if self.warmup_epochs > self.meta_epochs:
            raise MetaNasConfigError(
                f"MetaNasConfig.warmup_epochs ({self.warmup_epochs}) exceeds meta_epochs ({self.meta_epochs})"
            )
        if self.channels % 2:
            raise MetaNasConfigError(
                f"MetaNasConfig.channels must be even (factorized reduction halves it), got {self.channels}"
            )
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations or len(set(self.operations)) != len(self.operations):
            raise MetaNasConfigError(
                f"MetaNasConfig.operations must be distinct names from {OPERATIONS}, got {self.operations!r}"
            )
        if any(not 0 <= cell < self.num_cells for cell in self.reduction_cells) or len(
            set(self.reduction_cells)
        ) != len(self.reduction_cells):
            raise MetaNasConfigError(
                f"MetaNasConfig.reduction_cells must be distinct indices below num_cells={self.num_cells}, "
                f"got {self.reduction_cells!r}"
            )
        smallest = self.image_size
        for _ in self.reduction_cells:
            smallest = (smallest + 1) // 2
        if smallest < 1 or self.image_size < 2 ** len(self.reduction_cells):
            raise MetaNasConfigError(
                f"MetaNasConfig.image_size={self.image_size} is too small for {len(self.reduction_cells)} reductions"
            )
        if not 1 <= self.inputs_per_node <= 2:
            # The first node has exactly two candidate inputs (the cell inputs).
            raise MetaNasConfigError(
                f"MetaNasConfig.inputs_per_node must be 1 or 2 (the first node has two inputs), "
                f"got {self.inputs_per_node}"
            )
        for name in ("meta_lr_weights", "meta_lr_arch"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise MetaNasConfigError(f"MetaNasConfig.{name} must lie in [0, 1], got {value}")
        for name in ("weight_lr", "arch_lr", "temperature_max", "temperature_min"):
            if not getattr(self, name) > 0.0:
                raise MetaNasConfigError(f"MetaNasConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay_weights", "weight_decay_arch", "alpha_init_std"):
            if getattr(self, name) < 0.0:
                raise MetaNasConfigError(
                    f"MetaNasConfig.{name} must be non-negative, got {getattr(self, name)}"
                )
        if self.temperature_min > self.temperature_max:
            raise MetaNasConfigError(
                f"MetaNasConfig.temperature_min ({self.temperature_min}) exceeds "
                f"temperature_max ({self.temperature_max})"
            )
        beta1, beta2 = self.adam_betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise MetaNasConfigError(f"MetaNasConfig.adam_betas must lie in [0, 1), got {self.adam_betas}")
        # The arg-max of a softmax is at least 1/n, so a threshold below that always keeps one choice.
        max_choices = max(len(self.operations), max_combinations(self.nodes_per_cell, self.inputs_per_node))
        if not 0.0 <= self.prune_threshold < 1.0 / max_choices:
            raise MetaNasConfigError(
                f"MetaNasConfig.prune_threshold must lie in [0, 1/{max_choices}) so every node keeps an input "
                f"and every edge an operation, got {self.prune_threshold}"
            )

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> MetaNasConfig:
        """A copy with ``changes`` applied (validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise MetaNasConfigError(f"MetaNasConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def search_space_key(self) -> dict[str, Any]:
        """The fields that fix the shapes of the one-shot model's parameters."""
        return {
            "n_way": self.n_way,
            "in_channels": self.in_channels,
            "channels": self.channels,
            "num_cells": self.num_cells,
            "reduction_cells": list(self.reduction_cells),
            "nodes_per_cell": self.nodes_per_cell,
            "inputs_per_node": self.inputs_per_node,
            "stem_multiplier": self.stem_multiplier,
            "operations": list(self.operations),
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reduction_cells"] = list(self.reduction_cells)
        data["operations"] = list(self.operations)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaNasConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetaNasConfigError(f"MetaNasConfig has no field(s) {unknown}")
        values = dict(data)
        for name in ("reduction_cells", "operations", "adam_betas"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MetaNasConfig:
        """One of :data:`PRESET_NAMES`, optionally with fields overridden."""
        try:
            base = _PRESETS[name]
        except KeyError:
            raise MetaNasConfigError(
                f"unknown MetaNAS preset {name!r}; choose one of {PRESET_NAMES}"
            ) from None
        return base.replace(**overrides) if overrides else base


def max_combinations(nodes_per_cell: int, inputs_per_node: int) -> int:
    """Number of input combinations of the last (widest) node: C(2 + nodes - 1, k)."""
    from math import comb

    return comb(2 + nodes_per_cell - 1, inputs_per_node)


_PRESETS: dict[str, MetaNasConfig] = {
    # Appendix A.2, Omniglot (Section 5.1): 4 cells, 28 channels, 30k meta-epochs with 15k warm-up.
    "paper": MetaNasConfig(),
    # Appendix A.2, MiniImagenet: same schedule, task learning rates of the authors' MiniImagenet setting.
    "paper_miniimagenet": MetaNasConfig(
        name="paper_miniimagenet",
        n_way=5,
        in_channels=3,
        image_size=84,
        weight_lr=1e-3,
        arch_lr=1e-3,
    ),
    # Tens of minutes on a small CPU: same search-space shape, 8 channels, 150 meta-epochs (50 warm-up).
    "cpu": MetaNasConfig(
        name="cpu",
        n_way=5,
        meta_train_shots=5,
        channels=8,
        meta_epochs=150,
        warmup_epochs=50,
        meta_batch_size=3,
        task_batch_size=10,
        test_arch_steps=20,
        test_weight_steps=10,
        arch_lr=2e-2,
        temperature_min=0.02,
        checkpoint_every=25,
    ),
    # Seconds: for tests and the Celery smoke job. Larger architecture steps so alphas separate quickly.
    "tiny": MetaNasConfig(
        name="tiny",
        n_way=3,
        image_size=12,
        meta_train_shots=3,
        channels=4,
        meta_epochs=4,
        warmup_epochs=2,
        meta_batch_size=2,
        task_batch_size=9,
        task_train_steps=3,
        test_arch_steps=12,
        test_weight_steps=4,
        weight_lr=1e-2,
        arch_lr=5e-2,
        temperature_min=0.01,
        checkpoint_every=2,
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
