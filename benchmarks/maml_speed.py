"""MAML++ meta-iteration speed: our parallel paths against the per-task-loop reference.

Same network, configuration, data and machine in one process; the two implementations are
timed in alternation (so background load hits both alike) and the medians are compared. The
meta-gradients of both are checked to agree first (same math; in float32 only rounding differs,
in float64 they agree to 1e-16 / 1e-10 with the kernels, see tests/engine/test_maml.py and
tests/engine/test_kernels.py).

Configurations (MAML++ reference settings, second order, multi-step loss on, 5 inner steps):
- Omniglot 20-way 1-shot, 1 query per class, 28x28x1, 64 filters, meta-batch 8;
- Mini-ImageNet-shaped 5-way 1-shot, 15 queries per class, 84x84x3, 48 filters, meta-batch 2;
images are synthetic (speed does not depend on pixel values).

The reference is the per-task loop with ATen's BatchNorm and max-pool (engine.kernels.reference_kernels);
ours uses engine.kernels' hand-written ones (closed-form BatchNorm double backward, faster max-pool
forward; same math), and on the CPU splits the tasks two ways: the ``threads`` strategy (tasks in
worker threads) and the ``processes`` strategy (tasks in worker processes, the production default).
``kernels_only_speedup_*`` is the 1-thread loop with our kernels against the 1-thread reference. ``speedup_*`` is the
production path's; ``speedup_threads_*`` the threads strategy's. With ``--device cuda`` both run
on the GPU and ours is the ``vmap`` strategy (all tasks of a meta-batch as one batched kernel per
layer), the production path there; the reference is the same per-task loop.

    python benchmarks/maml_speed.py [--quick] [--threads 2] [--rounds 5] [--device cuda]

Last line: JSON with speedup_omniglot, speedup_miniimagenet, it_per_s_omniglot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.baselines import MamlConvNet  # noqa: E402
from engine.kernels import reference_kernels  # noqa: E402
from engine.meta.maml import MamlConfig, MamlLearner  # noqa: E402
from engine.meta.runs import DEVICES, default_strategy  # noqa: E402
from engine.meta.synthetic import SyntheticTasks  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    ways: int
    queries: int
    channels: int
    size: int
    filters: int
    meta_batch: int


SETTINGS = (
    Setting("omniglot", ways=20, queries=1, channels=1, size=28, filters=64, meta_batch=8),
    Setting("miniimagenet", ways=5, queries=15, channels=3, size=84, filters=48, meta_batch=2),
)


def build(setting: Setting, threads: int, strategy: str, channels_last: bool, device: str) -> MamlLearner:
    torch.manual_seed(0)
    net = MamlConvNet(setting.channels, setting.size, setting.ways, filters=setting.filters, bn_steps=5)
    config = MamlConfig(
        inner_steps=5,
        inner_lr=0.1 if setting.name == "omniglot" else 0.01,
        multi_step_epochs=10,
        second_order=True,
        strategy=strategy,
        workers=threads,
        channels_last=channels_last,
    )
    return MamlLearner(net, config).to(device)


def one_iteration(learner: MamlLearner, batch, intra_op_threads: int, aten: bool = False) -> float:
    """Seconds for one meta-iteration; ``aten``: with ATen's BatchNorm and max-pool instead of
    engine.kernels' (how the reference runs)."""
    torch.set_num_threads(intra_op_threads)
    learner.zero_grad(set_to_none=True)
    cuda = batch.support_x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with reference_kernels() if aten else contextlib.nullcontext():
        learner.meta_step(batch, epoch=0)
    if cuda:
        torch.cuda.synchronize()  # the meta-gradient is done, not only queued
    return time.perf_counter() - start


def relative_gradient_difference(a: MamlLearner, b: MamlLearner) -> float:
    """||g_a - g_b|| / ||g_a|| over all meta-parameters together.

    (Per-tensor ratios are meaningless for tensors whose true gradient is zero, e.g. conv
    biases in front of BatchNorm: there both sides hold only float32 rounding noise.)
    """
    diff = sum(
        float((pa.grad - pb.grad).pow(2).sum())
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
        if pa.grad is not None
    )
    norm = sum(float(pa.grad.pow(2).sum()) for pa in a.parameters() if pa.grad is not None)
    return (diff / norm) ** 0.5


