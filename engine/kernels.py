"""Hand-written autograd kernels that compute what ATen computes, faster for second-order MAML on a CPU.

Second-order MAML++ differentiates the inner loop's backward pass (``create_graph=True``), so every
BatchNorm and max-pool in the net is differentiated twice. On the 2-core CPU, profiling a
meta-iteration of the 4-conv MAML++ net (docs/META_TRAINING.md) showed two costs that are not the
convolutions' arithmetic:

* ATen's BatchNorm double backward (``batchnorm_double_backward``) is written for every case and
  runs a long chain of full-size element-wise products: about a fifth of the iteration.
* ATen's NCHW ``max_pool2d_with_indices`` forward is several times slower than the handful of
  element-wise ops that compute the same maxima and indices.

:func:`batch_norm_train` keeps ATen's forward and first backward and replaces only the double
backward by its closed form (three per-channel reductions, then two linear combinations).
:func:`max_pool2d_2x2` computes ``F.max_pool2d(x, 2)``'s values *and indices* (the same first-index
tie-break) with element-wise ops and hands the indices to ATen's own backward, so its gradient and
second derivative are ATen's. Tests compare both with ATen in float64 (tests/engine/test_kernels.py).

:func:`batch_norm_train` uses its own kernel only inside :func:`double_backward_kernels`, which the
MAML++ learner enters for second-order inner loops. :func:`reference_kernels` switches both back to
plain ``F.batch_norm`` / ``F.max_pool2d``: benchmarks/maml_speed.py runs its per-task-loop reference
under it, so the reference stays the straightforward implementation the MAML++ code is.
Under ``torch.func`` transforms (``vmap``, ``grad``) the ATen ops are always used: these autograd
functions have no batching rules.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch.autograd import Function

_state = threading.local()


@contextmanager
def _switched_on(name: str) -> Iterator[None]:
    """Set this thread's switch ``name`` for the duration of the block."""
    previous = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def reference_kernels() -> AbstractContextManager[None]:
    """Within the block (in this thread), BatchNorm and max-pool run as plain ATen ops, whatever
    :func:`double_backward_kernels` says."""
    return _switched_on("reference")


def double_backward_kernels() -> AbstractContextManager[None]:
    """Within the block (in this thread), BatchNorm in training mode gets the closed-form double
    backward. Entered around work that will be differentiated twice (second-order MAML): where
    only a first backward follows, the extra autograd node costs more than it saves (about 9 %
    of a first-order GA fitness evaluation, measured)."""
    return _switched_on("double_backward")


def using_reference_kernels() -> bool:
    return getattr(_state, "reference", False)


def using_double_backward_kernels() -> bool:
    """Whether BatchNorm gets the closed-form double backward here (this thread, right now)."""
    return getattr(_state, "double_backward", False) and not using_reference_kernels()


def is_functorch_wrapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func`` input (batched by ``vmap`` or tracked by ``grad``).
    torch has no public test for this."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(tensor))


def _under_functorch(*tensors: torch.Tensor | None) -> bool:
    """Inside a ``torch.func`` transform (even for a captured, unwrapped tensor), where these
    autograd functions, which have no batching rules, must not run."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        return True
    return any(t is not None and is_functorch_wrapped(t) for t in tensors)


def _channel(values: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``[N, C, H, W]``."""
    return values.view(1, -1, 1, 1)


