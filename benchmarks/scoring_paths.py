"""Which sub-nets does batching a slice's tasks speed up? The data behind the GA's scoring rule.

``engine.search.adapt.SuperNetScorer.score`` ("auto") runs a slice's tasks together - as channel
groups of one forward ("grouped", :mod:`engine.search.grouped`) - only for sub-nets whose largest
layer output per task is at most ``MAX_BATCHED_TASK_ACTIVATION`` elements and scores wider ones
one task at a time on their sliced weights. This script times three ways on each of N random
sub-nets of one super-net (alternately, best of ``--repeats``): grouped, the tasks vmapped
("batched", the way before grouped) and one by one, sorted by that activation size, so the
threshold can be checked on another machine:

    python benchmarks/scoring_paths.py --supernet RUN/checkpoint.pt [--archs 30] [--queries 1] [--search-precision bfloat16]
    python benchmarks/scoring_paths.py --quick   # a tiny super-net trained for seconds

The last stdout line is one JSON object: mean ms per evaluation grouped, vmapped, one by one, on
the production ("auto") choice and on the better of grouped and one by one per sub-net, and the
activation sizes where grouped or one by one was faster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.search.adapt as adapt_module  # noqa: E402
from benchmarks._scoring import add_scoring_arguments, scoring_bench, scoring_path  # noqa: E402
from engine.adaption_presets import SEARCH_PRECISIONS  # noqa: E402
from engine.search.adapt import scoring_precision, task_tensors  # noqa: E402
from engine.search.package import arch_code  # noqa: E402

#: Seed stream of the architectures timed (the tasks come from benchmarks._validation's).
ARCH_STREAM = 32


def best_ms(score, arch, tasks, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        score(arch, tasks)
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scoring_arguments(
        parser,
        archs=30,
        archs_help="random sub-nets timed both ways",
        quick_help="tiny super-net trained for seconds, 8 sub-nets",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timings per sub-net and way (the best counts)"
    )
    parser.add_argument(
        "--search-precision",
        choices=SEARCH_PRECISIONS,
        default="float32",
        help="arithmetic of every way timed (bfloat16: CPU autocast, as a bfloat16 search scores)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = scoring_bench(args, parser, quick_iterations=24, quick_archs=8, arch_stream=ARCH_STREAM)
    scorer, tasks, archs = bench.scorer, bench.tasks, bench.archs
    support_x = task_tensors(tasks[0])[0]

    def score_with(path: str):
        def score(arch, tasks):
            with scoring_path(path), scoring_precision(args.search_precision):
                return scorer.score(arch, tasks)

        return score

    # The vmapped way fails under CPU autocast in torch 2.13 ("expected scalar type BFloat16").
    timed = ("grouped", "batched", "sliced") if args.search_precision == "float32" else ("grouped", "sliced")
    ways = {path: score_with(path) for path in timed}
    for score in ways.values():
        score(archs[0], tasks[:2])  # warm-up
    rows = []
    for arch in archs:
        row = {"activation": scorer.largest_activation(arch, support_x), "arch": arch_code(arch)}
        for path, score in ways.items():
            row[path] = best_ms(score, arch, tasks, args.repeats)
        row["auto"] = (
            row["grouped"] if row["activation"] <= adapt_module.MAX_BATCHED_TASK_ACTIVATION else row["sliced"]
        )
        rows.append(row)
    rows.sort(key=lambda row: row["activation"])
    for row in rows:
        ratio = row["grouped"] / row["sliced"]
        vmapped = f"  vmapped {row['batched']:7.1f} ms" if "batched" in row else ""
        print(f"{row['activation']:>9} elements  grouped {row['grouped']:7.1f} ms{vmapped}  "
              f"one by one {row['sliced']:7.1f} ms  grouped/one-by-one {ratio:.2f}  {row['arch']}")  # fmt: skip

    def mean_ms(path: str) -> float:
        return round(float(np.mean([row[path] for row in rows])), 1)

    grouped_faster = [row["activation"] for row in rows if row["grouped"] < row["sliced"]]
    sliced_faster = [row["activation"] for row in rows if row["sliced"] <= row["grouped"]]
    summary = {
        **bench.summary_head(args),
        "search_precision": args.search_precision,
        "threshold": adapt_module.MAX_BATCHED_TASK_ACTIVATION,
        "ms_grouped": mean_ms("grouped"),
        "ms_batched": mean_ms("batched") if "batched" in timed else None,
        "ms_one_by_one": mean_ms("sliced"),
        "ms_auto": mean_ms("auto"),
        "ms_best_of_grouped_and_one_by_one": round(
            float(np.mean([min(row["grouped"], row["sliced"]) for row in rows])), 1
        ),
        "largest_activation_grouped_faster": max(grouped_faster, default=None),
        "smallest_activation_one_by_one_faster": min(sliced_faster, default=None),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
