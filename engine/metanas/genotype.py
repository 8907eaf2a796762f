"""The discrete, task-specific architecture left after pruning by threshold (end of Section 4).

A genotype lists, per cell type and intermediate node, the input combinations whose
weight is above the threshold and, for every input edge they use, the operations
whose weight is above the threshold, together with the (un-renormalised) weights the
pruned network multiplies them with. It is plain data: ``to_dict``/``from_dict``/JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from engine.metanas.search_net import CELL_TYPES, MetaNasSearchNet, input_combinations


class GenotypeError(ValueError):
    """A genotype description is malformed; the message names the bad part."""


@dataclass(frozen=True)
class KeptEdge:
    """Input ``source`` of a node (0, 1: cell inputs; 2+: earlier nodes) and its kept operations."""

    source: int
    #: Summed weight of the kept input combinations containing this input (eq. 7).
    scale: float
    operations: tuple[str, ...]
    #: Operation weights (eq. 5) in the order of ``operations``.
    weights: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "scale": self.scale,
            "operations": [
                {"op": op, "weight": w} for op, w in zip(self.operations, self.weights, strict=True)
            ],
        }


@dataclass(frozen=True)
class NodeGenotype:
    node: int
    combinations: tuple[tuple[tuple[int, ...], float], ...]
    edges: tuple[KeptEdge, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "combinations": [{"inputs": list(inputs), "weight": w} for inputs, w in self.combinations],
            "edges": [edge.to_dict() for edge in self.edges],
        }


@dataclass(frozen=True)
class Genotype:
    normal: tuple[NodeGenotype, ...]
    reduce: tuple[NodeGenotype, ...]
    temperature: float
    prune_threshold: float
    candidate_operations: tuple[str, ...]

    def cell(self, cell_type: str) -> tuple[NodeGenotype, ...]:
        if cell_type == "normal":
            return self.normal
        if cell_type == "reduce":
            return self.reduce
        raise GenotypeError(f"cell type must be one of {CELL_TYPES}, got {cell_type!r}")

    def kept_operation_count(self) -> int:
        return sum(
            len(edge.operations) for cell in (self.normal, self.reduce) for n in cell for edge in n.edges
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "metanas",
            "temperature": self.temperature,
            "prune_threshold": self.prune_threshold,
            "candidate_operations": list(self.candidate_operations),
            "normal": [node.to_dict() for node in self.normal],
            "reduce": [node.to_dict() for node in self.reduce],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Genotype:
        try:
            candidates = tuple(data["candidate_operations"])
            cells = {}
            for cell_type in CELL_TYPES:
                nodes = []
                for node_data in data[cell_type]:
                    node = int(node_data["node"])
                    edges = []
                    for edge in node_data["edges"]:
                        source = int(edge["source"])
                        if not 0 <= source < 2 + node:
                            raise GenotypeError(
                                f"{cell_type} node {node}: input {source} does not precede it"
                            )
                        ops = tuple(str(o["op"]) for o in edge["operations"])
                        unknown = [op for op in ops if op not in candidates]
                        if unknown or not ops:
                            raise GenotypeError(f"{cell_type} node {node}: bad operations {ops!r}")
                        edges.append(
                            KeptEdge(
                                source=source,
                                scale=float(edge["scale"]),
                                operations=ops,
                                weights=tuple(float(o["weight"]) for o in edge["operations"]),
                            )
                        )
                    if not edges:
                        raise GenotypeError(f"{cell_type} node {node} has no input edges")
                    combos = tuple(
                        (tuple(int(i) for i in c["inputs"]), float(c["weight"]))
                        for c in node_data["combinations"]
                    )
                    nodes.append(NodeGenotype(node=node, combinations=combos, edges=tuple(edges)))
                cells[cell_type] = tuple(nodes)
            return cls(
                normal=cells["normal"],
                reduce=cells["reduce"],
                temperature=float(data["temperature"]),
                prune_threshold=float(data["prune_threshold"]),
                candidate_operations=candidates,
            )
        except (KeyError, TypeError) as error:
            raise GenotypeError(f"malformed MetaNAS genotype: missing or bad field {error}") from error

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(json.loads(text))


@torch.no_grad()
def derive_genotype(
    net: MetaNasSearchNet, temperature: float, prune_threshold: float, *, strongest_only: bool = False
) -> Genotype:
    """Prune by threshold: keep what ``net.forward(x, temperature, prune_threshold)`` evaluates.

    The float32 weights are stored as Python floats (exact), so a network rebuilt from
    the genotype multiplies with bit-identical factors.

    ``strongest_only=True`` is DARTS' hard pruning instead (the baseline of Appendix A.1):
    per node only the strongest input combination, per kept edge only the strongest
    operation, whatever their weights.
    """
    config = net.config
    cells: dict[str, tuple[NodeGenotype, ...]] = {}
    for cell_type in CELL_TYPES:
        weights = net.mixture_weights(cell_type, temperature)
        nodes = []
        for node in range(config.nodes_per_cell):
            combos = input_combinations(2 + node, config.inputs_per_node)
            combo_weights = weights.combos[node]
            scales: list[torch.Tensor | None] = [None] * (2 + node)
            kept_combos = []
            # Same accumulation order as SearchCell.edge_scales, so the float32 sums agree bit for bit.
            strongest_combo = int(combo_weights.argmax())
            for index, combo in enumerate(combos):
                p = combo_weights[index]
                if strongest_only and index != strongest_combo:
                    continue
                if not strongest_only and prune_threshold > 0.0 and not bool(p > prune_threshold):
                    continue
                kept_combos.append((combo, float(p)))
                for source in combo:
                    scales[source] = p if scales[source] is None else scales[source] + p
            edges = []
            for source, scale in enumerate(scales):
                if scale is None:
                    continue
                op_weights = weights.ops[node][source]
                if strongest_only:
                    best = int(op_weights.argmax())
                    kept = [(config.operations[best], float(op_weights[best]))]
                else:
                    kept = [
                        (name, float(op_weights[i]))
                        for i, name in enumerate(config.operations)
                        if prune_threshold <= 0.0 or bool(op_weights[i] > prune_threshold)
                    ]
                edges.append(
                    KeptEdge(
                        source=source,
                        scale=float(scale),
                        operations=tuple(name for name, _ in kept),
                        weights=tuple(w for _, w in kept),
                    )
                )
            nodes.append(NodeGenotype(node=node, combinations=tuple(kept_combos), edges=tuple(edges)))
        cells[cell_type] = tuple(nodes)
    return Genotype(
        normal=cells["normal"],
        reduce=cells["reduce"],
        temperature=float(temperature),
        prune_threshold=float(prune_threshold),
        candidate_operations=tuple(config.operations),
    )
