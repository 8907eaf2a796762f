"""The ``vmap`` meta-training strategy (the GPU path) computes what the per-task loop computes.

On the real networks: the MAML++ 4-conv baseline and super-net sub-nets, including ones that
leave layers unused (Adaptive Number of Layers), second and first order, in float64 so only the
order of additions can differ. Checked: meta-gradients, which parameters get none at all (Adam
treats a zero gradient and no gradient differently), the merged BatchNorm running statistics,
losses, accuracies and evaluation. The CUDA cases run where a GPU is present.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.baselines import MamlConvNet
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.synthetic import SyntheticTasks
from engine.seeding import make_rngs
from engine.space import SearchSpace
from engine.supernet import SuperNet

CONFIG = MamlConfig(inner_steps=3, inner_lr=0.2, multi_step_epochs=4, first_order_epochs=2, strategy="loop")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# An op without a vmap batching rule runs task by task (a "performance drop" warning): the
# strategy would still be right but lose its point, so such a warning fails these tests.
pytestmark = pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")


def _batch(ways: int, tasks: int, seed: int, device: str = "cpu"):
    source = SyntheticTasks(ways, 1, 2, channels=1, image_size=28)
    return source(np.random.default_rng(seed), tasks).to(device, torch.float64)


def _pair(model: torch.nn.Module, config: MamlConfig, device: str) -> tuple[MamlLearner, MamlLearner]:
    vectorised = MamlLearner(copy.deepcopy(model), config.with_(strategy="vmap")).double().to(device)
    reference = MamlLearner(model, config).double().to(device)
    return reference, vectorised


def _step(learner: MamlLearner, batch, epoch: int, kwargs: dict):
    learner.zero_grad(set_to_none=True)
    result = learner.meta_step(batch, epoch=epoch, forward_kwargs=kwargs)
    grads = {name: p.grad for name, p in learner.named_parameters() if p.grad is not None}
    return result, grads


def _assert_same_step(
    reference: MamlLearner, vectorised: MamlLearner, batch, epoch: int, kwargs: dict
) -> None:
    expected_result, expected = _step(reference, batch, epoch, kwargs)
    actual_result, actual = _step(vectorised, batch, epoch, kwargs)
    assert actual.keys() == expected.keys()  # the same parameters get a gradient, the others none
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(
        reference.model.named_buffers(), vectorised.model.named_buffers(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
    assert actual_result.second_order == expected_result.second_order
    np.testing.assert_allclose(actual_result.task_losses, expected_result.task_losses, rtol=1e-9)
    assert actual_result.task_accuracies == pytest.approx(expected_result.task_accuracies)


@pytest.mark.parametrize("epoch", [0, 3])  # first order, then second order with multi-step loss
def test_vmap_equals_the_loop_on_the_maml_baseline(epoch: int) -> None:
    torch.manual_seed(0)
    model = MamlConvNet(1, 28, 5, filters=8, bn_steps=CONFIG.inner_steps)
    reference, vectorised = _pair(model, CONFIG, "cpu")
    for round_ in range(2):  # twice: the second step starts from merged running statistics
        _assert_same_step(reference, vectorised, _batch(5, 3, round_), epoch, {})


def _supernet_archs(space: SearchSpace) -> list:
    rng = make_rngs(7).numpy
    archs = [space.largest(), space.smallest()]
    while len(archs) < 4:  # two sampled ones that leave layers unused
        arch = space.sample(rng)
        if arch.n_used_layers < len(space.base_channels):
            archs.append(arch)
    return archs


@pytest.mark.parametrize("epoch", [0, 3])
def test_vmap_equals_the_loop_on_supernet_subnets(epoch: int) -> None:
    space = SearchSpace.vgg9(num_classes=5)
    space = replace(space, base_channels=tuple(4 for _ in space.base_channels))
    torch.manual_seed(0)
    reference, vectorised = _pair(SuperNet(space, bn_steps=CONFIG.inner_steps), CONFIG, "cpu")
    for index, arch in enumerate(_supernet_archs(space)):
        _assert_same_step(reference, vectorised, _batch(5, 2, index), epoch, {"arch": arch})


def test_vmap_evaluation_equals_the_loop_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = MamlConvNet(1, 28, 5, filters=8, bn_steps=CONFIG.inner_steps)
    reference, vectorised = _pair(model, CONFIG.with_(eval_inner_steps=3), "cpu")
    reference.train()
    vectorised.train()
    state = {name: value.clone() for name, value in vectorised.state_dict().items()}
    batch = _batch(5, 4, 11)
    assert vectorised.evaluate_batch(batch) == pytest.approx(reference.evaluate_batch(batch))
    for name, value in vectorised.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in vectorised.parameters())


@CUDA
def test_vmap_equals_the_loop_on_cuda() -> None:
    torch.manual_seed(0)
    model = MamlConvNet(1, 28, 5, filters=8, bn_steps=CONFIG.inner_steps)
    reference, vectorised = _pair(model, CONFIG, "cuda")
    for round_, epoch in enumerate((0, 3)):
        _assert_same_step(reference, vectorised, _batch(5, 3, round_, "cuda"), epoch, {})
    batch = _batch(5, 4, 11, "cuda")
    assert vectorised.evaluate_batch(batch) == pytest.approx(reference.evaluate_batch(batch))
