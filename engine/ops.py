"""Building blocks shared by the super-net, extracted sub-nets and layer profiling.

Two kinds of op live here:

* plain, export-friendly modules (``make_activation``, ``FixedAvgPool2d``) used by
  extracted sub-nets and by ``LayerSpec.build_module`` (what a device profiles is
  exactly what gets deployed);
* elastic ops with weight sharing (``ElasticConv2d``, ``ElasticBatchNorm2d``,
  ``ElasticLinear``): one tensor at the largest size, a sub-net uses the centre of
  the kernel and the leading channels (once-for-all style slicing).

The elastic ops take the active sizes as call arguments instead of holding an
"active sub-net" as hidden state, so ``torch.func.functional_call``/``grad``/``vmap``
see a pure function of (parameters, buffers, input, architecture).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import batch_norm_train, is_functorch_wrapped

ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "relu6": nn.ReLU6,
    "leakyrelu": nn.LeakyReLU,  # negative_slope 0.01, same as F.leaky_relu's default
}

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "elu": F.elu,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "leakyrelu": F.leaky_relu,
}

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (timm-style factory)."""
    try:
        return ACTIVATION_MODULES[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATION_MODULES)}"
        ) from None


def adaptive_pool_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out_size, in_size] averaging matrix reproducing ``adaptive_avg_pool`` bins along one axis.

    Bin i covers ``[floor(i*in/out), ceil((i+1)*in/out))`` exactly as PyTorch's
    adaptive pooling does, also when ``out_size > in_size`` (bins then repeat pixels).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"pool sizes must be positive, got in_size={in_size}, out_size={out_size}")
    matrix = torch.zeros(out_size, in_size, dtype=dtype)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


#: ``ElasticLinear.forward`` folds the pooling into the classifier for feature maps of
#: at most this many pixels (8x8) and pools first above it. Timed with benchmarks/pool_head.py
#: (1 thread, 2-core AMD EPYC): the head alone, forward and backward of 320 images, was 20-36x
#: faster folded at 1x1 and 2x2, 5-6x at 6x6 and 7x7, 1.8x at 14x14 and even at 28x28; but in
#: whole GA evaluations of 16 random sub-nets, the four ending at 14x14 with 8-16 channels were
#: 5-20 % slower folded (pooling 14x14 first leaves the classifier 8x less work), while those
#: ending at 2x2-7x7 were up to 1.42x faster.
FOLD_POOL_MAX_PIXELS = 64

_POOLING_MATRICES: dict[tuple[int, int, int, torch.device, torch.dtype], torch.Tensor] = {}


