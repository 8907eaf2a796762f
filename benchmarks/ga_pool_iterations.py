"""Benchmark: H-Meta-NAS Figure 4 with the REAL fitness - mean pool accuracy per GA iteration for P = 50/100/200.

The paper's Figure 4 plots, for several pool sizes P, "the averaged accuracy on the sampled tasks
for all architectures in the pool" against the GA iteration (M up to 200; it picks P=100, M=200).

Here, at small scale on this machine:

1. meta-train one tiny vgg9 super-net on Omniglot 5-way 1-shot (engine.meta "tiny" preset,
   MAML++ with progressive shrinking) through ``engine.meta.service.execute_meta_training``,
2. run Algorithm 1 (``engine.search.evolution.run_ga``) with the real fitness (mean query loss
   after the inner loop from the inherited weights, ``engine.search.adapt.SuperNetScorer``) on
   fixed slices of Omniglot validation tasks, under a parameter budget (the 4-conv MAML++
   baseline's size at this width, as in ``benchmarks/ablation_table2.py``), same seed for every P,
3. record, after every iteration, the mean query accuracy of the pool's architectures on that
   iteration's slice (the slice the GA scored them on), and print it as one series per P.

Mini-ImageNet is not on this machine and M stops far below 200: read the series as the shape of
the curves at small scale, not the paper's numbers. ``--quick`` (< 1 min) trains the super-net
for a few iterations and runs 3 GA iterations on tiny slices: smoke figures.

The synthetic-fitness version of this preset is ``benchmarks/ga_adaption.py --synthetic --fig4``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.baselines import MamlConvNet
from engine.cost import count_params
from engine.meta.runs import IMAGE_SHAPES, RunSpec, task_source
from engine.meta.service import execute_meta_training, load_run
from engine.search.adapt import (
    SuperNetScorer,
    inner_loop_from_learner,
    make_costs_fn,
    slice_tasks,
    task_slices,
)
from engine.search.constraints import Constraint, CostModel
from engine.search.evolution import GAConfig, run_ga

POOL_SIZES = (50, 100, 200)
VALIDATION_SEED = 11


class RecordingFitness:
    """The GA's real fitness (mean query loss of a slice) that also keeps each score's accuracy."""

    def __init__(self, scorer: SuperNetScorer, slices: list[list]) -> None:
        self.scorer = scorer
        self.slices = slices
        self.accuracy: dict[tuple[str, int], float] = {}
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, arch, slice_id: int) -> float:
        started = time.perf_counter()
        score = self.scorer.score(arch, self.slices[slice_id])
        self.accuracy[(arch.canonical().to_json(), slice_id)] = score.accuracy
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return score.loss


def pool_accuracy_series(space, fitness: RecordingFitness, cost_model, constraint, config: GAConfig) -> dict:
    """Run one GA; the pool's mean accuracy and mean loss on the scored slice, per iteration."""
    decode = type(space.smallest()).from_dict
    series: list[float] = []

    def on_state(state: dict) -> None:
        # "ranked" is the pool just scored (the next pool is "population"); "history" names its slice.
        slice_id = state["history"][-1]["slice"]
        keys = [decode(arch).canonical().to_json() for arch in state["ranked"]]
        series.append(float(np.mean([fitness.accuracy[(key, slice_id)] for key in keys])))

    started = time.perf_counter()
    result = run_ga(space, fitness, cost_model, (constraint,), config, on_state=on_state)
    return {
        "accuracy": series,
        "mean_loss": [h["mean_loss"] for h in result.history],
        "best_loss": [h["best_loss"] for h in result.history],
        "evaluations": result.evaluations,
        "cache_hits": result.cache_hits,
        "seconds": time.perf_counter() - started,
        "best_params": result.best_costs["params"],
        "constraint_met": result.constraint_met,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke figures in under a minute")
    parser.add_argument("--iterations", type=int, default=None, help="GA iterations M (quick 3, else 25)")
    parser.add_argument("--pools", type=int, nargs="+", default=list(POOL_SIZES), help="pool sizes P")
    parser.add_argument(
        "--train-iterations", type=int, default=None, help="meta-iterations (quick 8, else 1500)"
    )
    parser.add_argument("--slices", type=int, default=None, help="validation slices (quick 2, else 4)")
    parser.add_argument("--tasks-per-slice", type=int, default=None, help="quick 1, else 4")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quick = args.quick
    ga_iterations = args.iterations or (3 if quick else 25)
    train_iterations = args.train_iterations or (8 if quick else 1500)
    slices = args.slices or (2 if quick else 4)
    tasks_per_slice = args.tasks_per_slice or (1 if quick else 4)
    torch.set_num_threads(args.threads)
    spec = RunSpec(
        dataset="omniglot",
        ways=args.ways,
        shots=1,
        backbone="vgg9",
        preset="tiny",
        iterations=train_iterations,
        seed=args.seed,
        threads=args.threads,
    )
    folder = Path(tempfile.mkdtemp(prefix="ga_pool_iterations_"))
    scale = "SMOKE FIGURES (--quick)" if quick else "small scale"
    print(
        f"Figure 4, REAL fitness, {scale}: Omniglot {spec.ways}-way 1-shot, tiny vgg9 super-net, folder {folder}"
    )
    started = time.perf_counter()
    summary = execute_meta_training(spec, folder, eval_tasks=0)
    train_s = time.perf_counter() - started
    print(f"meta-trained {summary['iterations']} iterations in {train_s:.1f} s")
    run, _ = load_run(folder)
    run.learner.eval()
    space = run.space

    channels, size = IMAGE_SHAPES[spec.dataset]
    budget = count_params(MamlConvNet(channels, size, spec.ways, filters=spec.preset_values.channels))
    constraint = Constraint("params", budget)
    cost_model = CostModel(make_costs_fn(space))
    _, batches = task_source(spec.with_(queries=1), "val")
    tasks = [
        task
        for batch in batches(slices * tasks_per_slice, 16, VALIDATION_SEED)
        for task in slice_tasks(batch)
    ]
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    print(
        f"budget {budget} params (the 4-conv MAML++ baseline at {spec.preset_values.channels} filters); "
        f"{slices} validation slices x {tasks_per_slice} tasks, 1 query image per class; M={ga_iterations}"
    )

    results = {}
    for pool in args.pools:
        # A fresh fitness per P: no P profits from another's cached scores.
        fitness = RecordingFitness(scorer, task_slices(tasks, tasks_per_slice))
        config = GAConfig(
            pool_size=pool,
            iterations=ga_iterations,
            tasks_per_slice=tasks_per_slice,
            num_slices=slices,
            final_candidates=0,
            seed=args.seed,
        )
        results[pool] = pool_accuracy_series(space, fitness, cost_model, constraint, config)
        results[pool]["ms_per_evaluation"] = 1000 * fitness.seconds / max(1, fitness.calls)
        r = results[pool]
        print(
            f"  P={pool:3d}: {r['evaluations']} evaluations, {r['cache_hits']} cache hits, {r['seconds']:.1f} s "
            f"({r['ms_per_evaluation']:.0f} ms per evaluation)"
        )

    print("\nmean pool accuracy (%) on the iteration's validation slice, per GA iteration M:")
    print("  " + " " * 7 + "".join(f"{m:>7d}" for m in range(1, ga_iterations + 1)))
    for pool, r in results.items():
        print(f"  P={pool:<4d} " + "".join(f"{100 * a:7.2f}" for a in r["accuracy"]))
    tail = max(1, ga_iterations // 5)
    for pool, r in results.items():
        r["last_mean_accuracy"] = float(np.mean(r["accuracy"][-tail:]))
        r["first_mean_accuracy"] = float(np.mean(r["accuracy"][:tail]))
        print(
            f"  P={pool:<4d} mean of the first {tail} iterations {100 * r['first_mean_accuracy']:.2f} %, "
            f"of the last {tail} {100 * r['last_mean_accuracy']:.2f} %"
        )
    print("mean pool loss per GA iteration:")
    for pool, r in results.items():
        print(f"  P={pool:<4d} " + "".join(f"{loss:7.3f}" for loss in r["mean_loss"]))
    print(
        "note: each iteration scores the pool on one slice, drawn from the GA's own random stream, so the "
        "slice sequence differs between P and single values mix pool improvement with slice difficulty "
        "(compare the mean over the last iterations)."
    )
    print(
        json.dumps(
            {
                "mode": "quick (smoke figures)" if quick else "full",
                "fitness": "real (tiny meta-trained super-net, Omniglot validation tasks)",
                "dataset": f"omniglot {spec.ways}-way 1-shot",
                "train_iterations": summary["iterations"],
                "train_s": round(train_s, 1),
                "budget_params": budget,
                "iterations": ga_iterations,
                "slices": slices,
                "tasks_per_slice": tasks_per_slice,
                "series": {
                    str(pool): {
                        "mean_pool_accuracy": [round(100 * a, 2) for a in r["accuracy"]],
                        "mean_pool_loss": [round(v, 4) for v in r["mean_loss"]],
                        "first_mean_accuracy": round(100 * r["first_mean_accuracy"], 2),
                        "last_mean_accuracy": round(100 * r["last_mean_accuracy"], 2),
                        "evaluations": r["evaluations"],
                        "cache_hits": r["cache_hits"],
                        "seconds": round(r["seconds"], 1),
                        "ms_per_evaluation": round(r["ms_per_evaluation"], 1),
                        "constraint_met": r["constraint_met"],
                    }
                    for pool, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
