"""Super-net fitness (engine.search.adapt): inner loop from inherited weights, query loss, costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.latency.lut import LatencyTable, keys_for
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.tasks import TaskBatch
from engine.search.adapt import (
    AdaptionInputError,
    LslrInnerLoop,
    SuperNetScorer,
    adapt_to_budget,
    inner_loop_from_learner,
    make_costs_fn,
    supernet_fitness,
    task_slices,
)
from engine.search.constraints import Constraint
from engine.search.evolution import GAConfig
from engine.space import SearchSpace
from engine.supernet import SuperNet, extract_subnet

WAYS = 3


def tiny_space() -> SearchSpace:
    return SearchSpace(
        backbone="vgg9",
        in_channels=1,
        image_size=12,
        num_classes=WAYS,
        pool_size=1,
        kernels=(1, 3),
        widths=(0.125, 0.25),
        activations=("relu", "elu"),
    )


def make_task(generator: torch.Generator, shots: int = 2, queries: int = 3):
    """Class prototypes + noise: a learnable task with a real support/query split."""
    prototypes = torch.randn(WAYS, 1, 12, 12, generator=generator)
    support_y = torch.arange(WAYS).repeat_interleave(shots)
    query_y = torch.arange(WAYS).repeat_interleave(queries)
    support_x = prototypes[support_y] + 0.3 * torch.randn(len(support_y), 1, 12, 12, generator=generator)
    query_x = prototypes[query_y] + 0.3 * torch.randn(len(query_y), 1, 12, 12, generator=generator)
    return support_x, support_y, query_x, query_y


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    space = tiny_space()
    net = SuperNet(space, bn_steps=1)
    generator = torch.Generator().manual_seed(1)
    tasks = [make_task(generator) for _ in range(4)]
    return space, net, tasks


def test_fitness_equals_manual_inner_loop_on_the_extracted_subnet(setup):
    """Fitness = query loss after SGD on the support set, starting from the inherited weights."""
    space, net, tasks = setup
    arch = space.sample(np.random.default_rng(5))
    steps, lr = 3, 0.2
    score = SuperNetScorer(net, LslrInnerLoop(steps=steps, default_lr=lr)).score(arch, tasks)

    losses = []
    for support_x, support_y, query_x, query_y in tasks:
        subnet = extract_subnet(net, arch, step=0).train()
        params = list(subnet.parameters())
        for _ in range(steps):
            loss = F.cross_entropy(subnet(support_x), support_y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
        with torch.no_grad():
            losses.append(float(F.cross_entropy(subnet(query_x), query_y)))
    assert score.loss == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-5)


def test_scoring_adapts_and_leaves_the_supernet_untouched(setup):
    space, net, tasks = setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    arch = space.largest()
    no_adaption = SuperNetScorer(net, LslrInnerLoop(steps=1, default_lr=0.0)).score(arch, tasks)
    adapted = SuperNetScorer(net, LslrInnerLoop(steps=5, default_lr=0.3)).score(arch, tasks)
    assert adapted.loss < no_adaption.loss
    assert 0.0 <= adapted.accuracy <= 1.0 and len(adapted.task_accuracies) == len(tasks)
    assert math.isfinite(adapted.accuracy_ci95)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed while scoring"
    assert not net.training, "scoring must restore the module's mode"


def test_learned_per_layer_rates_are_used(setup):
    space, net, tasks = setup
    arch = space.largest()
    frozen_names = {name: torch.zeros(2) for name, _ in net.named_parameters()}
    frozen = SuperNetScorer(net, LslrInnerLoop(steps=2, default_lr=0.5, learning_rates=frozen_names))
    baseline = SuperNetScorer(net, LslrInnerLoop(steps=1, default_lr=0.0))
    assert frozen.score(arch, tasks).loss == pytest.approx(baseline.score(arch, tasks).loss, rel=1e-6)
    with pytest.raises(AdaptionInputError, match="expected 1 or 2"):
        LslrInnerLoop(steps=2, learning_rates={"head.weight": torch.zeros(3)})


def test_bad_inputs_are_refused(setup):
    space, net, tasks = setup
    with pytest.raises(AdaptionInputError, match="at least 16 validation tasks"):
        task_slices(tasks, 16)
    assert [len(s) for s in task_slices(tasks * 2 + tasks[:1], 4)] == [4, 4]
    with pytest.raises(AdaptionInputError, match="another search space"):
        supernet_fitness(net, SearchSpace.vgg9(), [tasks], LslrInnerLoop())
    bad = [(tasks[0][0], tasks[0][1] + WAYS, tasks[0][2], tasks[0][3])]
    with pytest.raises(AdaptionInputError, match=f"{WAYS}-way"):
        supernet_fitness(net, space, [bad], LslrInnerLoop())(space.smallest(), 0)


def test_costs_fn_checks_the_latency_table_space(setup):
    space, _, _ = setup
    entries = {key: 0.01 for key in keys_for(space)}
    lut = LatencyTable(
        device="test", entries=entries, overhead_ms=0.1, metadata={"search_space": space.to_dict()}
    )
    costs = make_costs_fn(space, lut)(space.largest())
    assert set(costs) == {"params", "macs", "latency_ms"}
    assert costs["latency_ms"] == pytest.approx(0.1 + 0.01 * len(space.layer_specs(space.largest())))
    other = LatencyTable(
        device="test", entries=entries, metadata={"search_space": SearchSpace.vgg9().to_dict()}
    )
    with pytest.raises(AdaptionInputError, match="another search space"):
        make_costs_fn(space, other)
    partial = LatencyTable(device="test", entries=dict(list(entries.items())[:5]))
    with pytest.raises(AdaptionInputError, match="lacks"):
        make_costs_fn(space, partial)


def test_adapt_to_budget_end_to_end(setup):
    space, net, tasks = setup
    limit = make_costs_fn(space)(space.sample(np.random.default_rng(0)))["params"]
    config = GAConfig(
        pool_size=4, iterations=2, tasks_per_slice=2, final_candidates=2, max_init_tries=500, seed=1
    )
    result = adapt_to_budget(
        net, space, tasks, [Constraint("params", limit)], LslrInnerLoop(steps=2, default_lr=0.1), config
    )
    assert result.constraint_met
    assert result.evaluations > 0 and math.isfinite(result.best_loss)


def test_learner_inner_loop_matches_the_maml_learner_evaluation(setup):
    """Scoring through a MamlLearner's rates gives the learner's own evaluation accuracies."""
    space, _, tasks = setup
    torch.manual_seed(3)
    net = SuperNet(space, bn_steps=3)
    learner = MamlLearner(net, MamlConfig(inner_steps=3, inner_lr=0.2, strategy="loop", workers=1))
    with torch.no_grad():  # distinct learned rates per layer and step, as after meta-training
        for index, rates in enumerate(learner.inner_lrs.values()):
            rates.copy_(torch.tensor([0.05, 0.1, 0.2]) * (1 + index % 3))
    arch = space.sample(np.random.default_rng(11))
    batch = TaskBatch.stack(tasks)
    learner.train()
    expected = learner.evaluate_batch(batch, forward_kwargs={"arch": arch})
    inner = inner_loop_from_learner(learner)
    assert set(inner.adapted_names) == set(learner.inner_names)
    assert not any(".bn." in name for name in inner.adapted_names)  # MAML++: BN weights not adapted
    score = SuperNetScorer(learner.model, inner).score(arch, batch)
    assert score.task_accuracies == pytest.approx(expected, abs=1e-6)
    fitness = supernet_fitness(learner.model, space, [batch], inner)
    assert fitness(arch, 0) == pytest.approx(score.loss)
    with pytest.raises(AdaptionInputError, match="rates for 3"):
        inner_loop_from_learner(learner, steps=4)


@pytest.mark.parametrize("backbone", ["vgg9", "resnet12"])
@pytest.mark.parametrize("max_elements", [None, 1])
@pytest.mark.parametrize("adapt_bn", [False, True])
def test_batched_scoring_equals_scoring_one_task_at_a_time(backbone, max_elements, adapt_bn, monkeypatch):
    """The grouped path (tasks as channel groups of one forward), the batched one (tasks vmapped)
    - both on the sliced sub-net, in chunks - and the sliced one-by-one path against the
    reference loop on the full tensors; with BN's affine parameters adapted per task or shared."""
    import engine.search.adapt as adapt

    if max_elements is not None:  # one task per chunk
        monkeypatch.setattr(adapt, "MAX_BATCHED_ELEMENTS", max_elements)
    torch.manual_seed(4)
    space = tiny_space()
    if backbone == "resnet12":  # two residual blocks of three convs
        space = SearchSpace(
            **{
                **space.to_dict(),
                "backbone": backbone,
                "base_channels": (8,) * 3 + (16,) * 3,
                "strides": (2, 1, 1) * 2,
            }
        )
    net = SuperNet(space, bn_steps=2)
    generator = torch.Generator().manual_seed(2)
    tasks = [make_task(generator) for _ in range(5)]
    rates = {
        name: torch.tensor([0.3, 0.1, 0.2]) * (1 + i % 2)
        for i, (name, _) in enumerate(net.named_parameters())
    }
    inner = LslrInnerLoop(
        steps=3,
        learning_rates=rates,
        adapted_names=[name for name, _ in net.named_parameters() if adapt_bn or ".bn." not in name][:-1],
    )
    scorer = SuperNetScorer(net, inner)
    rng = np.random.default_rng(7)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(6)]
    tensors = [tuple(task) for task in tasks]
    # "auto" takes both of its ways on these sub-nets
    smallest_activation = min(scorer.largest_activation(arch, tasks[0][0]) for arch in archs)
    monkeypatch.setattr(adapt, "MAX_BATCHED_TASK_ACTIVATION", smallest_activation)
    assert {scorer.scoring_path(arch, tensors) for arch in archs} == {"grouped", "sliced"}
    for arch in archs:
        each = scorer.score_each(arch, tasks)
        for path in adapt.SCORING_PATHS:
            monkeypatch.setattr(adapt, "SCORING_PATH", path)
            for other in (scorer.score(arch, tasks), scorer.score_each(arch, tasks, sliced=True)):
                assert other.loss == pytest.approx(each.loss, rel=1e-5, abs=1e-6), (arch, path)
                assert other.task_accuracies == each.task_accuracies, (arch, path)


