"""The MetaNAS one-shot model: DARTS cells with soft-pruned mixtures (Section 4).

Architecture parameters per cell type (normal / reduction) and intermediate node j:

* ``alpha`` of shape ``[inputs_j, n_ops]``: the operation mixture of every edge i -> j,
  normalised with a temperature (eq. 5): ``w_ij = softmax(alpha_ij / T)``;
* ``beta`` of shape ``[C(inputs_j, k)]``: weights over all k-combinations of the
  node's inputs (eq. 7): ``p_j = softmax(beta_j / T)``, and
  ``x_j = sum_{c in C(inputs_j, k)} p_jc * sum_{i in c} mixed_op_ij(x_i)``.

Because the combination sum is linear, ``x_j = sum_i (sum_{c contains i} p_jc) mixed_op_ij(x_i)``:
every edge output is computed once and scaled by its summed combination weight.

``forward(..., prune_threshold=t)`` drops operations and combinations whose weight is
not above ``t`` without renormalising, which is exactly the function computed by the
pruned, exported network (``discrete.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.metanas.config import MetaNasConfig
from engine.metanas.ops import Stem, make_operation, make_preprocess
from engine.seeding import Rngs

CELL_TYPES: tuple[str, str] = ("normal", "reduce")


def input_combinations(num_inputs: int, k: int) -> list[tuple[int, ...]]:
    """The k-combinations of a node's inputs, in the fixed order used for ``beta``."""
    return list(itertools.combinations(range(num_inputs), k))


def temperature_at(step: int, arch_steps: int, t_max: float, t_min: float) -> float:
    """Linear annealing from ``t_max`` (step 0) to ``t_min`` (step ``arch_steps - 1`` and later)."""
    if arch_steps <= 1 or step >= arch_steps - 1:
        return t_min if arch_steps >= 1 else t_max
    return t_max - step * (t_max - t_min) / (arch_steps - 1)


@dataclass(frozen=True)
class MixtureWeights:
    """Normalised architecture weights of one cell type at one temperature.

    ``ops[j]`` has shape ``[inputs_j, n_ops]`` (eq. 5), ``combos[j]`` shape ``[C(inputs_j, k)]`` (eq. 7).
    """

    ops: tuple[torch.Tensor, ...]
    combos: tuple[torch.Tensor, ...]


class SearchCell(nn.Module):
    def __init__(self, config: MetaNasConfig, c_pp: int, c_p: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        channels = config.channels
        self.reduction = reduction
        self.preprocess0 = make_preprocess(c_pp, channels, reduce=reduction_prev)
        self.preprocess1 = make_preprocess(c_p, channels, reduce=False)
        self.edges = nn.ModuleList()
        self.combinations: list[list[tuple[int, ...]]] = []
        for node in range(config.nodes_per_cell):
            num_inputs = 2 + node
            node_edges = nn.ModuleList()
            for source in range(num_inputs):
                stride = 2 if reduction and source < 2 else 1
                node_edges.append(
                    nn.ModuleList(make_operation(name, channels, stride) for name in config.operations)
                )
            self.edges.append(node_edges)
            self.combinations.append(input_combinations(num_inputs, config.inputs_per_node))

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: MixtureWeights, prune_threshold: float
    ) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node, node_edges in enumerate(self.edges):
            op_weights = weights.ops[node]
            combo_weights = weights.combos[node]
            edge_scale = self.edge_scales(node, combo_weights, prune_threshold)
            total: torch.Tensor | None = None
            for source, ops in enumerate(node_edges):
                if edge_scale[source] is None:
                    continue
                mixed: torch.Tensor | None = None
                for op_index, op in enumerate(ops):
                    w = op_weights[source, op_index]
                    if prune_threshold > 0.0 and not bool(w > prune_threshold):
                        continue
                    term = w * op(states[source])
                    mixed = term if mixed is None else mixed + term
                assert mixed is not None, "a softmax always keeps its arg-max above a valid threshold"
                term = edge_scale[source] * mixed
                total = term if total is None else total + term
            assert total is not None
            states.append(total)
        return torch.cat(states[2:], dim=1)

    def edge_scales(
        self, node: int, combo_weights: torch.Tensor, prune_threshold: float
    ) -> list[torch.Tensor | None]:
        """Per input edge: the sum of the kept combination weights containing it (None: edge pruned)."""
        scales: list[torch.Tensor | None] = [None] * (2 + node)
        for combo_index, combo in enumerate(self.combinations[node]):
            p = combo_weights[combo_index]
            if prune_threshold > 0.0 and not bool(p > prune_threshold):
                continue
            for source in combo:
                scales[source] = p if scales[source] is None else scales[source] + p
        return scales


