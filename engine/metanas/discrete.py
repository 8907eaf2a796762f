"""The pruned task-specific network as a plain, TorchScript-able module.

Only the operations kept by the genotype are instantiated (their weights copied from
the adapted one-shot model); there are no architecture parameters, softmaxes or
temperatures left. The constant mixture factors of the kept operations are stored as
buffers, so the network computes exactly what the one-shot model computes at the
final temperature with everything below the threshold removed -- no retraining.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.metanas.genotype import Genotype, GenotypeError
from engine.metanas.ops import Identity
from engine.metanas.search_net import MetaNasSearchNet


class WeightedOp(nn.Module):
    def __init__(self, op: nn.Module, weight: float) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.op(x)


class KeptEdgeModule(nn.Module):
    def __init__(self, source: int, ops: list[WeightedOp], scale: float) -> None:
        super().__init__()
        self.source = source
        self.ops = nn.ModuleList(ops)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        x = states[self.source]
        mixed: torch.Tensor | None = None
        for op in self.ops:
            y = op(x)
            if mixed is None:
                mixed = y
            else:
                mixed = mixed + y
        assert mixed is not None
        return self.scale * mixed


class NodeModule(nn.Module):
    def __init__(self, edges: list[KeptEdgeModule]) -> None:
        super().__init__()
        self.edges = nn.ModuleList(edges)

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for edge in self.edges:
            y = edge(states)
            if total is None:
                total = y
            else:
                total = total + y
        assert total is not None
        return total


class TaskCell(nn.Module):
    def __init__(self, preprocess0: nn.Module, preprocess1: nn.Module, nodes: list[NodeModule]) -> None:
        super().__init__()
        self.preprocess0 = preprocess0
        self.preprocess1 = preprocess1
        self.nodes = nn.ModuleList(nodes)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in self.nodes:
            states.append(node(states))
        return torch.cat(states[2:], dim=1)


class MetaNasTaskNet(nn.Module):
    """Stem, pruned cells, global average pooling and the linear classifier."""

    def __init__(self, stem: nn.Module, cells: list[TaskCell], classifier: nn.Linear) -> None:
        super().__init__()
        self.stem = stem
        self.cells = nn.ModuleList(cells)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = s0
        for cell in self.cells:
            out = cell(s0, s1)
            s0 = s1
            s1 = out
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def build_task_network(search_net: MetaNasSearchNet, genotype: Genotype) -> MetaNasTaskNet:
    """Copy the kept operations (and stem, pre-processing, classifier) out of ``search_net``."""
    config = search_net.config
    if tuple(genotype.candidate_operations) != tuple(config.operations):
        raise GenotypeError(
            f"genotype candidate operations {genotype.candidate_operations} do not match the network's "
            f"{config.operations}"
        )
    op_index = {name: i for i, name in enumerate(config.operations)}
    cells = []
    for search_cell in search_net.cells:
        cell_type = "reduce" if search_cell.reduction else "normal"
        node_genotypes = genotype.cell(cell_type)
        if len(node_genotypes) != config.nodes_per_cell:
            raise GenotypeError(
                f"genotype {cell_type} cell has {len(node_genotypes)} nodes, the network {config.nodes_per_cell}"
            )
        used_sources: set[int] = set()
        nodes = []
        for node_genotype in node_genotypes:
            node = node_genotype.node
            edges = []
            for edge in node_genotype.edges:
                used_sources.add(edge.source)
                candidates = search_cell.edges[node][edge.source]
                ops = [
                    WeightedOp(copy.deepcopy(candidates[op_index[name]]), weight)
                    for name, weight in zip(edge.operations, edge.weights, strict=True)
                ]
                edges.append(KeptEdgeModule(edge.source, ops, edge.scale))
            nodes.append(NodeModule(edges))
        # A cell input no kept edge reads is not computed at all.
        preprocess0 = copy.deepcopy(search_cell.preprocess0) if 0 in used_sources else Identity()
        preprocess1 = copy.deepcopy(search_cell.preprocess1) if 1 in used_sources else Identity()
        cells.append(TaskCell(preprocess0, preprocess1, nodes))
    network = MetaNasTaskNet(copy.deepcopy(search_net.stem), cells, copy.deepcopy(search_net.classifier))
    for param in network.parameters():
        param.requires_grad_(False)
    # BatchNorm keeps no running statistics, so eval mode computes the same function as training mode.
    return network.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