def measure(
    setting: Setting, threads: int, rounds: int, channels_last: bool, device: str
) -> dict[str, float]:
    source = SyntheticTasks(
        setting.ways, 1, setting.queries, channels=setting.channels, image_size=setting.size
    )
    batch = source(np.random.default_rng(0), setting.meta_batch).to(device)
    production = default_strategy(device)
    ours_strategies = ("threads", "processes") if device == "cpu" else (production,)
    reference = build(setting, threads, "loop", False, device)
    ours = {
        strategy: build(setting, threads, strategy, channels_last, device) for strategy in ours_strategies
    }
    for learner in ours.values():
        learner.load_state_dict(reference.state_dict())
    # On the CPU the reference as the MAML++ code runs it (all cores intra-op, ATen's kernels) and
    # with one intra-op thread (sometimes faster for such small ops): we compare against the
    # faster. "loop_kernels_1thread" is the 1-thread reference with engine.kernels' BatchNorm and
    # max-pool, which every strategy uses: what the kernels alone save.
    variants = {"reference": (reference, threads, True)}
    if device == "cpu":
        variants["reference_1thread"] = (reference, 1, True)
        variants["loop_kernels_1thread"] = (reference, 1, False)
    variants.update({strategy: (learner, threads, False) for strategy, learner in ours.items()})
    try:
        one_iteration(reference, batch, threads, aten=True)  # warm-up, and gradients to compare
        difference = {}
        for strategy, learner in ours.items():
            one_iteration(learner, batch, threads)
            difference[strategy] = relative_gradient_difference(reference, learner)
        for learner, intra_op, aten in variants.values():  # a second warm-up (CUDA kernels, caches)
            one_iteration(learner, batch, intra_op, aten)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (learner, intra_op, aten) in variants.items():
                times[name].append(one_iteration(learner, batch, intra_op, aten))
    finally:
        for learner in ours.values():
            learner.close_workers()
    torch.set_num_threads(threads)
    median = {name: statistics.median(values) for name, values in times.items()}
    best_reference = min(median["reference"], median.get("reference_1thread", math.inf))
    speedup = {strategy: best_reference / median[strategy] for strategy in ours}
    if device == "cpu":
        print(
            f"{setting.name:13s} {setting.ways}-way 1-shot {setting.size}x{setting.size}x{setting.channels}, "
            f"meta-batch {setting.meta_batch}: reference {median['reference']:.3f} s/it ({threads} threads), "
            f"{median['reference_1thread']:.3f} s/it (1 thread); threads strategy {median['threads']:.3f} s/it "
            f"({speedup['threads']:.2f}x); processes strategy {median['processes']:.3f} s/it "
            f"({speedup['processes']:.2f}x vs the faster reference); relative gradient difference "
            f"{difference['threads']:.1e} / {difference['processes']:.1e}; engine.kernels alone: loop "
            f"{median['loop_kernels_1thread']:.3f} s/it (1 thread), "
            f"{median['reference_1thread'] / median['loop_kernels_1thread']:.2f}x the 1-thread reference"
        )
    else:
        print(
            f"{setting.name:13s} {setting.ways}-way 1-shot {setting.size}x{setting.size}x{setting.channels}, "
            f"meta-batch {setting.meta_batch} on {torch.cuda.get_device_name()}: reference loop "
            f"{median['reference']:.4f} s/it; vmap strategy {median[production]:.4f} s/it "
            f"({speedup[production]:.2f}x); relative gradient difference {difference[production]:.1e}"
        )
    print("  all timings (s):", {name: [round(t, 4) for t in values] for name, values in times.items()})
    return {
        "reference_s": median["reference"],
        "reference_1thread_s": median.get("reference_1thread", math.nan),
        "kernels_only_speedup": median.get("reference_1thread", math.nan)
        / median.get("loop_kernels_1thread", math.nan),
        "ours_s": median[production],
        "speedup": speedup[production],
        "speedup_threads": speedup.get("threads", math.nan),
        "grad_rel_diff": max(difference.values()),
    }


def _rounded(value: float, digits: int = 4) -> float | None:
    """JSON has no NaN: figures that do not exist on this device are null."""
    return None if math.isnan(value) else round(value, digits)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 timed round per setting (about a minute on an idle 2-core CPU)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="cores for both implementations")
    parser.add_argument("--channels-last", action="store_true", help="channels-last inputs in our path")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="run both paths here")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 convolutions and matmuls (CUDA)")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape (CUDA)"
    )
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    # As meta-training on CUDA runs (engine.meta.runs.build_run): full float32, unless --tf32.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, {rounds} rounds"
    )
    results = {
        setting.name: measure(setting, args.threads, rounds, args.channels_last, args.device)
        for setting in SETTINGS
    }
    print(
        json.dumps(
            {
                "speedup_omniglot": round(results["omniglot"]["speedup"], 3),
                "speedup_miniimagenet": round(results["miniimagenet"]["speedup"], 3),
                "speedup_threads_omniglot": _rounded(results["omniglot"]["speedup_threads"], 3),
                "speedup_threads_miniimagenet": _rounded(results["miniimagenet"]["speedup_threads"], 3),
                "production_strategy": default_strategy(args.device),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "it_per_s_omniglot": round(1 / results["omniglot"]["ours_s"], 4),
                "s_per_it_reference_omniglot": round(results["omniglot"]["reference_s"], 4),
                "s_per_it_reference_1thread_omniglot": _rounded(results["omniglot"]["reference_1thread_s"]),
                "kernels_only_speedup_omniglot": _rounded(results["omniglot"]["kernels_only_speedup"], 3),
                "kernels_only_speedup_miniimagenet": _rounded(
                    results["miniimagenet"]["kernels_only_speedup"], 3
                ),
                "grad_rel_diff_max": max(r["grad_rel_diff"] for r in results.values()),
                "threads": args.threads,
                "cudnn_benchmark": args.cudnn_benchmark,
                "tf32": args.tf32,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
