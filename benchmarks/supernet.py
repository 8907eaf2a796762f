"""Search-space sizes, baseline costs and how fast a random sub-net is sampled, extracted and run.

    python benchmarks/supernet.py --quick

Prints human-readable figures, then one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.baselines import ceil_pooling_macs, maml_miniimagenet, maml_omniglot  # noqa: E402
from engine.cost import arch_macs, arch_params, count_macs, count_params  # noqa: E402
from engine.seeding import seed_everything  # noqa: E402
from engine.space import SearchSpace  # noqa: E402
from engine.supernet import SuperNet, extract_subnet  # noqa: E402

PAPER = {
    "maml_omniglot20_params": 113.21e3,
    "maml_miniimagenet5_params": 70.09e3,
    "maml_omniglot20_macs": 10.07e6,
    "maml_miniimagenet5_macs": 57.38e6,
    "resnet12_space_size": 2e24,
    "vgg9_space_size": 126**4 * 4,
}


def time_sample_extract_forward(space: SearchSpace, batch: int, repeats: int, seed: int) -> dict[str, float]:
    """Median ms of: sample an arch, extract its sub-net, forward one batch (eval, no grad)."""
    rngs = seed_everything(seed)
    net = SuperNet(space, bn_steps=5).eval()
    x = torch.randn(batch, space.in_channels, space.image_size, space.image_size, generator=rngs.torch)
    sample_ms, extract_ms, forward_ms, total_ms = [], [], [], []
    for _ in range(2):  # warm-up (allocator, lazy init)
        with torch.no_grad():
            extract_subnet(net, space.sample(rngs.numpy))(x)
    for _ in range(repeats):
        t0 = time.perf_counter()
        arch = space.sample(rngs.numpy)
        t1 = time.perf_counter()
        sub = extract_subnet(net, arch)
        t2 = time.perf_counter()
        with torch.no_grad():
            sub(x)
        t3 = time.perf_counter()
        sample_ms.append((t1 - t0) * 1e3)
        extract_ms.append((t2 - t1) * 1e3)
        forward_ms.append((t3 - t2) * 1e3)
        total_ms.append((t3 - t0) * 1e3)
    return {
        "total_ms": statistics.median(total_ms),
        "sample_ms": statistics.median(sample_ms),
        "extract_ms": statistics.median(extract_ms),
        "forward_ms": statistics.median(forward_ms),
    }


def time_supernet_train_step(space: SearchSpace, batch: int, repeats: int, seed: int) -> float:
    """Median ms of one super-net forward + backward (train mode) on a random arch: the meta-training hot path."""
    rngs = seed_everything(seed)
    net = SuperNet(space, bn_steps=5).train()
    x = torch.randn(batch, space.in_channels, space.image_size, space.image_size, generator=rngs.torch)
    y = torch.randint(0, space.num_classes, (batch,), generator=rngs.torch)
    timings = []
    for index in range(repeats + 2):
        arch = space.sample(rngs.numpy)
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, arch, step=index % 5), y).backward()
        if index >= 2:
            timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per figure")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    repeats = args.repeats or (30 if args.quick else 200)
    torch.set_num_threads(args.threads)

    vgg9 = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=20)
    resnet12 = SearchSpace.resnet12(in_channels=3, image_size=84, num_classes=5)
    vgg9_mini = SearchSpace.vgg9(in_channels=3, image_size=84, num_classes=5)
    omniglot, mini = maml_omniglot(ways=20), maml_miniimagenet(ways=5)
    result: dict[str, object] = {
        "vgg9_space_size": vgg9.size(),
        "vgg9_distinct_size": vgg9.distinct_size(),
        "vgg9_lut_entries_omniglot": len(vgg9.all_layer_specs()),
        "resnet12_space_size": resnet12.size(),
        "resnet12_distinct_size": resnet12.distinct_size(),
        "resnet12_lut_entries_miniimagenet": len(resnet12.all_layer_specs()),
        "maml_omniglot20_params": count_params(omniglot),
        "maml_miniimagenet5_params": count_params(mini),
        "maml_omniglot20_macs": count_macs(omniglot, (1, 28, 28)),
        "maml_miniimagenet5_macs": count_macs(mini, (3, 84, 84)),
        "maml_omniglot20_macs_ceil_sizes": ceil_pooling_macs(1, 28, 20, 64),
        "maml_miniimagenet5_macs_ceil_sizes": ceil_pooling_macs(3, 84, 5, 48),
        "vgg9_largest_omniglot_params": arch_params(vgg9, vgg9.largest()),
        "vgg9_largest_omniglot_macs": arch_macs(vgg9, vgg9.largest()),
        "resnet12_largest_miniimagenet_params": arch_params(resnet12, resnet12.largest()),
        "resnet12_largest_miniimagenet_macs": arch_macs(resnet12, resnet12.largest()),
    }
    omniglot_timing = time_sample_extract_forward(vgg9, batch=20, repeats=repeats, seed=args.seed)
    mini_timing = time_sample_extract_forward(vgg9_mini, batch=5, repeats=repeats, seed=args.seed)
    resnet_timing = time_sample_extract_forward(
        resnet12, batch=5, repeats=max(5, repeats // 3), seed=args.seed
    )
    result.update(
        {
            "subnet_forward_ms": omniglot_timing["total_ms"],
            "subnet_sample_ms": omniglot_timing["sample_ms"],
            "subnet_extract_ms": omniglot_timing["extract_ms"],
            "subnet_only_forward_ms": omniglot_timing["forward_ms"],
            "vgg9_miniimagenet_subnet_forward_ms": mini_timing["total_ms"],
            "resnet12_miniimagenet_subnet_forward_ms": resnet_timing["total_ms"],
            "supernet_train_step_ms": time_supernet_train_step(
                vgg9, batch=20, repeats=repeats, seed=args.seed
            ),
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
    )

    print("Search spaces")
    print(
        f"  VGG9 (Omniglot):       size {result['vgg9_space_size']:.4g} (paper 126^4*4 = 1.008e9), distinct {result['vgg9_distinct_size']:.4g}, LUT entries {result['vgg9_lut_entries_omniglot']}"
    )
    print(
        f"  ResNet12 (Mini-ImgNet): size {result['resnet12_space_size']:.4g}, distinct {result['resnet12_distinct_size']:.4g} (paper ~2e24), LUT entries {result['resnet12_lut_entries_miniimagenet']}"
    )
    print("MAML/MAML++ baselines (conv+linear MACs)")
    print(
        f"  Omniglot 20-way:      params {result['maml_omniglot20_params']:,} (paper 113.21K), MACs {result['maml_omniglot20_macs']:,} (paper 10.07M; ceil sizes {result['maml_omniglot20_macs_ceil_sizes']:,})"
    )
    print(
        f"  Mini-ImageNet 5-way:  params {result['maml_miniimagenet5_params']:,} (paper 70.09K), MACs {result['maml_miniimagenet5_macs']:,} (paper 57.38M; ceil sizes {result['maml_miniimagenet5_macs_ceil_sizes']:,})"
    )
    print(f"Timings (median of {repeats}, {result['torch_threads']} thread(s))")
    print(
        f"  VGG9 Omniglot 20-way batch 20: sample+extract+forward {omniglot_timing['total_ms']:.2f} ms (sample {omniglot_timing['sample_ms']:.3f}, extract {omniglot_timing['extract_ms']:.2f}, forward {omniglot_timing['forward_ms']:.2f})"
    )
    print(f"  VGG9 Mini-ImageNet batch 5:    sample+extract+forward {mini_timing['total_ms']:.2f} ms")
    print(f"  ResNet12 Mini-ImageNet batch 5: sample+extract+forward {resnet_timing['total_ms']:.2f} ms")
    print(f"  VGG9 super-net train step (fwd+bwd, batch 20): {result['supernet_train_step_ms']:.2f} ms")
    # Big integers as exact JSON numbers; sizes also as floats for plotting.
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
