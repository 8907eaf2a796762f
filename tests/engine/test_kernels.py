"""engine.kernels computes what ATen computes: values, running statistics, first and second derivatives.

Each case runs the hand-written kernel and the plain ATen op (F.batch_norm, F.max_pool2d) on the same
float64 inputs and compares the outputs, the first backward (with create_graph) and the derivative of
an arbitrary function of that backward, so the closed-form BatchNorm double backward is checked term
by term. End to end: second-order MAML++ meta-gradients of the 4-conv baseline and of a super-net
sub-net with the kernels (per-task loop and threads) equal the per-task loop's with ATen's kernels,
the reference of benchmarks/maml_speed.py.
"""

from __future__ import annotations

import copy
import gc
import threading
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.baselines import MamlConvNet
from engine.kernels import (
    batch_norm_train,
    double_backward_kernels,
    max_pool2d_2x2,
    reference_kernels,
    using_reference_kernels,
)
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.synthetic import SyntheticTasks
from engine.seeding import make_rngs
from engine.space import SearchSpace
from engine.supernet import SuperNet


def _random(shape, seed: int, requires_grad: bool = True) -> torch.Tensor:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return tensor.requires_grad_(requires_grad)


def _first_and_second_derivatives(fn, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Output, the first gradients (create_graph) and the gradients of a random function of them."""
    out = fn(*inputs)
    probe = _random(out.shape, seed, requires_grad=False)
    firsts = torch.autograd.grad((out * probe).sum(), inputs, create_graph=True)
    # A function of every first gradient: linear terms (each with its own probe) and a square, so
    # ggx, ggγ and ggβ all reach the double backward and the x-dependence of the first one counts.
    second_target = sum(
        (grad * _random(grad.shape, seed + 1 + i, requires_grad=False)).sum() + 0.5 * grad.pow(2).sum()
        for i, grad in enumerate(firsts)
    )
    seconds = torch.autograd.grad(second_target, inputs, allow_unused=True)
    zeros = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, seconds, strict=True)]
    return [out.detach(), *(g.detach() for g in firsts), *zeros]


@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (20, 8, 3, 3), (3, 2, 1, 1), (2, 3, 7, 6)])
def test_batch_norm_train_equals_aten_up_to_second_derivatives(shape) -> None:
    x, weight, bias = _random(shape, 0), _random(shape[1], 1), _random(shape[1], 2)
    with double_backward_kernels():
        ours = _first_and_second_derivatives(
            lambda x, w, b: batch_norm_train(x, w, b, None, None, 0.0, 1e-5), [x, weight, bias], seed=3
        )
    aten = _first_and_second_derivatives(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5), [x, weight, bias], seed=3
    )
    for name, a, b in zip(["out", "gx", "gw", "gb", "ggx", "ggw", "ggb"], ours, aten, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=name)


def test_batch_norm_train_passes_gradcheck_and_gradgradcheck() -> None:
    x, weight, bias = _random((3, 2, 4, 4), 0), _random(2, 1), _random(2, 2)

    def fn(x, w, b):
        return batch_norm_train(x, w, b, None, None, 0.0, 1e-5)

    with double_backward_kernels():
        assert type(fn(x, weight, bias).grad_fn).__name__ == "_BatchNormTrainBackward"
        assert torch.autograd.gradcheck(fn, (x, weight, bias))
        assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_batch_norm_train_updates_running_statistics_like_aten() -> None:
    x = _random((5, 3, 4, 4), 0)
    weight, bias = _random(3, 1), _random(3, 2)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    aten_stats = [t.clone() for t in stats]
    with double_backward_kernels():
        ours = batch_norm_train(x, weight, bias, *stats, 0.1, 1e-5)
    aten = F.batch_norm(x, *aten_stats, weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(ours, aten, rtol=0, atol=0)
    for a, b in zip(stats, aten_stats, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_third_derivative_of_batch_norm_is_refused_not_wrong() -> None:
    x, weight, bias = _random((4, 2, 3, 3), 0), _random(2, 1), _random(2, 2)
    with double_backward_kernels():
        out = batch_norm_train(x, weight, bias, None, None, 0.0, 1e-5)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)  # a plain second derivative works
    assert torch.isfinite(ggx).all()


@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (3, 4, 7, 7), (2, 3, 3, 3), (2, 2, 5, 4), (1, 1, 2, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_aten_up_to_second_derivatives(shape, ties: bool) -> None:
    x = _random(shape, 0, requires_grad=False)
    if ties:  # many equal maxima per window, as after a ReLU: the first one must win, as in ATen
        x = x.mul(2).round()
    x.requires_grad_(True)
    scale = _random(shape[1], 1).abs()

    def ours(x, scale):
        return max_pool2d_2x2(F.relu(x * scale.view(1, -1, 1, 1)))

    def aten(x, scale):
        return F.max_pool2d(F.relu(x * scale.view(1, -1, 1, 1)), 2)

    got = _first_and_second_derivatives(ours, [x, scale], seed=4)
    expected = _first_and_second_derivatives(aten, [x, scale], seed=4)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same selections: bit for bit


def test_inputs_the_kernels_do_not_cover_get_atens_behaviour() -> None:
    with pytest.raises(RuntimeError):  # ATen refuses a pool whose output would be empty
        max_pool2d_2x2(torch.ones(1, 1, 1, 4))
    x = _random((3, 2, 4, 4), 0)
    with double_backward_kernels():  # no affine parameters: ATen's op
        out = batch_norm_train(x, None, None, None, None, 0.0, 1e-5)
    assert type(out.grad_fn).__name__.startswith("NativeBatchNormBackward")
    torch.testing.assert_close(out, F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5))


def test_max_pool_passes_gradcheck_and_gradgradcheck() -> None:
    x = _random((2, 3, 6, 5), 0)
    assert torch.autograd.gradcheck(max_pool2d_2x2, (x,))
    assert torch.autograd.gradgradcheck(max_pool2d_2x2, (x,))


def test_which_kernel_runs_where() -> None:
    x = _random((2, 2, 4, 4), 0)
    weight, bias = _random(2, 1), _random(2, 2)

    def bn_node() -> str:
        return type(batch_norm_train(x, weight, bias, None, None, 0.0, 1e-5).grad_fn).__name__

    def pool_node() -> str:
        return type(max_pool2d_2x2(x).grad_fn).__name__

    # BatchNorm's kernel only where a double backward follows; max-pool's forward everywhere.
    assert bn_node().startswith("NativeBatchNormBackward") and pool_node() == "_MaxPool2x2Backward"
    with double_backward_kernels():
        assert bn_node() == "_BatchNormTrainBackward"
        with reference_kernels():
            assert using_reference_kernels()
            assert bn_node().startswith("NativeBatchNormBackward")
            assert pool_node().startswith("MaxPool2DWithIndicesBackward")
        errors = []

        def other_thread() -> None:  # the switches are per thread (strategy worker threads)
            try:
                assert bn_node().startswith("NativeBatchNormBackward")
            except AssertionError as error:
                errors.append(error)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert not errors
    assert not using_reference_kernels() and bn_node().startswith("NativeBatchNormBackward")


def _learner_pair(model: torch.nn.Module, strategy: str) -> tuple[MamlLearner, MamlLearner]:
    config = MamlConfig(inner_steps=3, inner_lr=0.2, multi_step_epochs=4, strategy="loop", workers=2)
    reference = MamlLearner(model, config).double()
    ours = MamlLearner(copy.deepcopy(model), config.with_(strategy=strategy)).double()
    return reference, ours


def _meta_gradients(learner: MamlLearner, batch, kwargs: dict) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.meta_step(batch, epoch=0, forward_kwargs=kwargs)
    return {name: p.grad.clone() for name, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", ["loop", "threads"])
@pytest.mark.parametrize("net", ["maml-4conv", "supernet"])
def test_second_order_meta_gradients_with_the_kernels_equal_the_aten_reference(
    net: str, strategy: str
) -> None:
    torch.manual_seed(0)
    batch = SyntheticTasks(5, 1, 2, channels=1, image_size=28)(np.random.default_rng(0), 3).to(
        "cpu", torch.float64
    )
    if net == "maml-4conv":
        model, kwargs = MamlConvNet(1, 28, 5, filters=8, bn_steps=3), {}
    else:
        space = SearchSpace.vgg9(num_classes=5)
        space = replace(space, base_channels=tuple(4 for _ in space.base_channels))
        model = SuperNet(space, bn_steps=3)
        kwargs = {"arch": space.sample(make_rngs(0).numpy)}
    reference, ours = _learner_pair(model, strategy)
    with reference_kernels():  # how benchmarks/maml_speed.py runs its reference
        expected = _meta_gradients(reference, batch, kwargs)
    actual = _meta_gradients(ours, batch, kwargs)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-8, atol=1e-11, msg=name)
    for (name, a), (_, b) in zip(reference.model.named_buffers(), ours.model.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    # ... and the kernels did run: a second-order task adaption records them, a first-order one
    # only the max-pool (BatchNorm's kernel would cost a first-order step time for nothing).
    task = tuple(t[0] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    for second_order, expected_nodes in ((True, {"_BatchNormTrainBackward"}), (False, set())):
        outcome = ours._adapt_task(
            ours.model,
            dict(ours.model.named_parameters()),
            task,
            weights=ours.loss_weights(0),
            create_graph=second_order,
            forward_kwargs=kwargs,
        )
        nodes = _node_names(outcome.loss.grad_fn)
        assert ("_BatchNormTrainBackward" in nodes) == bool(expected_nodes), nodes
        assert ("_MaxPool2x2Backward" in nodes) == (net == "maml-4conv"), nodes


def _node_names(root) -> set[str]:
    seen, names, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _batch_norm_backward_node() -> weakref.ref:
    """A weak reference to the autograd node of BatchNorm's first backward, built with create_graph."""
    x, weight, bias = _random((4, 3, 5, 5), 0), _random(3, 1), _random(3, 2)
    with double_backward_kernels():
        out = batch_norm_train(x * 1.5, weight, bias, None, None, 0.0, 1e-5)
    _, grad_weight = torch.autograd.grad(out.pow(2).sum(), [x, weight], create_graph=True)
    node = grad_weight.grad_fn
    assert type(node).__name__ == "_BatchNormTrainBackwardBackward"
    return weakref.ref(node)


def test_the_batch_norm_kernel_leaves_no_reference_cycle() -> None:
    # An output kept on its own node's context is a cycle through C++ that no collection frees:
    # every meta-iteration's graph leaked with it (17 GB after a few Mini-ImageNet-shaped
    # iterations). With the collector off, reference counting alone must free the node.
    gc.collect()
    gc.disable()
    try:
        assert _batch_norm_backward_node()() is None
    finally:
        gc.enable()


def test_second_order_meta_iterations_do_not_grow_memory() -> None:
    """The same leak seen from outside: the graph's saved activations are freed every iteration."""
    torch.manual_seed(0)
    learner = MamlLearner(
        MamlConvNet(1, 28, 5, filters=16, bn_steps=2),
        MamlConfig(inner_steps=2, multi_step_epochs=4, strategy="loop"),
    )
    batch = SyntheticTasks(5, 1, 2, channels=1, image_size=28)(np.random.default_rng(0), 2)
    alive = []
    for _ in range(3):
        learner.zero_grad(set_to_none=True)
        learner.meta_step(batch, epoch=0)
        gc.collect()
        alive.append(sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)))
    assert alive[2] == alive[1], alive
