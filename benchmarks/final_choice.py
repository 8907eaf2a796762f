"""Benchmark: which final-choice rule picks the finalist that is best on the test tasks?

The GA (Algorithm 1) and the random-search baseline both end by choosing among a few finalists
(``final_candidates``). This script runs both the way ``benchmarks/ga_adaption.py``'s sweep does
(same budgets from the same quantiles, seeds, slices and task streams), then scores their
finalists, and the other top-10 architectures of each, three ways:

* ``A_search_loss``: mean query loss over the search slices (1 query image per class by default)
  - the final choice before ``final_slices`` existed (``--final-slices 0``);
* ``B_held_out_loss``: mean query loss over ``--final-slices`` held-out slices of fresh validation
  tasks at the super-net's own query count (``final_metric="loss"``);
* ``C_held_out_accuracy``: mean query accuracy over the same held-out slices
  (``final_metric="accuracy"``, the presets' default),

and reports, per budget and rule, the test accuracy (``--test-tasks`` Omniglot test tasks, the
adaption's own test-task stream) of the finalist each rule picks, for the GA and random search,
plus the Spearman rank correlation of each score with test accuracy over all scored candidates.
The GA's finalists are taken two ways from the same run: ``ga`` (the top of the last generation's
ranking, ``finalists_from="last"``) and ``ga_archive`` (the top of everything it scored by
:func:`engine.search.evolution.archive_ranking`, ``finalists_from="archive"``, the presets'
default).

    python -m engine meta-train --dataset omniglot --ways 20 --shots 1 --backbone vgg9 --preset cpu --out RUN
    PYTHONPATH=. python benchmarks/final_choice.py --supernet RUN/checkpoint.pt [--lut LUT.json]

Without ``--lut`` a latency table of this CPU is measured (and saved with ``--save-lut``).
``--quick`` (under a minute) meta-trains a tiny super-net for seconds, uses a parameter budget
instead of latency (no table to measure) and few tasks: a smoke check, not a figure.
The last line is one JSON object: per-budget test accuracies per rule, the correlations, and
``picks_best_finalist`` (how often each rule chose the finalist with the best test accuracy, over
the three finalist lists and the budgets).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._validation import spearman
from engine.adaption import (
    FINAL_TASK_STREAM,
    RANDOM_SEARCH_STREAM,
    TEST_TASK_STREAM,
    VALIDATION_TASK_STREAM,
    TimedFitness,
    load_supernet,
)
from engine.cost import arch_params
from engine.latency.lut import LatencyTable, build_lut
from engine.latency.measure import LayerTimer
from engine.meta.runs import RunSpec, task_source
from engine.meta.service import execute_meta_training
from engine.meta.train import CHECKPOINT_NAME
from engine.search.adapt import (
    SuperNetScorer,
    inner_loop_from_learner,
    make_costs_fn,
    slice_tasks,
    task_slices,
)
from engine.search.constraints import Constraint, CostModel
from engine.search.evolution import FitnessCache, GAConfig, archive_ranking, run_ga
from engine.search.random_search import random_search
from engine.seeding import derive_seed

RULES = (
    ("A_search_loss", "search_loss", 1),
    ("B_held_out_loss", "held_out_loss", 1),
    ("C_held_out_accuracy", "held_out_acc", -1),
)


class Recorder:
    """The fitness with every (architecture, slice) loss it returned kept for later ranking."""

    def __init__(self, inner):
        self.inner, self.seen = inner, {}

    def __call__(self, arch, slice_id):
        loss = self.inner(arch, slice_id)
        self.seen[(arch, slice_id)] = loss
        return loss

    def many(self, pairs):
        losses = self.inner.many(pairs)
        self.seen.update(zip(pairs, losses, strict=True))
        return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny super-net, params budget, few tasks")
    parser.add_argument("--supernet", default=None, help="super-net checkpoint (default: train a tiny one)")
    parser.add_argument("--lut", default=None, help="latency table JSON (default: measure this CPU)")
    parser.add_argument("--save-lut", default=None, help="where to save a measured table")
    parser.add_argument("--budget-quantiles", default="0.3,0.6,0.9")
    parser.add_argument("--pool", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--slices", type=int, default=None, help="search slices")
    parser.add_argument("--tasks-per-slice", type=int, default=None)
    parser.add_argument("--final-slices", type=int, default=None, help="held-out slices (default 4)")
    parser.add_argument("--final-candidates", type=int, default=5)
    parser.add_argument("--search-queries", type=int, default=1)
    parser.add_argument("--test-tasks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quick = args.quick
    pool, iterations = args.pool or (12 if quick else 100), args.iterations or (3 if quick else 30)
    num_slices, per_slice = args.slices or (2 if quick else 4), args.tasks_per_slice or (4 if quick else 16)
    final_slices = args.final_slices or (1 if quick else 4)
    test_count = args.test_tasks or (32 if quick else 600)
    quantiles = [float(q) for q in args.budget_quantiles.split(",")]
    started_all = time.perf_counter()

    if args.supernet:
        checkpoint = args.supernet
    else:
        folder = Path(tempfile.mkdtemp(prefix="final_choice_"))
        spec = RunSpec(
            dataset="omniglot", ways=20, shots=1, backbone="vgg9", preset="tiny", threads=2, seed=args.seed
        )
        execute_meta_training(spec, folder / "supernet", eval_tasks=0)
        checkpoint = str(folder / "supernet" / CHECKPOINT_NAME)
    spec, run, trained = load_supernet(checkpoint)
    space = run.space
    print(
        f"super-net {checkpoint}: {spec.preset} preset, {trained} meta-iterations, {spec.ways}-way {spec.shots}-shot"
    )

    rng = np.random.default_rng(args.seed)
    sample = [space.sample(rng) for _ in range(2000)]
    if quick:  # no table to measure: a parameter budget
        kind, costs_fn = "params", lambda arch: {"params": arch_params(space, arch)}
        values = np.array([arch_params(space, arch) for arch in sample], dtype=float)
    else:
        if args.lut and Path(args.lut).exists():
            lut = LatencyTable.load(args.lut)
        else:
            timer = LayerTimer(repeats=10, warmup=3, threads=1, subtract_call_overhead=True)
            lut = build_lut(space, timer, device="local-cpu", metadata=timer.metadata())
            if args.save_lut:
                lut.save(args.save_lut)
        kind, costs_fn = "latency_ms", make_costs_fn(space, lut)
        values = np.array([lut.predict(space, arch) for arch in sample])
    cost_model = CostModel(costs_fn)
    budgets = [float(f"{np.quantile(values, q):.4g}") for q in quantiles]
    print(f"{kind} budgets at the {args.budget_quantiles} quantiles of random sub-nets: {budgets}")

    def tasks(split: str, count: int, seed: int, queries: int) -> list:
        _, batches = task_source(spec.with_(queries=queries), split)
        return [task for batch in batches(count, 16, seed) for task in slice_tasks(batch)]

    search = task_slices(
        tasks(
            "val", per_slice * num_slices, derive_seed(args.seed, VALIDATION_TASK_STREAM), args.search_queries
        ),
        per_slice,
    )
    held_out = task_slices(
        tasks("val", per_slice * final_slices, derive_seed(args.seed, FINAL_TASK_STREAM), spec.query_count),
        per_slice,
    )
    test = tasks("test", test_count, derive_seed(args.seed, TEST_TASK_STREAM), spec.query_count)
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    decode = type(space.smallest()).from_dict

    per_budget, correlations, picks_best = (
        [],
        {name: [] for name, _, _ in RULES},
        {name: 0 for name, _, _ in RULES},
    )
    for index, budget in enumerate(budgets):
        torch.set_num_threads(1)
        fitness = TimedFitness(scorer, search + held_out, workers=2)
        constraints = [Constraint(kind, budget)]
        config = GAConfig(pool_size=pool, iterations=iterations, tasks_per_slice=per_slice, num_slices=num_slices,
                          final_candidates=args.final_candidates, seed=derive_seed(args.seed, index))  # fmt: skip
        started = time.perf_counter()
        last_state: dict = {}
        ga_record = Recorder(fitness)
        ga_cache = FitnessCache()
        ga = run_ga(
            space,
            ga_record,
            cost_model,
            constraints,
            config,
            cache=ga_cache,
            on_state=last_state.update,
        )
        ga_ranked = list(dict.fromkeys(decode(d).canonical() for d in last_state["ranked"]))
        # The GA's own cache holds search slices only (held-out values go aside), in first-seen order.
        archive_ranked = archive_ranking(ga_cache.archs(), ga_cache, num_slices)
        rs_record = Recorder(fitness)
        rs = random_search(space, rs_record, cost_model, constraints, evaluations=ga.evaluations, num_slices=num_slices,
                           final_candidates=args.final_candidates, seed=derive_seed(args.seed, RANDOM_SEARCH_STREAM + index))  # fmt: skip
        screened = rs.stats["screening_slice"]
        rs_ranked = sorted(
            (a for (a, s) in rs_record.seen if s == screened), key=lambda a: rs_record.seen[(a, screened)]
        )
        search_s = time.perf_counter() - started
        candidates = list(dict.fromkeys([*ga_ranked[:10], *archive_ranked[:10], *rs_ranked[:10]]))
        pairs = [(a, s) for a in candidates for s in range(num_slices)]
        losses = dict(zip(pairs, fitness.many(pairs), strict=True))
        fitness.close()
        torch.set_num_threads(2)
        rows = []
        for arch in candidates:
            test_acc = np.asarray(scorer.score(arch, test).task_accuracies)
            held = [scorer.score(arch, s) for s in held_out]
            rows.append({
                "arch": arch.to_json(),
                "ga_rank": ga_ranked.index(arch) if arch in ga_ranked[:10] else None,
                "archive_rank": archive_ranked.index(arch) if arch in archive_ranked[:10] else None,
                "rs_rank": rs_ranked.index(arch) if arch in rs_ranked[:10] else None,
                "search_loss": float(np.mean([losses[(arch, s)] for s in range(num_slices)])),
                "held_out_loss": float(np.mean([h.loss for h in held])),
                "held_out_acc": float(np.mean([h.accuracy for h in held])),
                "test_acc": float(test_acc.mean()),
                "test_ci": float(1.96 * test_acc.std(ddof=1) / np.sqrt(test_acc.size)),
            })  # fmt: skip
        summary: dict = {
            "budget": budget,
            "quantile": quantiles[index],
            "evaluations": ga.evaluations,
            "search_s": round(search_s, 1),
        }
        for method, rank_key in (("ga", "ga_rank"), ("ga_archive", "archive_rank"), ("random", "rs_rank")):
            finalists = sorted(
                (r for r in rows if r[rank_key] is not None and r[rank_key] < args.final_candidates),
                key=lambda r: r[rank_key],
            )
            best_test = max(r["test_acc"] for r in finalists)
            for name, key, sign in RULES:
                chosen = min(finalists, key=lambda r: sign * r[key])
                summary[f"{method}_{name}"] = round(100 * chosen["test_acc"], 2)
                picks_best[name] += chosen["test_acc"] == best_test
        for name, _, _ in RULES:
            for method in ("ga", "ga_archive"):
                gap = summary[f"{method}_{name}"] - summary[f"random_{name}"]
                summary[f"{method}_minus_random_{name}"] = round(gap, 2)
        scores = np.array(
            [[r["search_loss"], r["held_out_loss"], -r["held_out_acc"], -r["test_acc"]] for r in rows]
        )
        summary["spearman_vs_test"] = {}
        for column, (name, _, _) in enumerate(RULES):
            correlations[name].append(spearman(scores[:, column], scores[:, 3]))
            summary["spearman_vs_test"][name] = round(correlations[name][-1], 3)
        print(json.dumps(summary), flush=True)
        per_budget.append(summary)

    print(
        f"\n{'budget':>10} | {'rule':22} | {'GA':>6} | {'GA archive':>10} | {'random':>6} | GA - random | archive - random"
    )
    for summary in per_budget:
        for name, _, _ in RULES:
            print(
                f"{summary['budget']:>10} | {name:22} | {summary[f'ga_{name}']:>6} | {summary[f'ga_archive_{name}']:>10} | "
                f"{summary[f'random_{name}']:>6} | {summary[f'ga_minus_random_{name}']:+11.2f} | "
                f"{summary[f'ga_archive_minus_random_{name}']:+.2f}"
            )
    print(json.dumps({
        "budgets": budgets,
        "kind": kind,
        "per_budget": per_budget,
        "spearman_mean": {name: round(float(np.mean(v)), 3) for name, v in correlations.items()},
        "picks_best_finalist": {name: f"{count}/{3 * len(budgets)}" for name, count in picks_best.items()},
        "final_slices": final_slices,
        "test_tasks": test_count,
        "seconds": round(time.perf_counter() - started_all, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
