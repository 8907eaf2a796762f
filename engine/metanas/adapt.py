"""Meta-testing (Algorithm 3): adapt weights and architecture to one task, prune, export.

``adapt_task`` runs ``test_arch_steps`` steps that update weights and architecture with
the temperature annealed to ``temperature_min``, then ``test_weight_steps`` weight-only
steps at that temperature (A.2: "50+50"), prunes everything whose weight is not above
``prune_threshold`` and builds the discrete network from the adapted weights, with no
retraining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.export import save_torchscript, script_module
from engine.metanas.config import MetaNasConfig, MetaNasConfigError
from engine.metanas.discrete import MetaNasTaskNet, build_task_network, count_parameters
from engine.metanas.genotype import Genotype, derive_genotype
from engine.metanas.search_net import MetaNasSearchNet
from engine.metanas.train import MetaState, accuracy, train_on_task
from engine.progress import ProgressCallback, null_progress
from engine.seeding import Rngs


@dataclass(frozen=True)
class TaskModel:
    """A task-specific MetaNAS model: the pruned discrete network and what it came from."""

    genotype: Genotype
    #: The pruned network (plain module, TorchScript-able, no architecture parameters).
    network: MetaNasTaskNet
    #: The adapted one-shot model before pruning (for measuring the pruning effect).
    one_shot: MetaNasSearchNet
    temperature: float
    num_parameters: int
    one_shot_parameters: int
    adapt_seconds: float
    final_support_loss: float

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the pruned network (BatchNorm uses the statistics of ``x``: pass the whole query batch)."""
        return self.network(x)

    @torch.no_grad()
    def one_shot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the un-pruned one-shot model at the final temperature."""
        return self.one_shot(x, self.temperature)

    def evaluate(self, query_x: torch.Tensor, query_y: torch.Tensor) -> dict[str, float]:
        """Query accuracy before and after pruning (the paper's claim: pruning costs almost nothing)."""
        one_shot = accuracy(self.one_shot_logits(query_x), query_y)
        pruned = accuracy(self.predict(query_x), query_y)
        return {"one_shot_accuracy": one_shot, "pruned_accuracy": pruned, "pruning_drop": one_shot - pruned}

    def summary(self) -> dict[str, object]:
        return {
            "method": "metanas",
            "num_parameters": self.num_parameters,
            "one_shot_parameters": self.one_shot_parameters,
            "kept_operations": self.genotype.kept_operation_count(),
            "temperature": self.temperature,
            "adapt_seconds": self.adapt_seconds,
            "final_support_loss": self.final_support_loss,
            "genotype": self.genotype.to_dict(),
        }


def adapt_task(
    meta_state: MetaState,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    config: MetaNasConfig | None = None,
    *,
    rngs: Rngs,
    progress: ProgressCallback = null_progress,
) -> TaskModel:
    """Adapt the meta-learned weights and architecture to one task and prune by threshold.

    ``config`` (default: the meta state's) may change the task-learning and pruning
    settings but not the search space the meta state was trained in.
    """
    config = config or meta_state.config
    if config.search_space_key() != meta_state.config.search_space_key():
        raise MetaNasConfigError(
            "adapt_task config describes a different search space than the meta state: "
            f"{config.search_space_key()} vs {meta_state.config.search_space_key()}"
        )
    started = time.perf_counter()
    net = meta_state.to_net()
    steps = config.test_arch_steps + config.test_weight_steps
    result = train_on_task(
        net,
        support_x,
        support_y,
        config,
        steps=steps,
        arch_steps=config.test_arch_steps,
        rngs=rngs,
        progress=lambda event: progress({**event, "stage": "adapt"}),
    )
    genotype = derive_genotype(net, result.final_temperature, config.prune_threshold)
    network = build_task_network(net, genotype)
    for param in net.parameters():
        param.requires_grad_(False)
    return TaskModel(
        genotype=genotype,
        network=network,
        one_shot=net,
        temperature=result.final_temperature,
        num_parameters=count_parameters(network),
        one_shot_parameters=sum(p.numel() for p in net.weight_parameters()),
        adapt_seconds=time.perf_counter() - started,
        final_support_loss=result.final_support_loss,
    )


def export_task_model(task_model: TaskModel, path: str | Path | None = None) -> torch.jit.ScriptModule:
    """TorchScript the pruned network; with ``path``, save it there atomically.

    The saved file loads with ``torch.jit.load`` alone (no nasweb code needed).
    """
    scripted = script_module(task_model.network)
    if path is not None:
        save_torchscript(scripted, path)
    return scripted