def pooling_matrix(
    height: int, width: int, out_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[out_size**2, height*width]``: ``adaptive_avg_pool2d(x, out_size)`` of one ``[H, W]`` map
    as a matrix on its flattened pixels (row-major on both sides), cached per size, device and
    dtype. A constant: never a parameter or buffer, so checkpoints and ``functional_call`` do not
    see it."""
    key = (height, width, out_size, torch.device(device), dtype)
    matrix = _POOLING_MATRICES.get(key)
    if matrix is None:
        # Built in float64 so a float64 caller gets 1/3 to float64 precision.
        rows = adaptive_pool_matrix(height, out_size, torch.float64)
        cols = adaptive_pool_matrix(width, out_size, torch.float64)
        matrix = torch.kron(rows, cols).to(device=device, dtype=dtype)
        _POOLING_MATRICES[key] = matrix
    return matrix


def fold_pooling(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A classifier weight ``[..., classes, C, p, p]`` on pooled features as one on ``H x W`` maps,
    ``[..., classes, C*H*W]``: the weight times the pooling matrix (:func:`pooling_matrix`), so
    ``linear(x.flatten(), folded) == linear(adaptive_avg_pool2d(x, p).flatten(), weight)``."""
    *leading, channels, pool, _ = weight.shape
    matrix = pooling_matrix(height, width, pool, weight.device, weight.dtype)  # [p*p, H*W]
    folded = torch.matmul(weight.reshape(*leading, channels, pool * pool), matrix)
    return folded.reshape(*leading, channels * height * width)


def pool_maps(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, out_size)`` of maps ``[..., H, W]`` as one matrix product over
    their flattened pixels (:func:`pooling_matrix`; same bins, sums in another order).

    Why: CPU ``adaptive_avg_pool2d`` is slow on these maps. As one GEMM, forward and backward of
    the pooling alone took 1.9-4.8x less time, and whole GA evaluations of sub-nets ending at 14x14
    1.38x less (benchmarks/pool_head.py, Intel Xeon, 1 thread; docs/BENCHMARKS.md, "Pooling as one
    matrix product"). Matmul has every derivative MAML++ needs."""
    height, width = x.shape[-2:]
    matrix = pooling_matrix(height, width, out_size, x.device, x.dtype)  # [p*p, H*W]
    return torch.matmul(x.flatten(-2), matrix.t()).unflatten(-1, (out_size, out_size))


def pool_or_fold(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and the flat classifier weight that together give the pooled classifier's logits.

    ``x`` holds maps ``[..., C, H, W]``, ``weight`` is ``[..., classes, C, p, p]`` (for pooled
    features). Returns ``(x, weight [..., classes, C*h*w])``, where a ``p x p`` map is used as is
    (it is its own pooling), a map of up to ``FOLD_POOL_MAX_PIXELS`` keeps its pixels and gets
    the folded weight (:func:`fold_pooling`), and a larger one is pooled first. Both
    :class:`ElasticLinear` and the GA's grouped path (engine.search.grouped) classify this way."""
    height, width = x.shape[-2:]
    pool = weight.shape[-1]
    if (height, width) != (pool, pool):
        if height * width > FOLD_POOL_MAX_PIXELS:
            x = pool_maps(x, pool)
        else:
            return x, fold_pooling(weight, height, width)
    return x, weight.flatten(-3)


class FixedAvgPool2d(nn.Module):
    """Adaptive average pooling for one known input size, as two small matmuls.

    The legacy ONNX exporter refuses ``adaptive_avg_pool2d`` when the output size does
    not divide the input size (14 -> 5, or 2 -> 5 after four stride-2 layers on 28x28),
    so extracted sub-nets pool with a fixed averaging matrix instead. It computes the
    same bins as ``F.adaptive_avg_pool2d``; it has buffers only, no parameters.
    """

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        rows = adaptive_pool_matrix(in_size, out_size)
        self.register_buffer("rows", rows)
        self.register_buffer("cols_t", rows.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols_t)

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}"


def crop_conv_weight(weight: torch.Tensor, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
    """The leading ``out x in`` channels and the centred ``kernel x kernel`` part of a conv weight.

    Centred on the tensor's own size, not a module's max kernel: a weight already cropped to a
    sub-net (``SuperNet.sliced_parameters``) crops to itself, a no-op.
    """
    start = (weight.shape[-1] - kernel) // 2
    return weight[:out_channels, :in_channels, start : start + kernel, start : start + kernel]


def same_padded_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """A bias-free convolution with odd kernels and padding ``kernel // 2``, as every super-net
    layer is (``groups`` > 1: the GA's grouped path, one group per task)."""
    kernel = weight.shape[-1]
    if kernel == 1 and stride > 1:
        # Same result as a strided 1x1 convolution: keep every stride-th pixel, then a 1x1
        # convolution at stride 1. On torch 2.13 (CPU, AMD EPYC) oneDNN's weight gradient of
        # the strided 1x1 convolution corrupted the heap ("double free or corruption"; gdb:
        # mkldnn_convolution_backward_weights), killing adaption jobs mid-search.
        return F.conv2d(x[:, :, ::stride, ::stride], weight, groups=groups)
    return F.conv2d(x, weight, None, stride, kernel // 2, 1, groups)


class ElasticConv2d(nn.Module):
    """A conv whose weight is stored at the largest size; calls use a centred sub-kernel
    and the leading input/output channels (weight sharing across every sub-net)."""

    def __init__(self, max_in_channels: int, max_out_channels: int, max_kernel: int) -> None:
        super().__init__()
        if max_kernel % 2 == 0:
            raise ValueError(f"elastic kernels must be odd, got max_kernel={max_kernel}")
        self.max_in_channels = max_in_channels
        self.max_out_channels = max_out_channels
        self.max_kernel = max_kernel
        self.weight = nn.Parameter(torch.empty(max_out_channels, max_in_channels, max_kernel, max_kernel))
        # He init on the full tensor (fan_out, as for ResNet/once-for-all convs followed by BN).
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def sub_weight(self, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
        """View of the shared weight used by a (in_channels, out_channels, kernel) sub-layer."""
        return crop_conv_weight(self.weight, in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int, stride: int) -> torch.Tensor:
        return same_padded_conv2d(x, self.sub_weight(x.shape[-3], out_channels, kernel), stride)

    def extra_repr(self) -> str:
        return f"max_in={self.max_in_channels}, max_out={self.max_out_channels}, max_kernel={self.max_kernel}"


class ElasticBatchNorm2d(nn.Module):
    """BatchNorm over the leading channels, with MAML++ per-step statistics and affine params.

    ``weight``/``bias``/``running_mean``/``running_var`` have shape ``[bn_steps, C_max]``;
    inner-loop step ``step`` uses row ``step``. Training mode normalises with the batch
    statistics and (when ``track_stats``) updates row ``step`` of the running stats in
    place (also under ``vmap`` when the buffers are batched per task); eval mode normalises
    with row ``step`` of the running stats. ``track_stats=False`` leaves the buffers
    untouched, which ``torch.func.vmap`` needs when the buffers are *not* batched (no in-place
    writes of batched values into unbatched buffers).
    """

    def __init__(self, max_channels: int, bn_steps: int = 1) -> None:
        super().__init__()
        if bn_steps < 1:
            raise ValueError(f"bn_steps must be >= 1, got {bn_steps}")
        self.max_channels = max_channels
        self.bn_steps = bn_steps
        self.weight = nn.Parameter(torch.ones(bn_steps, max_channels))
        self.bias = nn.Parameter(torch.zeros(bn_steps, max_channels))
        self.register_buffer("running_mean", torch.zeros(bn_steps, max_channels))
        self.register_buffer("running_var", torch.ones(bn_steps, max_channels))

    def forward(self, x: torch.Tensor, step: int = 0, track_stats: bool = True) -> torch.Tensor:
        channels = x.shape[-3]
        weight = self.weight[step, :channels]
        bias = self.bias[step, :channels]
        if self.training:
            if track_stats and is_functorch_wrapped(self.running_mean):
                self._update_running_stats(x, step, channels)
            elif track_stats:
                # Row views of the buffers: batch_norm updates them in place.
                return batch_norm_train(
                    x,
                    weight,
                    bias,
                    self.running_mean[step, :channels],
                    self.running_var[step, :channels],
                    BN_MOMENTUM,
                    BN_EPS,
                )
            return batch_norm_train(x, weight, bias, None, None, 0.0, BN_EPS)
        return F.batch_norm(
            x,
            self.running_mean[step, :channels],
            self.running_var[step, :channels],
            weight,
            bias,
            False,
            0.0,
            BN_EPS,
        )

    def _update_running_stats(self, x: torch.Tensor, step: int, channels: int) -> None:
        """``running = (1 - momentum) * running + momentum * batch`` (unbiased variance), as
        ``F.batch_norm`` does in training mode, but written out. Used when the buffers are
        per-task ``torch.func`` inputs (the ``vmap`` meta-training strategy): there
        ``F.batch_norm``'s own in-place update of a row view of a batched buffer is silently
        lost, while an explicit in-place update of the same view is kept."""
        with torch.no_grad():
            reduce = tuple(d for d in range(x.dim()) if d != x.dim() - 3)  # all but the channels
            var, mean = torch.var_mean(x.detach(), dim=reduce, correction=1)
            self.running_mean[step, :channels].mul_(1 - BN_MOMENTUM).add_(mean, alpha=BN_MOMENTUM)
            self.running_var[step, :channels].mul_(1 - BN_MOMENTUM).add_(var, alpha=BN_MOMENTUM)

    def extra_repr(self) -> str:
        return f"max_channels={self.max_channels}, bn_steps={self.bn_steps}"


class ElasticLinear(nn.Module):
    """Average pooling to ``p x p`` and the classifier, for feature maps of any C <= C_max.

    The weight is stored as ``[classes, C_max, p, p]``; a sub-net with C channels uses
    ``weight[:, :C]`` flattened in the same (channel, row, col) order as ``x.flatten(1)``,
    so the extracted ``nn.Linear(C*p*p, classes)`` computes exactly the same logits.
    """

    def __init__(self, max_channels: int, pool_size: int, num_classes: int) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.pool_size = pool_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, max_channels, pool_size, pool_size))
        self.bias = nn.Parameter(torch.empty(num_classes))
        bound = 1.0 / math.sqrt(max_channels * pool_size * pool_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def sub_weight(self, channels: int) -> torch.Tensor:
        return self.weight[:, :channels].reshape(self.num_classes, channels * self.pool_size * self.pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of feature maps ``[B, C, H, W]``: average-pooled to ``pool_size`` x ``pool_size``
        (``F.adaptive_avg_pool2d``'s bins; a map of that size already is its own pooling), then
        the linear classifier.

        Both steps are linear in ``x``, so for small maps the averaging is folded into the
        classifier: a ``[classes, C*H*W]`` weight (the head's weight times the pooling matrix)
        applied to ``x`` directly. The same bins and sums in another order - the logits agree with
        pooling first to float rounding. It matters because CPU ``adaptive_avg_pool2d`` is slow on
        the tiny maps a sub-net ends with: pooling 320 maps of 32x2x2 up to 5x5 and back took 4.5
        ms, the folded head 0.18 ms (benchmarks/pool_head.py). Maps above ``FOLD_POOL_MAX_PIXELS``
        pool first (folding multiplies the classifier's work by ``H*W / pool_size**2``).
        """
        x, weight = pool_or_fold(x, self.weight[:, : x.shape[-3]])
        return F.linear(x.flatten(-3), weight, self.bias)

    def extra_repr(self) -> str:
        return f"max_channels={self.max_channels}, pool_size={self.pool_size}, num_classes={self.num_classes}"
