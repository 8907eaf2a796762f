"""Benchmark: adaption requests of one super-net with and without the fitness memo.

A deployment engineer asks for one super-net on several devices and budgets. The GA's fitness
(the few-shot loss of an architecture on a task slice) depends on neither, so the fitness memo
(``engine.search.memo``; the dashboard keeps one beside each super-net's checkpoint) lets later
requests reuse what earlier ones scored. This script runs a small day of requests twice, in the
same order, on the same super-net and tables:

1. this CPU's latency table, the 30 % quantile of random sub-nets' latency as the budget;
2. the same table, the 60 % quantile (a looser budget on the same device);
3. the simulated Eyeriss table (scalesim compute model), its own 30 % quantile (another device);
4. the first request again (the same request asked twice, e.g. after a lost download).

Each request is the issue's search: P=100, M=200 (``--quick``: P=20, M=4), 16-task slices, one
budget, ``--search-workers`` processes, no random baseline, no test tasks (the search is what is
timed). The first pass runs every request alone (cold); the second shares one memo across them
(warm). Per request the figures are both wall times, their ratio, the share of fitness calls the
memo answered, and whether the choice and its search loss are identical (they must be: a hit is
the number a fresh evaluation gives).

    python benchmarks/fitness_memo.py [--quick] [--supernet CKPT] [--lut LUT.json] [--iterations M]

Without ``--supernet`` a tiny VGG9 super-net is meta-trained on Omniglot 20-way 1-shot first
(seconds); without ``--lut`` this CPU's table is measured with few repeats. Last stdout line: one
JSON object (``cold_s``, ``warm_s``, ``speedup``, ``memo_share``, ``same_choices``, ``total_speedup``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.adaption import AdaptionRequest, load_supernet, run_adaption  # noqa: E402
from engine.latency.eyeriss import EyerissSimulator  # noqa: E402
from engine.latency.lut import LatencyTable, build_lut  # noqa: E402
from engine.latency.measure import LayerTimer  # noqa: E402
from engine.meta.runs import RunSpec  # noqa: E402
from engine.meta.service import execute_meta_training  # noqa: E402
from engine.meta.train import CHECKPOINT_NAME  # noqa: E402


def budget_at(space, table: LatencyTable, quantile: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    latencies = [table.predict(space, space.sample(rng)) for _ in range(2000)]
    return float(f"{np.quantile(latencies, quantile):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="P=20, M=4 and a smaller super-net run (< 1 minute)"
    )
    parser.add_argument(
        "--supernet", default=None, help="super-net checkpoint (default: meta-train a tiny one)"
    )
    parser.add_argument("--lut", default=None, help="this CPU's latency table (default: measure a quick one)")
    parser.add_argument("--pool", type=int, default=None, help="GA pool size P (default 100; quick 20)")
    parser.add_argument("--iterations", type=int, default=None, help="GA iterations M (default 200; quick 4)")
    parser.add_argument("--search-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the folder (tables, memo, results) here")
    args = parser.parse_args()
    pool = args.pool or (20 if args.quick else 100)
    iterations = args.iterations or (4 if args.quick else 200)
    torch.set_num_threads(args.search_workers)
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fitness_memo_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.search_workers} search processes, P={pool}, M={iterations}, folder {folder}"
    )

    if args.supernet:
        checkpoint = str(args.supernet)
    else:
        spec = RunSpec(dataset="omniglot", ways=20, shots=1, backbone="vgg9", preset="tiny",
                       iterations=48 if args.quick else 300, threads=args.search_workers, seed=args.seed)  # fmt: skip
        started = time.perf_counter()
        execute_meta_training(spec, folder / "supernet", eval_tasks=0)
        checkpoint = str(folder / "supernet" / CHECKPOINT_NAME)
        print(f"tiny super-net meta-trained in {time.perf_counter() - started:.1f} s")
    spec, run, trained = load_supernet(checkpoint)
    space = run.space
    print(f"super-net: {spec.backbone} {spec.preset} preset, {trained} meta-iterations, {checkpoint}")

    if args.lut:
        cpu_table = LatencyTable.load(args.lut)
    else:
        timer = LayerTimer(repeats=3, warmup=1, threads=1, subtract_call_overhead=True)
        cpu_table = build_lut(space, timer, device="local-cpu", metadata=timer.metadata())
    cpu_path = cpu_table.save(folder / "cpu_lut.json")
    eyeriss_table = build_lut(
        space, EyerissSimulator(cache_path=folder / "eyeriss_cycles.json"), device="eyeriss-simulated"
    )
    eyeriss_path = eyeriss_table.save(folder / "eyeriss_lut.json")
    day = [
        ("local CPU, 30 % budget", cpu_path, budget_at(space, cpu_table, 0.3, args.seed)),
        ("local CPU, 60 % budget", cpu_path, budget_at(space, cpu_table, 0.6, args.seed)),
        ("Eyeriss (simulated), 30 % budget", eyeriss_path, budget_at(space, eyeriss_table, 0.3, args.seed)),
    ]
    day.append((f"{day[0][0]}, asked again", day[0][1], day[0][2]))

    def adapt(index: int, lut: Path, budget: float, memo: Path | None, tag: str):
        request = AdaptionRequest(
            supernet=checkpoint, constraint="latency_ms", budgets=(budget,), lut=str(lut), preset="tiny",
            pool_size=pool, iterations=iterations, tasks_per_slice=16, seed=args.seed, search_queries=1,
            test_tasks=0, random_baseline=False, weights="meta", export_onnx=False, threads=1,
            search_workers=args.search_workers, fitness_memo=str(memo) if memo else None,
        )  # fmt: skip
        return run_adaption(request, out_dir=folder / f"{tag}_{index}")

    cold = [adapt(index, lut, budget, None, "cold") for index, (_, lut, budget) in enumerate(day)]
    memo = folder / "fitness-memo.sqlite"
    memo.unlink(missing_ok=True)
    warm = [adapt(index, lut, budget, memo, "warm") for index, (_, lut, budget) in enumerate(day)]

    rows = []
    for (name, _, budget), alone, shared in zip(day, cold, warm, strict=True):
        same = (alone.outcomes[0].arch, alone.outcomes[0].search_loss) == (
            shared.outcomes[0].arch,
            shared.outcomes[0].search_loss,
        )
        calls = shared.fitness_calls
        rows.append(
            {
                "request": name,
                "budget_ms": budget,
                "cold_s": round(alone.search_s, 2),
                "warm_s": round(shared.search_s, 2),
                "speedup": round(alone.search_s / shared.search_s, 2),
                "fitness_calls": calls,
                "memo_hits": shared.memo_hits,
                "same_choice": same,
                "arch": alone.outcomes[0].arch_code,
            }
        )
        print(
            f"{name} (≤ {budget} ms): alone {alone.search_s:.1f} s, with the memo {shared.search_s:.1f} s "
            f"({alone.search_s / shared.search_s:.2f}x); {shared.memo_hits} of {calls} fitness calls from the "
            f"memo; choice {'identical' if same else 'DIFFERENT'} ({alone.outcomes[0].arch_code})"
        )
    cold_total = sum(alone.search_s for alone in cold)
    warm_total = sum(shared.search_s for shared in warm)
    print(f"the day's searches: {cold_total:.1f} s alone, {warm_total:.1f} s with the memo")
    print(
        json.dumps(
            {
                "cold_s": [row["cold_s"] for row in rows],
                "warm_s": [row["warm_s"] for row in rows],
                "speedup": [row["speedup"] for row in rows],
                "memo_share": [round(shared.memo_hits / shared.fitness_calls, 3) for shared in warm],
                "same_choices": all(row["same_choice"] for row in rows),
                "total_speedup": round(cold_total / warm_total, 2),
                "pool": pool,
                "iterations": iterations,
                "search_workers": args.search_workers,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
