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
    using_double_backward_kernels,
    using_reference_kernels,
)
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.synthetic import SyntheticTasks
from engine.ops import ElasticBatchNorm2d
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
    # The square makes the incoming gradient depend on the inputs, so its own derivative counts.
    firsts = torch.autograd.grad((out * probe).sum() + 0.5 * out.pow(2).sum(), inputs, create_graph=True)
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


@pytest.mark.parametrize("used", [("gx",), ("gw",), ("gb",), ("gx", "gb"), ("gw", "gb")])
def test_batch_norm_double_backward_with_only_some_first_gradients_used(used) -> None:
    x, weight, bias = _random((5, 3, 2, 3), 0), _random(3, 1), _random(3, 2)
    results = []
    for kernels in (double_backward_kernels, reference_kernels):
        with kernels():
            out = batch_norm_train(x, weight, bias, None, None, 0.0, 1e-5)
        grads = torch.autograd.grad(out.pow(3).sum(), [x, weight, bias], create_graph=True)
        firsts = dict(zip(("gx", "gw", "gb"), grads, strict=True))
        target = sum(firsts[name].pow(2).sum() for name in used)
        results.append(torch.autograd.grad(target, [x, weight, bias], allow_unused=True))
    for ours, aten in zip(*results, strict=True):
        if aten is None:
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, aten, rtol=1e-10, atol=1e-11)


def test_an_in_place_edit_of_the_first_gradients_does_not_change_the_second() -> None:
    x, weight, bias = _random((4, 2, 3, 3), 0), _random(2, 1), _random(2, 2)
    results = []
    for kernels in (double_backward_kernels, reference_kernels):
        with kernels():
            out = batch_norm_train(x, weight, bias, None, None, 0.0, 1e-5)
        gx, gw, gb = torch.autograd.grad(out.pow(2).sum(), [x, weight, bias], create_graph=True)
        gw.mul_(0.5)
        gb.mul_(0.5)
        results.append(torch.autograd.grad(gx.pow(2).sum() + gw.pow(2).sum(), x)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_max_pool_on_other_layouts_equals_aten_up_to_second_derivatives(layout: str) -> None:
    base = _random((2, 3, 7, 6), 0, requires_grad=False)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base[:, :, 1:, ::1][:, :, :, 1:]
    x.requires_grad_(True)
    got = _first_and_second_derivatives(lambda t: max_pool2d_2x2(F.relu(t)), [x], seed=5)
    expected = _first_and_second_derivatives(lambda t: F.max_pool2d(F.relu(t), 2), [x], seed=5)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_captured_tensors_inside_torch_func_transforms_use_atens_ops() -> None:
    x = _random((2, 3, 4, 4), 0, requires_grad=False)
    scales = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    pooled = torch.vmap(lambda scale: max_pool2d_2x2(x).sum() * scale)(scales)
    torch.testing.assert_close(pooled, F.max_pool2d(x, 2).sum() * scales)
    weight, bias = _random(3, 1, requires_grad=False), _random(3, 2, requires_grad=False)

    def normalised(scale: torch.Tensor) -> torch.Tensor:
        return batch_norm_train(x * 1.0, weight * scale, bias, None, None, 0.0, 1e-5).pow(2).sum()

    with double_backward_kernels():
        grads = torch.func.grad(normalised)(torch.tensor(1.3, dtype=torch.float64))
    with reference_kernels():
        expected = torch.func.grad(normalised)(torch.tensor(1.3, dtype=torch.float64))
    torch.testing.assert_close(grads, expected)


def test_inputs_the_kernels_do_not_cover_get_atens_behaviour() -> None:
    with pytest.raises(RuntimeError):  # ATen refuses a pool whose output would be empty
        max_pool2d_2x2(torch.ones(1, 1, 1, 4))
    with pytest.raises(RuntimeError):  # ... and an input without channels
        max_pool2d_2x2(torch.ones(2, 0, 4, 4))
    with double_backward_kernels(), pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_train(_random((1, 3, 1, 1), 0), _random(3, 1), _random(3, 2), None, None, 0.0, 1e-5)
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


class KernelProbeNet(torch.nn.Module):
    """conv -> engine BatchNorm -> linear, whose forward fails unless BatchNorm's double-backward
    kernel is switched on where it runs (a worker thread or a spawned worker process)."""

    def __init__(self, bn_steps: int = 2) -> None:
        super().__init__()
        self.bn_steps = bn_steps
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = ElasticBatchNorm2d(4, bn_steps)
        self.head = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor, step: int = 0, track_stats: bool = True) -> torch.Tensor:
        if torch.is_grad_enabled() and not using_double_backward_kernels():
            raise AssertionError("a second-order step ran without BatchNorm's double-backward kernel")
        return self.head(F.relu(self.bn(self.conv(x), step, track_stats)).flatten(1))


@pytest.mark.parametrize("strategy", ["loop", "threads", "processes"])
def test_every_cpu_strategy_runs_second_order_steps_with_the_kernel(strategy: str) -> None:
    torch.manual_seed(0)
    learner = MamlLearner(
        KernelProbeNet(), MamlConfig(inner_steps=2, multi_step_epochs=4, strategy=strategy, workers=2)
    )
    batch = SyntheticTasks(5, 1, 2, channels=1, image_size=8)(np.random.default_rng(0), 2)
    try:
        learner.meta_step(batch, epoch=0)
    finally:
        learner.close_workers()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.model.parameters())
