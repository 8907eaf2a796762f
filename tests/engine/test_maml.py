"""MAML++ learner: reference and threaded meta-gradients agree; the MAML++ pieces do what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.meta.maml import MamlConfig, MamlConfigError, MamlLearner, norm_parameter_names
from engine.meta.tasks import TaskBatch, TaskBatchError
from tests.engine.maml_testnet import TinyStepNet

WAYS, SHOTS, QUERIES, SIZE = 5, 2, 3, 8


def make_batch(tasks: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    labels_s = torch.arange(WAYS).repeat_interleave(SHOTS)
    labels_q = torch.arange(WAYS).repeat_interleave(QUERIES)
    return TaskBatch(
        support_x=torch.randn(tasks, WAYS * SHOTS, 1, SIZE, SIZE, generator=generator, dtype=dtype),
        support_y=labels_s.expand(tasks, -1).clone(),
        query_x=torch.randn(tasks, WAYS * QUERIES, 1, SIZE, SIZE, generator=generator, dtype=dtype),
        query_y=labels_q.expand(tasks, -1).clone(),
    )


def make_learner(config: MamlConfig, seed: int = 0, **net_kwargs) -> MamlLearner:
    torch.manual_seed(seed)
    net = TinyStepNet(ways=WAYS, bn_steps=config.inner_steps, image_size=SIZE, **net_kwargs).double()
    return MamlLearner(net, config).double()


def meta_grads(
    learner: MamlLearner, batch: TaskBatch, strategy: str, epoch: int = 0, **kwargs
) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.meta_step(batch, epoch=epoch, strategy=strategy, **kwargs)
    return {name: p.grad.clone() for name, p in learner.named_parameters() if p.grad is not None}


CONFIG = MamlConfig(inner_steps=3, inner_lr=0.2, multi_step_epochs=4, workers=2)


@pytest.mark.parametrize("strategy", ["threads", "processes", "vmap"])
@pytest.mark.parametrize("epoch", [0, 2, 10])
def test_parallel_meta_gradients_equal_the_per_task_loop_reference(epoch: int, strategy: str) -> None:
    batch = make_batch(tasks=5)
    reference = make_learner(CONFIG)
    threaded = make_learner(CONFIG)
    threaded.load_state_dict(reference.state_dict())
    expected = meta_grads(reference, batch, "loop", epoch)
    try:
        actual = meta_grads(threaded, batch, strategy, epoch)
    finally:
        threaded.close_workers()
    assert expected.keys() == actual.keys()
    assert any(name.startswith("inner_lrs") for name in expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # Running statistics merged the same way too.
    for (name, a), (_, b) in zip(
        reference.model.named_buffers(), threaded.model.named_buffers(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_processes_follow_the_meta_parameters_and_end_with_close() -> None:
    """The workers were forked once; each meta-batch must use the learner's *current* weights,
    give exactly the threads strategy's gradients (same per-task work, same task-order sum) and
    leave no process behind."""
    psutil = pytest.importorskip("psutil")
    before = {child.pid for child in psutil.Process().children()}
    batch = make_batch(tasks=3)
    threads, processes = make_learner(CONFIG), make_learner(CONFIG.with_(strategy="processes"))
    processes.load_state_dict(threads.state_dict())
    try:
        for step in range(3):
            expected = meta_grads(threads, batch, "threads", epoch=step)
            actual = meta_grads(processes, batch, "processes", epoch=step)
            assert expected.keys() == actual.keys()
            for name in expected:
                assert torch.equal(actual[name], expected[name]), name
            for learner in (threads, processes):
                with torch.no_grad():
                    for param in learner.parameters():
                        if param.grad is not None:
                            param -= 0.5 * param.grad
            for a, b in zip(threads.model.buffers(), processes.model.buffers(), strict=True):
                assert torch.equal(a, b)
        assert len({child.pid for child in psutil.Process().children()} - before) == 2
    finally:
        processes.close_workers()
    assert {child.pid for child in psutil.Process().children()} - before == set()


def test_a_failing_worker_process_raises_its_error_and_is_replaced() -> None:
    learner = make_learner(CONFIG.with_(strategy="processes"))
    bad = make_batch(tasks=2)
    bad = TaskBatch(bad.support_x, bad.support_y + WAYS, bad.query_x, bad.query_y)  # labels out of range
    try:
        with pytest.raises(RuntimeError, match="meta-batch worker .* failed: .*"):
            meta_grads(learner, bad, "processes")
        assert meta_grads(learner, make_batch(tasks=2), "processes")  # fresh workers
    finally:
        learner.close_workers()


def test_second_order_gradients_differ_from_first_order() -> None:
    batch = make_batch()
    second = make_learner(CONFIG)
    first = make_learner(CONFIG.with_(first_order_epochs=5))
    first.load_state_dict(second.state_dict())
    assert second.second_order_at(0) and not first.second_order_at(0) and first.second_order_at(5)
    g2 = meta_grads(second, batch, "threads")
    g1 = meta_grads(first, batch, "threads")
    conv = "model.convs.0.weight"
    assert not torch.allclose(g1[conv], g2[conv], rtol=1e-4, atol=1e-8)
    # Once the annealing epoch is reached the "first" learner is second-order as well.
    torch.testing.assert_close(
        meta_grads(first, batch, "loop", epoch=5), meta_grads(second, batch, "loop", epoch=5)
    )


def test_first_order_matches_a_hand_computed_first_order_gradient() -> None:
    """One step, final-step loss, fixed lr: FOMAML gradient = grad of query loss at adapted weights."""
    config = MamlConfig.maml(second_order=False, inner_steps=1, inner_lr=0.3, inner_bn_params=True, workers=1)
    learner = make_learner(config)
    batch = make_batch(tasks=1)
    grads = meta_grads(learner, batch, "loop")
    net = learner.model
    sx, sy, qx, qy = batch.task(0)
    loss = torch.nn.functional.cross_entropy(net(sx, step=0), sy)
    names = [n for n, _ in net.named_parameters()]
    g = torch.autograd.grad(loss, list(net.parameters()))
    adapted = {
        n: (p - 0.3 * gi).detach().requires_grad_()
        for (n, p), gi in zip(net.named_parameters(), g, strict=True)
    }
    query = torch.nn.functional.cross_entropy(
        torch.func.functional_call(net, adapted, (qx,), {"step": 0}), qy
    )
    expected = torch.autograd.grad(query, [adapted[n] for n in names])
    for name, value in zip(names, expected, strict=True):
        torch.testing.assert_close(grads[f"model.{name}"], value, msg=name)


def test_lslr_learning_rates_receive_gradients_per_step() -> None:
    learner = make_learner(CONFIG)
    meta_grads(learner, make_batch(), "threads")
    for name, rate in learner.inner_lrs.items():
        assert rate.shape == (3,)
        assert rate.grad is not None and torch.all(rate.grad != 0), name
    plain = make_learner(MamlConfig.maml(inner_steps=3))
    assert not any(rate.requires_grad for rate in plain.inner_lrs.values())


def test_bn_parameters_stay_out_of_the_inner_loop_by_default() -> None:
    learner = make_learner(CONFIG)
    norms = norm_parameter_names(learner.model)
    assert norms == {f"norms.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
    assert not set(learner.inner_names) & norms
    assert set(make_learner(CONFIG.with_(inner_bn_params=True)).inner_names) >= norms


def test_per_step_batchnorm_keeps_separate_statistics_and_weights() -> None:
    learner = make_learner(CONFIG.with_(multi_step_epochs=0))
    before = learner.model.norms[0].running_mean.clone()
    grads = meta_grads(learner, make_batch(), "threads")
    after = learner.model.norms[0].running_mean
    assert not torch.equal(before, after)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(after[a], after[b]), (a, b)
    # Every step's BN weights get their own meta-gradient.
    weight_grad = grads["model.norms.0.weight"]
    assert weight_grad.shape == (3, 8) and torch.all(weight_grad.abs().sum(dim=1) > 0)


def test_evaluation_adapts_and_leaves_the_model_untouched() -> None:
    learner = make_learner(CONFIG)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    accuracies = learner.evaluate_batch(make_batch(tasks=3))
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)
    for key, value in learner.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in learner.parameters())
    # Training on the support set as the query: adaptation must fit it.
    batch = make_batch(tasks=2)
    same = TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
    fitted = make_learner(CONFIG.with_(inner_lr=0.5, eval_inner_steps=10))
    assert np.mean(fitted.evaluate_batch(same)) > 0.8


def test_unused_parameters_and_extra_forward_kwargs() -> None:
    learner = make_learner(CONFIG, unused_param=True)
    batch = make_batch()
    a = meta_grads(learner, batch, "threads", forward_kwargs={"scale": 2.0})
    b = meta_grads(learner, batch, "loop", forward_kwargs={"scale": 2.0})
    assert "model.spare" not in a and "model.spare" not in b
    c = meta_grads(learner, batch, "loop", forward_kwargs={"scale": 1.0})
    assert not torch.allclose(b["model.head.weight"], c["model.head.weight"])


def test_bad_settings_raise_clear_errors() -> None:
    with pytest.raises(MamlConfigError, match="strategy"):
        MamlConfig(strategy="vmapp")
    with pytest.raises(MamlConfigError, match="inner_steps"):
        MamlConfig(inner_steps=0)
    with pytest.raises(TaskBatchError, match="support_y"):
        TaskBatch(
            torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 4), torch.zeros(2, 3, 1, 4, 4), torch.zeros(2, 3)
        )
