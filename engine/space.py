"""The H-Meta-NAS search spaces (VGG9- and ResNet12-based) and architectures as data.

Paper: Sections 3-4 and Appendix C (Tables 7 and 8) of h-meta-nas.txt.

* An ``Arch`` is a frozen, hashable, JSON-round-trippable value: one ``LayerChoice``
  (kernel, width multiplier, activation) per elastic layer of the backbone plus a
  ``depth`` (Adaptive Number of Layers: layers for vgg9, residual blocks for resnet12).
* A ``SearchSpace`` knows which choices are legal, validates archs with errors that name
  the layer and the bad choice, samples, counts its size and turns an arch into
  ``LayerSpec``s: the unit of the exact cost model and of per-layer latency profiling.

Conventions chosen here (the paper leaves them open; see docs/SEARCH_SPACE.md):

* Every conv is ``Conv2d(k, stride, padding=k//2, bias=False) -> BatchNorm2d -> activation``.
  The conv bias is dropped because a BatchNorm follows it (it would be a redundant
  parameter). With odd kernels the output size does not depend on the kernel.
* ResNet12 block: ``act2(bn2(conv2(act1(bn1(conv1(act0(bn0(conv0(x)))))))) + shortcut(x))``;
  the block's third activation is applied after the residual add, as in ResNet. The
  shortcut is always a 1x1 conv (stride 2) + BN because every block halves the size.
  Its ``LayerSpec`` for the third conv still includes the activation (same params/MACs).
* Head: adaptive average pool to ``pool_size`` x ``pool_size`` -> flatten -> Linear. It
  follows the last *used* layer (ANL); one head weight is shared by every exit depth.
* Global Expansion off (``global_expansion=False``) fixes width 1.0 on the "edge" layers:
  vgg9: the first and the last layer; resnet12: the first layer and the last layer of
  every block (the block outputs, which the residual sum ties to the shortcut), the
  "edge of each searchable block" in the paper's Figure 3.
* ``size()`` is the paper's formula (options per layer multiplied over all layers, times
  the number of depths); ``distinct_size()`` counts distinct networks (layers beyond the
  depth do not exist, so their choices do not make a different network).

Deviation from the engine contract: none in names/signatures. Additions: ``Arch.with_layer``,
``Arch.with_depth``, ``SearchSpace.allowed_widths``, ``layer_name``, ``in_size``,
``n_layers``, ``depths``, ``used_layers``, ``options_per_layer``, ``max_channels``,
``head_max_channels``, ``exit_layers``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from engine.ops import BN_EPS, BN_MOMENTUM, FixedAvgPool2d, make_activation

ACTIVATIONS: tuple[str, ...] = ("relu", "elu", "selu", "sigmoid", "relu6", "leakyrelu")
KERNELS: tuple[int, ...] = (1, 3, 5)
VGG9_WIDTHS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.25)
RESNET12_WIDTHS: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 1.75, 2.0)
BACKBONES: tuple[str, ...] = ("vgg9", "resnet12")

# How many elastic layers one unit of ``depth`` stands for (a layer, or a 3-conv block).
LAYERS_PER_DEPTH: dict[str, int] = {"vgg9": 1, "resnet12": 3}
LAYER_OPS: tuple[str, ...] = ("conv", "shortcut", "head")


class ArchError(ValueError):
    """An architecture (or its serialized form) is not valid in its search space."""


@dataclass(frozen=True)
class LayerChoice:
    """What the search picks for one elastic layer."""

    kernel: int
    width: float
    activation: str

    def __post_init__(self) -> None:
        # Normalise the width to float so 1 and 1.0 serialize identically.
        if isinstance(self.width, bool) or not isinstance(self.width, int | float):
            raise ArchError(f"width must be a number, got {self.width!r}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int):
            raise ArchError(f"kernel must be an int, got {self.kernel!r}")
        if not isinstance(self.activation, str):
            raise ArchError(f"activation must be a string, got {self.activation!r}")
        object.__setattr__(self, "width", float(self.width))

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "width": self.width, "activation": self.activation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerChoice:
        if not isinstance(data, dict):
            raise ArchError(f"a layer must be an object with kernel/width/activation, got {data!r}")
        missing = {"kernel", "width", "activation"} - set(data)
        extra = set(data) - {"kernel", "width", "activation"}
        if missing or extra:
            raise ArchError(
                f"layer keys must be kernel/width/activation (missing {sorted(missing)}, unknown {sorted(extra)})"
            )
        return cls(kernel=data["kernel"], width=data["width"], activation=data["activation"])


# Unused layers (beyond ``depth``) are reset to this by ``Arch.canonical``.
DEFAULT_CHOICE = LayerChoice(kernel=3, width=1.0, activation="relu")


@dataclass(frozen=True)
class Arch:
    """One sub-network: a choice per elastic layer and the number of layers/blocks used."""

    backbone: str
    layers: tuple[LayerChoice, ...]
    depth: int

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.backbone not in LAYERS_PER_DEPTH:
            raise ArchError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int):
            raise ArchError(f"depth must be an int, got {self.depth!r}")
        for index, choice in enumerate(self.layers):
            if not isinstance(choice, LayerChoice):
                raise ArchError(f"layer {index}: expected a LayerChoice, got {choice!r}")

    @property
    def n_used_layers(self) -> int:
        """How many elastic layers the network actually runs (depth x layers per depth unit)."""
        return self.depth * LAYERS_PER_DEPTH[self.backbone]

    def canonical(self) -> Arch:
        """Same network, unused layers reset to ``DEFAULT_CHOICE`` (use as a cache key)."""
        used = self.n_used_layers
        layers = self.layers[:used] + (DEFAULT_CHOICE,) * max(0, len(self.layers) - used)
        return replace(self, layers=layers)

    def with_layer(self, index: int, **changes: Any) -> Arch:
        """A copy with layer ``index``'s kernel/width/activation changed (not validated)."""
        if not 0 <= index < len(self.layers):
            raise ArchError(f"layer {index} does not exist (arch has {len(self.layers)} layers)")
        layers = list(self.layers)
        layers[index] = replace(layers[index], **changes)
        return replace(self, layers=tuple(layers))

    def with_depth(self, depth: int) -> Arch:
        return replace(self, depth=depth)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "depth": self.depth,
            "layers": [choice.to_dict() for choice in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        if not isinstance(data, dict):
            raise ArchError(f"an arch must be an object, got {type(data).__name__}")
        missing = {"backbone", "depth", "layers"} - set(data)
        if missing:
            raise ArchError(f"arch is missing keys {sorted(missing)}")
        if not isinstance(data["layers"], list | tuple):
            raise ArchError(f"arch 'layers' must be a list, got {type(data['layers']).__name__}")
        layers = []
        for index, layer in enumerate(data["layers"]):
            try:
                layers.append(LayerChoice.from_dict(layer))
            except ArchError as error:
                raise ArchError(f"layer {index}: {error}") from None
        return cls(backbone=data["backbone"], layers=tuple(layers), depth=data["depth"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ArchError(f"arch JSON is malformed: {error}") from None
        return cls.from_dict(data)


def conv_out_size(in_size: int, kernel: int, stride: int) -> int:
    """Spatial output size of a conv with ``padding = kernel // 2``."""
    return (in_size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a concrete sub-net with all shapes fixed: the profiling and cost unit.

    ``op``: "conv" (Conv2d(bias=False)+BN+activation), "shortcut" (1x1 conv+BN of a
    residual block) or "head" (average pool to pool_size x pool_size, flatten, Linear).
    For the head ``out_channels == num_classes``, ``kernel == stride == 0``.
    """

    op: str
    in_size: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    activation: str = ""
    pool_size: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.op not in LAYER_OPS:
            raise ValueError(f"LayerSpec op must be one of {LAYER_OPS}, got {self.op!r}")
        if self.in_size < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"LayerSpec sizes must be positive: {self}")
        if self.op == "conv":
            if self.activation not in ACTIVATIONS:
                raise ValueError(
                    f"conv LayerSpec needs an activation from {ACTIVATIONS}, got {self.activation!r}"
                )
            if self.kernel < 1 or self.kernel % 2 == 0 or self.stride < 1:
                raise ValueError(f"conv LayerSpec needs an odd kernel and stride >= 1: {self}")
        elif self.op == "shortcut":
            if self.kernel != 1 or self.stride < 1 or self.activation:
                raise ValueError(f"shortcut LayerSpec is a 1x1 conv without activation: {self}")
        else:
            if self.pool_size < 1 or self.num_classes != self.out_channels or self.kernel or self.stride:
                raise ValueError(
                    f"head LayerSpec needs pool_size >= 1, out_channels == num_classes, kernel = stride = 0: {self}"
                )
        if self.op != "head" and (self.pool_size or self.num_classes):
            raise ValueError(f"pool_size/num_classes are for the head only: {self}")

    @property
    def key(self) -> str:
        """Stable string key (latency lookup tables are keyed by it)."""
        if self.op == "head":
            return f"head|{self.in_size}|{self.in_channels}|{self.num_classes}|pool{self.pool_size}"
        return f"{self.op}|{self.in_size}|{self.in_channels}|{self.out_channels}|{self.kernel}|{self.stride}|{self.activation}"

    @property
    def out_size(self) -> int:
        if self.op == "head":
            return 1
        return conv_out_size(self.in_size, self.kernel, self.stride)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.in_size, self.in_size)

    def params(self) -> int:
        """Trainable parameters: conv weights (no bias) + BN gamma/beta; Linear weight + bias."""
        if self.op == "head":
            return self.in_channels * self.pool_size**2 * self.num_classes + self.num_classes
        return self.in_channels * self.out_channels * self.kernel**2 + 2 * self.out_channels

    def macs(self) -> int:
        """Multiply-accumulates of conv/linear only (BN, activation, pooling, add: 0).

        conv = out_h * out_w * out_c * in_c * k * k; linear = in_features * out_features.
        """
        if self.op == "head":
            return self.in_channels * self.pool_size**2 * self.num_classes
        return self.out_size**2 * self.out_channels * self.in_channels * self.kernel**2

    def build_module(self) -> nn.Module:
        """A plain eval-mode module computing exactly this layer (randomly initialised)."""
        if self.op == "head":
            module: nn.Module = nn.Sequential(
                FixedAvgPool2d(self.in_size, self.pool_size),
                nn.Flatten(),
                nn.Linear(self.in_channels * self.pool_size**2, self.num_classes),
            )
        else:
            parts: list[nn.Module] = [
                nn.Conv2d(
                    self.in_channels,
                    self.out_channels,
                    self.kernel,
                    stride=self.stride,
                    padding=self.kernel // 2,
                    bias=False,
                ),
                nn.BatchNorm2d(self.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            ]
            if self.op == "conv":
                parts.append(make_activation(self.activation))
            module = nn.Sequential(*parts)
        return module.eval()

    def example_input(self, batch: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """A deterministic random input of the right shape (seed 0 unless a generator is given)."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.in_shape), generator=generator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "in_size": self.in_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": self.kernel,
            "stride": self.stride,
            "activation": self.activation,
            "pool_size": self.pool_size,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"bad LayerSpec dict {data!r}: {error}") from None


def _check_options(name: str, options: tuple[Any, ...]) -> None:
    if not options:
        raise ValueError(f"search space {name} must not be empty")
    if len(set(options)) != len(options):
        raise ValueError(f"search space {name} has duplicates: {options}")


@dataclass(frozen=True)
class SearchSpace:
    """A backbone plus the per-layer choices; everything derived is computed, not stored."""

    backbone: str
    in_channels: int
    image_size: int
    num_classes: int
    pool_size: int = 5
    global_expansion: bool = True
    adaptive_layers: bool = True
    kernels: tuple[int, ...] = KERNELS
    widths: tuple[float, ...] = VGG9_WIDTHS
    activations: tuple[str, ...] = ACTIVATIONS
    base_channels: tuple[int, ...] = (64,) * 4
    strides: tuple[int, ...] = (2,) * 4
    # Cached derived tables, not part of equality/serialization.
    _in_sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("kernels", "widths", "activations", "base_channels", "strides"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))
        if self.backbone not in LAYERS_PER_DEPTH:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        for name in ("in_channels", "image_size", "num_classes", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"search space {name} must be >= 1, got {getattr(self, name)}")
        for name in ("kernels", "widths", "activations"):
            _check_options(name, getattr(self, name))
        bad_kernels = [k for k in self.kernels if k < 1 or k % 2 == 0]
        if bad_kernels:
            raise ValueError(f"kernels must be odd and positive, got {bad_kernels}")
        unknown = [a for a in self.activations if a not in ACTIVATIONS]
        if unknown:
            raise ValueError(f"unknown activations {unknown}; expected a subset of {ACTIVATIONS}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if not self.global_expansion and 1.0 not in self.widths:
            raise ValueError(
                "global_expansion=False fixes edge layers at width 1.0, so widths must contain 1.0"
            )
        if len(self.base_channels) != len(self.strides):
            raise ValueError("base_channels and strides need one entry per layer")
        if len(self.base_channels) % LAYERS_PER_DEPTH[self.backbone]:
            raise ValueError(f"{self.backbone} needs a multiple of {LAYERS_PER_DEPTH[self.backbone]} layers")
        empty = [
            (index, width)
            for index, base in enumerate(self.base_channels)
            for width in self.allowed_widths(index)
            if round(base * width) < 1
        ]
        if empty:
            index, width = empty[0]
            raise ValueError(
                f"width {width} of layer {index} ({self.base_channels[index]} base channels) leaves no channel"
            )
        sizes = [self.image_size]
        for stride in self.strides:
            sizes.append(conv_out_size(sizes[-1], 1, stride))  # odd kernels: size independent of k
        object.__setattr__(self, "_in_sizes", tuple(sizes))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def vgg9(
        cls,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 20,
        pool_size: int = 5,
        global_expansion: bool = True,
        adaptive_layers: bool = True,
    ) -> SearchSpace:
        """Appendix C Table 7: 4 conv layers, 64 base channels, stride 2 each, then the head."""
        return cls(
            backbone="vgg9",
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            pool_size=pool_size,
            global_expansion=global_expansion,
            adaptive_layers=adaptive_layers,
            kernels=KERNELS,
            widths=VGG9_WIDTHS,
            activations=ACTIVATIONS,
            base_channels=(64,) * 4,
            strides=(2,) * 4,
        )

    @classmethod
    def resnet12(
        cls,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 20,
        pool_size: int = 5,
        global_expansion: bool = True,
        adaptive_layers: bool = True,
    ) -> SearchSpace:
        """Appendix C Table 8: 4 residual blocks x 3 convs (32/64/128/256), stride 2 first in each."""
        return cls(
            backbone="resnet12",
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            pool_size=pool_size,
            global_expansion=global_expansion,
            adaptive_layers=adaptive_layers,
            kernels=KERNELS,
            widths=RESNET12_WIDTHS,
            activations=ACTIVATIONS,
            base_channels=(32,) * 3 + (64,) * 3 + (128,) * 3 + (256,) * 3,
            strides=(2, 1, 1) * 4,
        )

    # ----------------------------------------------------------------- structure
    @property
    def n_layers(self) -> int:
        return len(self.base_channels)

    @property
    def layers_per_depth(self) -> int:
        return LAYERS_PER_DEPTH[self.backbone]

    @property
    def max_depth(self) -> int:
        return self.n_layers // self.layers_per_depth

    @property
    def depths(self) -> tuple[int, ...]:
        """Legal ``Arch.depth`` values (ANL on: 1..max; off: max only)."""
        if self.adaptive_layers:
            return tuple(range(1, self.max_depth + 1))
        return (self.max_depth,)

    def layer_name(self, index: int) -> str:
        if self.backbone == "resnet12":
            return f"block{index // 3}_layer{index % 3}"
        return f"layer{index}"

    def edge_layers(self) -> frozenset[int]:
        """Layers whose width Global Expansion frees (fixed at 1.0 when it is off)."""
        if self.backbone == "resnet12":
            return frozenset({0} | {i for i in range(self.n_layers) if i % 3 == 2})
        return frozenset({0, self.n_layers - 1})

    def allowed_widths(self, index: int) -> tuple[float, ...]:
        if not self.global_expansion and index in self.edge_layers():
            return (1.0,)
        return self.widths

    def max_channels(self, index: int) -> int:
        return int(round(self.base_channels[index] * max(self.allowed_widths(index))))

    def channel_options(self, index: int) -> tuple[int, ...]:
        return tuple(sorted({int(round(self.base_channels[index] * w)) for w in self.allowed_widths(index)}))

    def in_size(self, index: int) -> int:
        """Input height/width of layer ``index`` (``index == n_layers``: after the last layer)."""
        return self._in_sizes[index]

    def exit_layers(self) -> tuple[int, ...]:
        """Layers that can feed the head, one per legal depth."""
        return tuple(d * self.layers_per_depth - 1 for d in self.depths)

    def head_max_channels(self) -> int:
        return max(self.max_channels(i) for i in self.exit_layers())

    def used_layers(self, arch: Arch) -> range:
        return range(arch.n_used_layers)

    def channels(self, arch: Arch, index: int) -> int:
        return int(round(self.base_channels[index] * arch.layers[index].width))

    def block_in_channels(self, arch: Arch, index: int) -> int:
        """Input channels of layer ``index`` (the previous layer's width, or the image channels)."""
        return self.in_channels if index == 0 else self.channels(arch, index - 1)

    # ----------------------------------------------------------------- validation
    def validate(self, arch: Arch) -> None:
        """Raise ``ArchError`` naming the layer and the bad choice if ``arch`` is not in this space."""
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if arch.backbone != self.backbone:
            raise ArchError(
                f"arch backbone {arch.backbone!r} does not match search space backbone {self.backbone!r}"
            )
        if len(arch.layers) != self.n_layers:
            raise ArchError(f"{self.backbone} arch needs {self.n_layers} layers, got {len(arch.layers)}")
        if arch.depth not in self.depths:
            raise ArchError(f"depth {arch.depth} is not one of {self.depths}")
        used = arch.n_used_layers
        for index, choice in enumerate(arch.layers):
            if index >= used and choice == DEFAULT_CHOICE:
                continue  # canonical placeholder of an unused layer
            name = f"layer {index} ({self.layer_name(index)})"
            if choice.kernel not in self.kernels:
                raise ArchError(f"{name}: kernel {choice.kernel} is not one of {self.kernels}")
            widths = self.allowed_widths(index)
            if choice.width not in widths:
                reason = " (Global Expansion is off: edge layers are fixed)" if len(widths) == 1 else ""
                raise ArchError(f"{name}: width {choice.width} is not one of {widths}{reason}")
            if choice.activation not in self.activations:
                raise ArchError(f"{name}: activation {choice.activation!r} is not one of {self.activations}")

    # ----------------------------------------------------------------- archs
    def _uniform(self, kernel_index: int, width: str, activation_index: int) -> Arch:
        layers = []
        for index in range(self.n_layers):
            widths = self.allowed_widths(index)
            layers.append(
                LayerChoice(
                    kernel=self.kernels[kernel_index],
                    width=max(widths) if width == "max" else min(widths),
                    activation=self.activations[activation_index],
                )
            )
        return Arch(backbone=self.backbone, layers=tuple(layers), depth=0)

    def largest(self) -> Arch:
        """All layers used, largest kernel and width (first activation)."""
        kernel_index = self.kernels.index(max(self.kernels))
        return self._uniform(kernel_index, "max", 0).with_depth(max(self.depths))

    def smallest(self) -> Arch:
        """Fewest layers, smallest kernel and width (first activation); canonical."""
        kernel_index = self.kernels.index(min(self.kernels))
        return self._uniform(kernel_index, "min", 0).with_depth(min(self.depths)).canonical()

    def sample(self, rng: Any) -> Arch:
        """Uniform over every choice of every layer and over the depth (numpy Generator)."""
        layers = []
        for index in range(self.n_layers):
            widths = self.allowed_widths(index)
            layers.append(
                LayerChoice(
                    kernel=self.kernels[int(rng.integers(len(self.kernels)))],
                    width=widths[int(rng.integers(len(widths)))],
                    activation=self.activations[int(rng.integers(len(self.activations)))],
                )
            )
        depth = self.depths[int(rng.integers(len(self.depths)))]
        return Arch(backbone=self.backbone, layers=tuple(layers), depth=depth)

    def choices(self) -> list[tuple[int | str, str, tuple[Any, ...]]]:
        """The mutable architectural choices: (layer index or "depth", field, options).

        Choices with a single option (fixed edge widths, fixed depth) are left out.
        """
        result: list[tuple[int | str, str, tuple[Any, ...]]] = []
        for index in range(self.n_layers):
            for name, options in (
                ("kernel", self.kernels),
                ("width", self.allowed_widths(index)),
                ("activation", self.activations),
            ):
                if len(options) > 1:
                    result.append((index, name, options))
        if len(self.depths) > 1:
            result.append(("depth", "depth", self.depths))
        return result

    def options_per_layer(self, index: int) -> int:
        return len(self.kernels) * len(self.allowed_widths(index)) * len(self.activations)

    def size(self) -> int:
        """The paper's count: product of per-layer options over all layers x number of depths."""
        return math.prod(self.options_per_layer(i) for i in range(self.n_layers)) * len(self.depths)

    def distinct_size(self) -> int:
        """Distinct networks: for each depth only the used layers' choices matter."""
        total = 0
        for depth in self.depths:
            used = depth * self.layers_per_depth
            total += math.prod(self.options_per_layer(i) for i in range(used))
        return total

    # ----------------------------------------------------------------- layer specs
    def _conv_spec(
        self, index: int, in_channels: int, out_channels: int, kernel: int, activation: str
    ) -> LayerSpec:
        return LayerSpec(
            op="conv",
            in_size=self.in_size(index),
            in_channels=in_channels,
            out_channels=out_channels,
            kernel=kernel,
            stride=self.strides[index],
            activation=activation,
        )

    def _shortcut_spec(self, block: int, in_channels: int, out_channels: int) -> LayerSpec:
        first = block * 3
        return LayerSpec(
            op="shortcut",
            in_size=self.in_size(first),
            in_channels=in_channels,
            out_channels=out_channels,
            kernel=1,
            stride=math.prod(self.strides[first : first + 3]),
        )

    def _head_spec(self, exit_layer: int, in_channels: int) -> LayerSpec:
        return LayerSpec(
            op="head",
            in_size=self.in_size(exit_layer + 1),
            in_channels=in_channels,
            out_channels=self.num_classes,
            kernel=0,
            stride=0,
            pool_size=self.pool_size,
            num_classes=self.num_classes,
        )

    def layer_specs(self, arch: Arch) -> list[LayerSpec]:
        """The sub-net as LayerSpecs, in execution order (resnet12: 3 convs then the shortcut per block)."""
        self.validate(arch)
        specs: list[LayerSpec] = []
        used = arch.n_used_layers
        for index in range(used):
            choice = arch.layers[index]
            specs.append(
                self._conv_spec(
                    index,
                    self.block_in_channels(arch, index),
                    self.channels(arch, index),
                    choice.kernel,
                    choice.activation,
                )
            )
            if self.backbone == "resnet12" and index % 3 == 2:
                block = index // 3
                specs.append(
                    self._shortcut_spec(
                        block, self.block_in_channels(arch, index - 2), self.channels(arch, index)
                    )
                )
        specs.append(self._head_spec(used - 1, self.channels(arch, used - 1)))
        return specs

    def all_layer_specs(self) -> list[LayerSpec]:
        """Every distinct LayerSpec any arch of this space can produce (the latency LUT key set)."""
        found: dict[str, LayerSpec] = {}

        def in_options(index: int) -> tuple[int, ...]:
            return (self.in_channels,) if index == 0 else self.channel_options(index - 1)

        max_used = max(self.depths) * self.layers_per_depth
        for index in range(max_used):
            for in_channels in in_options(index):
                for out_channels in self.channel_options(index):
                    for kernel in self.kernels:
                        for activation in self.activations:
                            spec = self._conv_spec(index, in_channels, out_channels, kernel, activation)
                            found.setdefault(spec.key, spec)
            if self.backbone == "resnet12" and index % 3 == 2:
                for in_channels in in_options(index - 2):
                    for out_channels in self.channel_options(index):
                        spec = self._shortcut_spec(index // 3, in_channels, out_channels)
                        found.setdefault(spec.key, spec)
        for exit_layer in self.exit_layers():
            for channels in self.channel_options(exit_layer):
                spec = self._head_spec(exit_layer, channels)
                found.setdefault(spec.key, spec)
        return list(found.values())

    def describe(self) -> str:
        """One line telling spaces apart on a page: the fields that differ between the presets,
        datasets and N-ways a device may be profiled for (a table serves one space only)."""
        channel_text = "/".join(str(c) for c in sorted(set(self.base_channels)))
        parts = [
            self.backbone.upper(),
            f"{self.in_channels}×{self.image_size}×{self.image_size} input",
            f"{self.num_classes}-way",
            f"{channel_text} base channels",
            f"{self.pool_size}×{self.pool_size} pool",
        ]
        if not self.global_expansion:
            parts.append("no global expansion")
        if not self.adaptive_layers:
            parts.append("fixed depth")
        return ", ".join(parts)

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "pool_size": self.pool_size,
            "global_expansion": self.global_expansion,
            "adaptive_layers": self.adaptive_layers,
            "kernels": list(self.kernels),
            "widths": list(self.widths),
            "activations": list(self.activations),
            "base_channels": list(self.base_channels),
            "strides": list(self.strides),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        known = {
            "backbone",
            "in_channels",
            "image_size",
            "num_classes",
            "pool_size",
            "global_expansion",
            "adaptive_layers",
            "kernels",
            "widths",
            "activations",
            "base_channels",
            "strides",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown search space keys {sorted(unknown)}")
        values = dict(data)
        for name in ("kernels", "widths", "activations", "base_channels", "strides"):
            if name in values:
                values[name] = tuple(values[name])
        if "backbone" in values and values["backbone"] == "resnet12":
            values.setdefault("widths", RESNET12_WIDTHS)
            values.setdefault("base_channels", (32,) * 3 + (64,) * 3 + (128,) * 3 + (256,) * 3)
            values.setdefault("strides", (2, 1, 1) * 4)
        return cls(**values)