class MetaNasSearchNet(nn.Module):
    """Stem, ``num_cells`` DARTS cells with constant channel count, global pooling and a linear classifier."""

    def __init__(self, config: MetaNasConfig, *, rngs: Rngs) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        c_stem = config.stem_multiplier * c
        self.stem = Stem(config.in_channels, c_stem)
        self.cells = nn.ModuleList()
        c_pp, c_p = c_stem, c_stem
        reduction_prev = False
        for index in range(config.num_cells):
            reduction = index in config.reduction_cells
            self.cells.append(SearchCell(config, c_pp, c_p, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, config.nodes_per_cell * c
        self.classifier = nn.Linear(c_p, config.n_way)

        n_ops = len(config.operations)
        self.alpha = nn.ParameterDict()
        self.beta = nn.ParameterDict()
        generator = rngs.torch
        for cell_type in CELL_TYPES:
            for node in range(config.nodes_per_cell):
                num_inputs = 2 + node
                num_combos = len(input_combinations(num_inputs, config.inputs_per_node))
                alpha = torch.randn(num_inputs, n_ops, generator=generator) * config.alpha_init_std
                beta = torch.randn(num_combos, generator=generator) * config.alpha_init_std
                self.alpha[f"{cell_type}_{node}"] = nn.Parameter(alpha)
                self.beta[f"{cell_type}_{node}"] = nn.Parameter(beta)
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator) -> None:
        # Re-draw every weight from the run's generator (PyTorch's default init uses the global RNG).
        for name, param in self.named_weight_parameters():
            with torch.no_grad():
                if param.dim() > 1:
                    fan_in = param[0].numel()
                    bound = 1.0 / fan_in**0.5  # PyTorch's default kaiming_uniform(a=sqrt(5)) bound
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
                elif name.endswith("bn.weight"):
                    param.fill_(1.0)
                elif name.endswith("bn.bias"):
                    param.zero_()
                else:  # linear bias
                    fan_in = self.classifier.in_features
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) / fan_in**0.5)

    # ------------------------------------------------------------------ parameter groups
    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if not (name.startswith("alpha.") or name.startswith("beta.")):
                yield name, param

    def named_arch_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if name.startswith("alpha.") or name.startswith("beta."):
                yield name, param

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weight_parameters()]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_arch_parameters()]

    # ------------------------------------------------------------------ soft-pruning
    def mixture_weights(self, cell_type: str, temperature: float) -> MixtureWeights:
        """Eqs. 5 and 7: temperature softmax over operations and over input combinations."""
        if cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {cell_type!r}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        nodes = range(self.config.nodes_per_cell)
        ops = tuple(F.softmax(self.alpha[f"{cell_type}_{j}"] / temperature, dim=-1) for j in nodes)
        combos = tuple(F.softmax(self.beta[f"{cell_type}_{j}"] / temperature, dim=-1) for j in nodes)
        return MixtureWeights(ops=ops, combos=combos)

    def forward(self, x: torch.Tensor, temperature: float, prune_threshold: float = 0.0) -> torch.Tensor:
        """Logits of the one-shot model at ``temperature``; ``prune_threshold > 0`` evaluates the pruned model."""
        normal = self.mixture_weights("normal", temperature)
        reduce = self.mixture_weights("reduce", temperature)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, reduce if cell.reduction else normal, prune_threshold)
        pooled = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        return self.classifier(pooled)