def test_auto_scoring_batches_only_sub_nets_whose_largest_activation_fits(setup, monkeypatch):
    import engine.search.adapt as adapt

    space, net, tasks = setup
    scorer = SuperNetScorer(net, LslrInnerLoop(steps=2, default_lr=0.2))
    support_x = tasks[0][0]
    tensors = [tuple(task) for task in tasks]
    rng = np.random.default_rng(5)
    for arch in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(6)]:
        # the biggest layer output, as the running sub-net produces it
        outputs: list[int] = []

        def record(_module, _inputs, output, outputs=outputs):
            outputs.append(output.numel())

        subnet = extract_subnet(net, arch)
        hooks = [m.register_forward_hook(record) for m in subnet.modules() if isinstance(m, torch.nn.Conv2d)]
        subnet(support_x)
        for hook in hooks:
            hook.remove()
        assert scorer.largest_activation(arch, support_x) == max(outputs), arch
        monkeypatch.setattr(adapt, "MAX_BATCHED_TASK_ACTIVATION", max(outputs))
        assert scorer.scoring_path(arch, tensors) == "grouped"
        monkeypatch.setattr(adapt, "MAX_BATCHED_TASK_ACTIVATION", max(outputs) - 1)
        assert scorer.scoring_path(arch, tensors) == "sliced"
    mixed = tensors[:1] + [tuple(make_task(torch.Generator().manual_seed(3), shots=1))]
    monkeypatch.setattr(adapt, "MAX_BATCHED_TASK_ACTIVATION", 10**9)
    assert scorer.scoring_path(space.smallest(), mixed) == "sliced"
    monkeypatch.setattr(adapt, "SCORING_PATH", "fastest")
    with pytest.raises(AdaptionInputError, match="SCORING_PATH must be one of"):
        scorer.score(space.smallest(), tasks)


def test_tasks_of_different_shapes_are_scored_one_by_one(setup):
    space, net, tasks = setup
    generator = torch.Generator().manual_seed(9)
    mixed = tasks[:2] + [make_task(generator, shots=1, queries=2)]
    scorer = SuperNetScorer(net, LslrInnerLoop(steps=2, default_lr=0.2))
    arch = space.sample(np.random.default_rng(2))
    score = scorer.score(arch, mixed)
    assert score == scorer.score_each(arch, mixed, sliced=True)
    assert score.loss == pytest.approx(scorer.score_each(arch, mixed).loss, rel=1e-5, abs=1e-6)
