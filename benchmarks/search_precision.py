"""Does bfloat16 make the GA's fitness cheaper without changing which sub-net it picks?

The adaption's cost is arithmetic: convolutions forward and backward in the inner loop of every
fitness evaluation (issue 6, "<= 60 s"; a profile of the `cpu`-preset scoring puts 70 % of the
time there). On CPUs with bfloat16 instructions (AVX512-BF16, AMX) autocast halves the bytes and
may speed those up. The search only needs the *ranking* of architectures by fitness to survive,
not the gradients of meta-training, so this script measures both sides on one super-net:

* ms per 16-task evaluation in float32 and under bfloat16 autocast, each on the production path
  (``SuperNetScorer.score``: on a CPU a slice's tasks grouped, wide sub-nets one task at a time)
  and one task at a time on the sliced sub-net, timed alternately on the same architectures;
  ``speedup_bf16_production`` is the production path's, bfloat16 against float32 (what
  ``AdaptionRequest.search_precision="bfloat16"`` changes), ``speedup_bf16`` the one-by-one
  bfloat16 way's against the faster float32 way (this script's figure before the grouped path
  ran under autocast);
* the fitness of each architecture both ways on the production path, as the mean query loss
  (Algorithm 1's) and as the query error rate with the loss breaking ties (the ``cpu`` preset's
  search metric): largest absolute difference, Spearman rank correlation, whether the best
  architecture is the same, overlap of the best 10 %;
* the mean bfloat16 - float32 shift of both fitnesses per number of layers: rounding compounds
  layer by layer, and a shift that grows with depth would steer a bfloat16 search away from deep
  sub-nets (the bfloat16 GAs of 2026-12-07 stopped early at the loosest budget and one chose a
  two-layer net where float32 chose three layers; docs/BENCHMARKS.md, "bfloat16 search").

    python benchmarks/search_precision.py --supernet RUN/checkpoint.pt [--archs 60] [--queries 1]
    python benchmarks/search_precision.py --quick   # a tiny super-net trained for seconds

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._scoring import add_scoring_arguments, scoring_bench  # noqa: E402
from benchmarks._validation import spearman  # noqa: E402
from engine.adaption import search_error  # noqa: E402
from engine.cpu import bfloat16_flags  # noqa: E402
from engine.search.adapt import SuperNetScorer, scoring_precision  # noqa: E402

#: Seed stream of the architectures scored (the tasks come from benchmarks._validation's).
ARCH_STREAM = 31


def score_paths(scorer: SuperNetScorer, archs: list, tasks: list) -> dict[str, list[float]]:
    """Fitness and seconds of each architecture four ways, timed alternately so that a change
    of machine load hits all alike: the production path in float32 and in bfloat16, and one task
    at a time on the sliced sub-net in float32 and in bfloat16. (The vmapped path, a GPU's, fails
    under CPU autocast in torch 2.13: "expected scalar type BFloat16".)"""

    def in_bf16(score):
        def scored(arch, tasks):
            with scoring_precision("bfloat16"):
                return score(arch, tasks)

        return scored

    def each(arch, tasks):
        return scorer.score_each(arch, tasks, sliced=True)

    paths = {
        "fp32": scorer.score,
        "bf16": in_bf16(scorer.score),
        "fp32_each": each,
        "bf16_each": in_bf16(each),
    }
    out: dict[str, list[float]] = {f"{kind}_{path}": [] for path in paths for kind in ("loss", "error", "s")}
    for score in paths.values():
        score(archs[0], tasks[:2])  # warm-up
    for arch in archs:
        for path, score in paths.items():
            started = time.perf_counter()
            result = score(arch, tasks)
            out[f"s_{path}"].append(time.perf_counter() - started)
            out[f"loss_{path}"].append(result.loss)
            out[f"error_{path}"].append(search_error(result))  # the "accuracy" search fitness
    return out


def agreement(kind: str, fp32: Sequence[float], bf16: Sequence[float]) -> dict:
    """How far the bfloat16 fitness ``kind`` ("loss", "error") of some sub-nets is from their
    float32 one: the differences, the rank correlation, and whether the best sub-net and the best
    10 % (at least one) stay the same."""
    fp32, bf16 = np.asarray(fp32, dtype=np.float64), np.asarray(bf16, dtype=np.float64)
    top = max(1, len(fp32) // 10)
    best_fp32, best_bf16 = set(np.argsort(fp32)[:top].tolist()), set(np.argsort(bf16)[:top].tolist())
    return {
        f"max_abs_{kind}_diff": round(float(np.abs(fp32 - bf16).max()), 4),
        f"mean_abs_{kind}_diff": round(float(np.abs(fp32 - bf16).mean()), 4),
        f"{kind}_range_fp32": [round(float(fp32.min()), 4), round(float(fp32.max()), 4)],
        f"spearman_{kind}": round(spearman(fp32, bf16), 4),
        f"same_best_{kind}": bool(int(np.argmin(fp32)) == int(np.argmin(bf16))),
        f"best_10pct_overlap_{kind}": round(len(best_fp32 & best_bf16) / top, 2),
    }


def shift_by_depth(fp32: Sequence[float], bf16: Sequence[float], depths: Sequence[int]) -> dict[str, float]:
    """Mean bfloat16 - float32 fitness per number of layers: whether bfloat16's rounding, which
    compounds layer by layer, handicaps deeper sub-nets in the search."""
    shift = np.asarray(bf16, dtype=np.float64) - np.asarray(fp32, dtype=np.float64)
    depth_of = np.asarray(depths)
    return {
        str(depth): round(float(shift[depth_of == depth].mean()), 4) + 0.0  # never "-0.0"
        for depth in sorted(set(depth_of.tolist()))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scoring_arguments(
        parser,
        archs=60,
        archs_help="random architectures scored both ways",
        quick_help="tiny super-net trained for seconds, 12 archs",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = scoring_bench(args, parser, quick_iterations=60, quick_archs=12, arch_stream=ARCH_STREAM)
    archs = bench.archs
    results = score_paths(bench.scorer, archs, bench.tasks)

    depths = [arch.n_used_layers for arch in archs]

    def agreement_of(kind: str) -> dict:
        return agreement(kind, results[f"{kind}_fp32"], results[f"{kind}_bf16"])

    def shift_of(kind: str) -> dict[str, float]:
        return shift_by_depth(results[f"{kind}_fp32"], results[f"{kind}_bf16"], depths)

    ms = {
        path: 1000 * float(np.mean(results[f"s_{path}"]))
        for path in ("fp32", "bf16", "fp32_each", "bf16_each")
    }
    summary = {
        **bench.summary_head(args),
        "ms_per_evaluation_fp32": round(ms["fp32"], 1),
        "ms_per_evaluation_bf16_production": round(ms["bf16"], 1),
        "ms_per_evaluation_fp32_each": round(ms["fp32_each"], 1),
        "ms_per_evaluation_bf16": round(ms["bf16_each"], 1),
        "speedup_bf16_production": round(ms["fp32"] / ms["bf16"], 2),
        "speedup_bf16": round(min(ms["fp32"], ms["fp32_each"]) / ms["bf16_each"], 2),
        **agreement_of("loss"),
        **agreement_of("error"),
        "archs_by_depth": {str(depth): depths.count(depth) for depth in sorted(set(depths))},
        "mean_loss_shift_by_depth": shift_of("loss"),
        "mean_error_shift_by_depth": shift_of("error"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": bfloat16_flags(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