class _BatchNormTrainBackward(Function):
    """BatchNorm's first backward (ATen's kernel), with a closed-form backward of its own.

    With ``x̂ = (x - mean) * s`` (``s`` = 1/std, per channel, ``M`` elements per channel), the first
    backward is ``gβ = Σ gy``, ``gγ = Σ gy·x̂`` and ``gx = γ s (gy - gβ/M - x̂ gγ/M)``. Its derivative
    for incoming ``ggx``, ``ggγ``, ``ggβ`` needs only ``A = Σ ggx·gy``, ``B = Σ ggx``, ``D = Σ ggx·x̂``:

    * ``d gy = γ s (ggx - B/M - x̂ D/M) + ggγ x̂ + ggβ``
    * ``d γ  = s (A - gβ B/M - gγ D/M)``
    * ``d x  = -(γ s²/M) (K x̂ + D (gy - gβ/M - x̂ gγ/M) + gγ (ggx - B/M - x̂ D/M))
                + ggγ s (gy - gβ/M - x̂ gγ/M)``,  ``K = A - gβ B/M - gγ D/M``

    (from ``δx̂ = s P(δx)``, ``δs = -s² mean(x̂ δx)`` with the symmetric projection
    ``P(v) = v - mean(v) - x̂ mean(v x̂)``).
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, mean, invstd, eps):  # type: ignore[override]
        grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
        ctx.save_for_backward(grad_out, x, weight)
        # Unused outputs (ggγ, ggβ when BatchNorm is outside the inner loop) arrive as None, not as
        # zero tensors to multiply.
        ctx.set_materialize_grads(False)
        # Copies: an output kept on its own node's context is a reference cycle through C++ that
        # nothing frees (it kept every meta-iteration's graph alive, gigabytes per minute), and a
        # detached alias would change with an in-place edit of the returned gradient.
        ctx.mean, ctx.invstd = mean, invstd
        ctx.sum_gy, ctx.sum_gy_xhat = grad_bias.detach().clone(), grad_weight.detach().clone()
        return grad_in, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):  # type: ignore[override]
        if torch.is_grad_enabled():
            # Computing this with create_graph=True means a third derivative is wanted; the closed
            # form treats x̂ and s as constants, so it would be silently wrong. Nothing here needs it.
            raise RuntimeError(
                "batch_norm_train's double backward cannot be differentiated again; "
                "run under engine.kernels.reference_kernels() for third derivatives"
            )
        gy, x, weight = ctx.saved_tensors
        s, b, c = ctx.invstd, ctx.sum_gy, ctx.sum_gy_xhat
        m = x.numel() // x.shape[1]
        dims = (0, 2, 3)
        xhat = (x - _channel(ctx.mean)) * _channel(s)
        zero = torch.zeros_like(s)
        ggw = zero if ggw is None else ggw
        ggb = zero if ggb is None else ggb
        if ggx is None:
            a = big_b = d = zero
        else:
            a = (ggx * gy).sum(dims)
            big_b = ggx.sum(dims)
            d = (ggx * xhat).sum(dims)
        k = a - b * big_b / m - c * d / m
        gs = weight * s
        d_gy = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_gy = torch.addcmul(_channel(ggb - gs * big_b / m), xhat, _channel(ggw - gs * d / m))
            if ggx is not None:
                d_gy.addcmul_(ggx, _channel(gs))
        if ctx.needs_input_grad[1]:
            g2 = gs * s / m
            d_x = torch.addcmul(
                _channel(g2 * (d * b / m + c * big_b / m) - ggw * s * b / m),
                xhat,
                _channel(-g2 * (k - 2 * c * d / m) - ggw * s * c / m),
            )
            d_x.addcmul_(gy, _channel(-g2 * d + ggw * s))
            if ggx is not None:
                d_x.addcmul_(ggx, _channel(-g2 * c))
        if ctx.needs_input_grad[2]:
            d_w = s * k
        return d_gy, d_x, d_w, None, None, None


class _BatchNormTrain(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        # ATen's forward, which also updates the running statistics in place as F.batch_norm does.
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd, ctx.eps = mean, invstd, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_in, grad_weight, grad_bias = _BatchNormTrainBackward.apply(
            grad_out, x, weight, ctx.mean, ctx.invstd, ctx.eps
        )
        return grad_in, grad_weight, grad_bias, None, None, None, None


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)``; for
    ``[N, C, H, W]`` input on the CPU inside :func:`double_backward_kernels`, with a closed-form
    double backward (ATen's op otherwise)."""
    if (
        not using_double_backward_kernels()
        or weight is None
        or bias is None
        or x.dim() != 4
        or x.numel() < 2 * x.shape[1]  # one value per channel (or none): ATen's error
        or x.device.type != "cpu"
        or _under_functorch(x, weight, bias, running_mean)
    ):
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class _MaxPool2x2(Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        height, width = x.shape[-2] // 2, x.shape[-1] // 2
        rows, cols = 2 * height, 2 * width
        top_left, top_right = x[..., 0:rows:2, 0:cols:2], x[..., 0:rows:2, 1:cols:2]
        bottom_left, bottom_right = x[..., 1:rows:2, 0:cols:2], x[..., 1:rows:2, 1:cols:2]
        out = torch.maximum(torch.maximum(top_left, top_right), torch.maximum(bottom_left, bottom_right))
        # max_pool2d's index is the first maximum in row-major order: offset 0 (top left) unless it
        # is smaller, then 1 (top right) unless that is smaller, then one row down, then the last.
        not_tl = (top_left != out).to(torch.int32)
        not_tr = (top_right != out).to(torch.int32)
        not_bl = (bottom_left != out).to(torch.int32)
        in_width = x.shape[-1]
        offset = not_tl * (1 + not_tr * ((in_width - 1) + not_bl))
        corner = torch.arange(height, dtype=torch.int32, device=x.device).view(-1, 1) * (2 * in_width)
        corner = corner + torch.arange(width, dtype=torch.int32, device=x.device).view(1, -1) * 2
        ctx.save_for_backward(x)
        # Contiguous, or channels-last like the input: ATen's double backward views the indices as
        # [N, C, -1], which a transposed layout (what maximum() gives a transposed input) breaks.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        ctx.indices = (offset + corner).to(torch.int64).contiguous(memory_format=layout)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # ATen's own backward, recorded by autograd when differentiated again.
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False, ctx.indices
        )


def max_pool2d_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (floor mode) for ``[N, C, H, W]`` input: the same values, indices,
    gradient and second derivative (NaN inputs aside), with a faster forward on the CPU."""
    if (
        using_reference_kernels()
        or x.dim() != 4
        or min(x.shape[-2:]) < 2  # ATen's errors for an empty output or input
        or x.numel() == 0
        or x.device.type != "cpu"
        or _under_functorch(x)
    ):
        return F.max_pool2d(x, 2)
    return _MaxPool2x2.apply(x)
