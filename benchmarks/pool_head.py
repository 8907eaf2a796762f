"""The super-net's pooling + classifier: pooling first against the averaging folded into the
classifier's weight (``ElasticLinear.forward`` on the unpooled map), and how maps too big to fold
are pooled.

Four parts, each with a baseline timed in the same run:

1. the head alone, forward and backward, on the feature maps a sub-net can end with (320 images:
   a 16-task slice of 20-way 1-shot support sets), 1 thread, best of ``--repeats``;
2. whole GA fitness evaluations (16 tasks, inner loop, query loss) of random sub-nets of a
   super-net, each timed both ways alternately (``engine.ops.FOLD_POOL_MAX_PIXELS`` = 0 forces
   pooling first). ``--cheap Q`` keeps only sub-nets under the Q quantile of MACs, the kind a
   tight latency budget leaves to the GA.

    python benchmarks/pool_head.py --supernet RUN/checkpoint.pt [--archs 24] [--cheap 0.3]
    python benchmarks/pool_head.py --quick   # a tiny super-net trained for seconds

3. the pooling alone (maps above the fold limit: 14x14, 28x28), ``F.adaptive_avg_pool2d``
   against ``engine.ops.pool_maps`` (one matrix product, what the head uses since 2026-12-06),
   forward and backward;
4. whole GA fitness evaluations of random sub-nets whose last map is above the fold limit, both
   poolings alternately.

The last stdout line is one JSON object: per-shape speed-ups of the head and of the pooling, and
the mean ms per evaluation each way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.ops as ops_module  # noqa: E402
from benchmarks._scoring import add_scoring_arguments, scoring_bench  # noqa: E402
from engine.cost import arch_macs  # noqa: E402
from engine.ops import ElasticLinear  # noqa: E402

#: Seed stream of the sub-nets timed (the tasks come from benchmarks._validation's).
ARCH_STREAM = 33
#: (channels, side) of the head's input: 28x28 Omniglot after 0-4 stride-2 layers, 84x84 after 3-4.
HEAD_SHAPES = [(16, 1), (32, 2), (72, 2), (32, 4), (64, 7), (16, 14), (64, 6), (32, 11), (16, 28)]


def best_us(fn: Callable[[], object], repeats: int, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return 1e6 * best


#: (maps, channels, side) pooled to 5x5 on their own: a 16-task slice's support sets in the grouped
#: path's layout (20 images, 16 tasks x C channels) and one task's, at the sides above the fold limit.
POOL_SHAPES = [(20, 16 * 16, 14), (20, 16 * 72, 14), (20, 16 * 16, 28), (20, 72, 14), (20, 16, 28)]


def adaptive_pooling() -> contextlib.AbstractContextManager:
    """Pool as before 2026-12-06: ``F.adaptive_avg_pool2d`` instead of ``engine.ops.pool_maps``."""
    return mock.patch.object(ops_module, "pool_maps", F.adaptive_avg_pool2d)


def time_pooling(repeats: int, calls: int) -> list[dict]:
    """Forward and backward of the pooling alone, ``adaptive_avg_pool2d`` against ``pool_maps``."""
    rows = []
    for images, channels, side in POOL_SHAPES:
        x = torch.randn(images, channels, side, side, requires_grad=True)
        outgoing = torch.randn(images, channels, 5, 5)
        row = {"shape": f"{images}x{channels}x{side}x{side}"}
        for name, pool in (("adaptive", F.adaptive_avg_pool2d), ("matmul", ops_module.pool_maps)):

            def pooled_and_back(pool=pool, x=x, outgoing=outgoing) -> object:
                return torch.autograd.grad(pool(x, 5), x, outgoing)

            row[f"{name}_us"] = best_us(pooled_and_back, repeats, calls)
        row["speedup"] = row["adaptive_us"] / row["matmul_us"]
        rows.append(row)
        print(
            f"{row['shape']} -> 5x5: adaptive_avg_pool2d {row['adaptive_us']:8.0f} us, "
            f"one matmul {row['matmul_us']:8.0f} us ({row['speedup']:.2f}x)"
        )
    return rows


def compare_evaluations(
    scorer,
    archs: list,
    tasks: list,
    repeats: int,
    baseline: Callable[[], contextlib.AbstractContextManager],
    describe: Callable[[object, float, float], str],
) -> tuple[list[float], list[float]]:
    """Best ms of one GA fitness evaluation of each architecture inside the ``baseline`` context
    and as the code runs, the two ways alternated ``repeats`` times so a drift in the machine hits
    both; prints ``describe(arch, baseline_ms, production_ms)`` per architecture."""
    baseline_ms, production_ms = [], []
    for arch in archs:
        times: dict[str, list[float]] = {"baseline": [], "production": []}
        for _ in range(repeats):
            for way, context in (("baseline", baseline), ("production", contextlib.nullcontext)):
                with context():
                    started = time.perf_counter()
                    scorer.score(arch, tasks)
                    times[way].append(1000 * (time.perf_counter() - started))
        baseline_ms.append(min(times["baseline"]))
        production_ms.append(min(times["production"]))
        print(describe(arch, baseline_ms[-1], production_ms[-1]))
    return baseline_ms, production_ms


def final_side(space, arch) -> int:
    """Side of the map the sub-net's head pools: the head layer's input size."""
    return next(spec.in_size for spec in space.layer_specs(arch) if spec.op == "head")


@contextlib.contextmanager
def pooling_first() -> Iterator[None]:
    saved = ops_module.FOLD_POOL_MAX_PIXELS
    ops_module.FOLD_POOL_MAX_PIXELS = 0
    try:
        yield
    finally:
        ops_module.FOLD_POOL_MAX_PIXELS = saved


def time_one_head(channels: int, side: int, images: int, repeats: int, calls: int) -> dict:
    head = ElasticLinear(max_channels=channels, pool_size=5, num_classes=20)
    x = torch.randn(images, channels, side, side, requires_grad=True)
    outgoing = torch.randn(images, 20)
    inputs = (x, head.weight, head.bias)

    def pool_first() -> object:
        return torch.autograd.grad(head(F.adaptive_avg_pool2d(x, 5)), inputs, outgoing)

    def folded() -> object:
        return torch.autograd.grad(head(x), inputs, outgoing)

    row = {"channels": channels, "side": side, "pool_first_us": best_us(pool_first, repeats, calls)}
    row["folded_us"] = best_us(folded, repeats, calls)
    row["speedup"] = row["pool_first_us"] / row["folded_us"]
    return row


def time_head(images: int, repeats: int, calls: int) -> list[dict]:
    rows = []
    for channels, side in HEAD_SHAPES:
        row = time_one_head(channels, side, images, repeats, calls)
        rows.append(row)
        print(
            f"{images}x{channels}x{side}x{side} -> 5x5 -> 20: pool first {row['pool_first_us']:8.0f} us, "
            f"folded {row['folded_us']:8.0f} us ({row['speedup']:.2f}x)"
            + (
                ""
                if side * side <= ops_module.FOLD_POOL_MAX_PIXELS
                else "  [pools first: above the fold limit]"
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scoring_arguments(
        parser,
        archs=24,
        archs_help="random sub-nets whose GA fitness is timed both ways",
        quick_help="tiny super-net trained for seconds, 6 sub-nets, fewer head timings",
    )
    parser.add_argument("--cheap", type=float, default=1.0, help="keep sub-nets under this quantile of MACs")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timings per sub-net and way (the best counts)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("== the head alone: forward and backward, 1 thread ==")
    head_rows = time_head(images=320, repeats=3 if args.quick else 7, calls=5 if args.quick else 20)

    print("\n== GA fitness evaluations (16 tasks each) ==")
    bench = scoring_bench(args, parser, quick_iterations=24, quick_archs=40, arch_stream=ARCH_STREAM)
    scorer, tasks, space = bench.scorer, bench.tasks, bench.run.space
    archs = bench.archs
    if args.cheap < 1.0:
        macs = np.array([arch_macs(space, arch) for arch in archs])
        archs = [arch for arch, m in zip(archs, macs, strict=True) if m <= np.quantile(macs, args.cheap)]
    archs = archs[: 6 if args.quick else len(archs)]
    scorer.score(archs[0], tasks)  # warm-up
    first_ms, folded_ms = compare_evaluations(
        scorer, archs, tasks, args.repeats, pooling_first,
        lambda arch, first, folded: f"pool first {first:7.1f} ms  folded {folded:7.1f} ms  ({first / folded:.2f}x)",
    )  # fmt: skip

    print("\n== pooling alone, forward and backward, 1 thread ==")
    pool_rows = time_pooling(repeats=3 if args.quick else 7, calls=3 if args.quick else 10)
    print("\n== GA fitness evaluations of sub-nets whose last map is above the fold limit ==")
    rng = np.random.default_rng(ARCH_STREAM)
    big_maps = []
    while len(big_maps) < (3 if args.quick else 12):
        arch = space.sample(rng)
        if final_side(space, arch) ** 2 > ops_module.FOLD_POOL_MAX_PIXELS:
            big_maps.append(arch)
    adaptive_ms, matmul_ms = compare_evaluations(
        scorer, big_maps, tasks, args.repeats, adaptive_pooling,
        lambda arch, adaptive, matmul: f"last map {final_side(space, arch)}x{final_side(space, arch)}: "
        f"adaptive_avg_pool2d {adaptive:7.1f} ms  one matmul {matmul:7.1f} ms ({adaptive / matmul:.2f}x)",
    )  # fmt: skip
    speedups = [row["speedup"] for row in head_rows]
    summary = {
        **bench.summary_head(args),
        "archs": len(archs),
        "cheap_quantile": args.cheap,
        "head_speedup_min": round(min(speedups), 2),
        "head_speedup_max": round(max(speedups), 2),
        "head_speedup_by_shape": {
            f"{r['channels']}x{r['side']}x{r['side']}": round(r["speedup"], 2) for r in head_rows
        },
        "ms_per_evaluation_pool_first": round(float(np.mean(first_ms)), 1),
        "ms_per_evaluation_folded": round(float(np.mean(folded_ms)), 1),
        "evaluation_speedup": round(float(np.mean(first_ms)) / float(np.mean(folded_ms)), 2),
        "pool_matmul_speedup_by_shape": {row["shape"]: round(row["speedup"], 2) for row in pool_rows},
        "ms_per_evaluation_big_map_adaptive": round(float(np.mean(adaptive_ms)), 1),
        "ms_per_evaluation_big_map_matmul": round(float(np.mean(matmul_ms)), 1),
        "big_map_evaluation_speedup": round(float(np.mean(adaptive_ms)) / float(np.mean(matmul_ms)), 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
