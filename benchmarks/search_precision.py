"""Does bfloat16 make the GA's fitness cheaper without changing which sub-net it picks?

The adaption's cost is arithmetic: convolutions forward and backward in the inner loop of every
fitness evaluation (issue 6, "<= 60 s"; a profile of the `cpu`-preset scoring puts 70 % of the
time there). On CPUs with bfloat16 instructions (AVX512-BF16, AMX) autocast halves the bytes and
may speed those up. The search only needs the *ranking* of architectures by fitness to survive,
not the gradients of meta-training, so this script measures both sides on one super-net:

* ms per 16-task evaluation in float32 (the production path, and one task at a time) and under
  bfloat16 autocast, timed alternately on the same architectures; ``speedup_bf16`` is against
  the faster float32 way;
* the fitness (mean query loss) of each architecture both ways: largest absolute difference,
  Spearman rank correlation, whether the best architecture is the same, overlap of the best 10 %.

    python benchmarks/search_precision.py --supernet RUN/checkpoint.pt [--archs 60] [--queries 1]
    python benchmarks/search_precision.py --quick   # a tiny super-net trained for seconds

The last stdout line is one JSON object.
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

from benchmarks._scoring import add_scoring_arguments, scoring_bench  # noqa: E402
from benchmarks._validation import spearman  # noqa: E402
from engine.search.adapt import SuperNetScorer  # noqa: E402

#: Seed stream of the architectures scored (the tasks come from benchmarks._validation's).
ARCH_STREAM = 31


def bf16_flags() -> list[str]:
    """This CPU's bfloat16 instruction flags (Linux), e.g. avx512_bf16 or amx_bf16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(flag for flag in flags if "bf16" in flag)


def score_paths(scorer: SuperNetScorer, archs: list, tasks: list) -> dict[str, list[float]]:
    """Fitness and seconds of each architecture three ways, timed alternately so that a change
    of machine load hits all alike: float32 with the slice's tasks vmapped (the production path),
    float32 one task at a time on the sliced sub-net, and the latter under bfloat16 autocast (the
    vmapped path's backward fails under autocast in torch 2.13: "expected scalar type BFloat16")."""

    def bf16(arch, tasks):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return scorer.score_each(arch, tasks, sliced=True)

    paths = {
        "fp32": scorer.score,
        "fp32_each": lambda arch, tasks: scorer.score_each(arch, tasks, sliced=True),
        "bf16_each": bf16,
    }
    out: dict[str, list[float]] = {f"{kind}_{path}": [] for path in paths for kind in ("loss", "s")}
    for score in paths.values():
        score(archs[0], tasks[:2])  # warm-up
    for arch in archs:
        for path, score in paths.items():
            started = time.perf_counter()
            out[f"loss_{path}"].append(score(arch, tasks).loss)
            out[f"s_{path}"].append(time.perf_counter() - started)
    return out


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

    fp32, bf16 = np.asarray(results["loss_fp32"]), np.asarray(results["loss_bf16_each"])
    top = max(1, len(archs) // 10)
    best_fp32, best_bf16 = set(np.argsort(fp32)[:top]), set(np.argsort(bf16)[:top])
    ms_fp32 = 1000 * float(np.mean(results["s_fp32"]))
    ms_fp32_each = 1000 * float(np.mean(results["s_fp32_each"]))
    ms_bf16 = 1000 * float(np.mean(results["s_bf16_each"]))
    summary = {
        **bench.summary_head(args),
        "ms_per_evaluation_fp32": round(ms_fp32, 1),
        "ms_per_evaluation_fp32_each": round(ms_fp32_each, 1),
        "ms_per_evaluation_bf16": round(ms_bf16, 1),
        "speedup_bf16": round(min(ms_fp32, ms_fp32_each) / ms_bf16, 2),
        "max_abs_loss_diff": round(float(np.abs(fp32 - bf16).max()), 4),
        "mean_abs_loss_diff": round(float(np.abs(fp32 - bf16).mean()), 4),
        "loss_range_fp32": [round(float(fp32.min()), 4), round(float(fp32.max()), 4)],
        "spearman": round(spearman(fp32, bf16), 4),
        "same_best": bool(int(np.argmin(fp32)) == int(np.argmin(bf16))),
        "best_10pct_overlap": round(len(best_fp32 & best_bf16) / top, 2),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": bf16_flags(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
