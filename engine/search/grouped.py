"""A slice's tasks through one sub-net at once, as channel groups, without ``torch.func.vmap``.

The GA's fitness runs the same sub-net on 16 tasks, each with its own adapted weights. ``vmap``
(:meth:`engine.search.adapt.SuperNetScorer.score_batched`) already turns each convolution into
one grouped convolution over the tasks, but its BatchNorm rule normalises without the affine
parameters and then applies them with broadcast multiplications on a task-major permutation of
the activations (two extra passes and a copy per BN, forward and backward), which is most of the
gap between the batched path and the arithmetic it needs (docs/BENCHMARKS.md).

Here the activations of all tasks keep one layout, ``[images, tasks * channels, H, W]`` (task
``t`` owns channels ``t*C .. (t+1)*C - 1``), from the input to the classifier:

* a convolution with per-task weights ``[tasks, out, in, k, k]`` is ``conv2d(groups=tasks)``;
* BatchNorm's batch statistics per (task, channel) are ATen's per-channel statistics of that
  layout, with the affine parameters fused in (repeated per task where they are shared);
* activations are element-wise;
* pooling + classifier (folded as in ``ElasticLinear.forward``) is one batched matmul.

Gradients come from plain autograd: the loss is the sum over tasks of each task's mean support
loss, and no task's weights touch another's outputs, so the gradient with respect to the
stacked weights is, task by task, that task's own gradient. Same arithmetic as the other paths
(tests compare them to float rounding); only the super-net's forward is written again, from the
same execution plan (:meth:`engine.supernet.SuperNet.plan`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from engine.ops import BN_EPS, pool_or_fold, same_padded_conv2d

Params = dict[str, torch.Tensor]


def _per_task(tensor: torch.Tensor, tasks: int, dims: int) -> torch.Tensor:
    """``tensor`` with a leading task dimension: as is where it has one (``dims + 1`` dims),
    else expanded (shared by every task: not adapted, or the meta-weights of step 0)."""
    if tensor.dim() == dims + 1:
        return tensor
    return tensor.unsqueeze(0).expand(tasks, *tensor.shape)


def _conv(h: torch.Tensor, weight: torch.Tensor, tasks: int, stride: int) -> torch.Tensor:
    weight = _per_task(weight, tasks, 4)
    return same_padded_conv2d(h, weight.reshape(-1, *weight.shape[2:]), stride, groups=tasks)


def _batch_norm(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, step: int, tasks: int
) -> torch.Tensor:
    # Sliced BN parameters are [bn_steps, C] (or [tasks, bn_steps, C] when adapted per task).
    weight = _per_task(weight, tasks, 2)[:, step].reshape(-1)
    bias = _per_task(bias, tasks, 2)[:, step].reshape(-1)
    return F.batch_norm(h, None, None, weight, bias, True, 0.0, BN_EPS)


def _pool_and_classify(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[images, tasks*C, H, W]`` -> logits ``[tasks, images, classes]``."""
    weight = _per_task(weight, tasks, 4)  # [tasks, classes, C, p, p]
    bias = _per_task(bias, tasks, 1)  # [tasks, classes]
    h, features = pool_or_fold(h, weight)  # features [tasks, classes, C*h*w]
    x = h.reshape(h.shape[0], tasks, -1).transpose(0, 1)  # [tasks, images, C*h*w]
    return torch.baddbmm(bias.unsqueeze(1), x, features.transpose(1, 2))


def grouped_logits(
    supernet: torch.nn.Module, arch, params: Mapping[str, torch.Tensor], x: torch.Tensor, step: int
):
    """Logits ``[tasks, images, classes]`` of sub-net ``arch`` for ``x`` ``[tasks, images, C, H, W]``
    with BN batch statistics of inner step ``step`` (clamped to the super-net's last row).

    ``params`` are the sub-net's sliced tensors (:meth:`SuperNet.sliced_parameters`), each with or
    without a leading task dimension."""
    tasks, images = x.shape[:2]
    step = min(step, int(getattr(supernet, "bn_steps", 1)) - 1)
    h = x.transpose(0, 1).reshape(images, tasks * x.shape[2], *x.shape[3:])
    for block in supernet.plan(arch):
        identity = h
        last = len(block.convs) - 1
        for position, conv in enumerate(block.convs):
            prefix = f"layers.{conv.layer}"
            h = _conv(h, params[f"{prefix}.conv.weight"], tasks, conv.stride)
            h = _batch_norm(h, params[f"{prefix}.bn.weight"], params[f"{prefix}.bn.bias"], step, tasks)
            if block.shortcut < 0 or position < last:
                h = conv.activation(h)
        if block.shortcut >= 0:
            prefix = f"shortcuts.{block.shortcut}"
            shortcut = _conv(identity, params[f"{prefix}.conv.weight"], tasks, block.shortcut_stride)
            shortcut = _batch_norm(
                shortcut, params[f"{prefix}.bn.weight"], params[f"{prefix}.bn.bias"], step, tasks
            )
            h = block.convs[last].activation(h + shortcut)
    return _pool_and_classify(h, params["head.weight"], params["head.bias"], tasks)
