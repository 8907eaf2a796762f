"""Benchmark: hardware-constrained GA adaption (H-Meta-NAS Algorithm 1) vs random search.

Default mode - REAL end to end, through the dashboard's entry point ``engine.adaption.run_adaption``:

1. meta-train a tiny vgg9 super-net on Omniglot (20-way 1-shot, engine.meta "tiny" preset, MAML++
   with progressive shrinking; seconds),
2. measure a latency lookup table of this CPU for its search space (engine.latency LayerTimer,
   few repeats: a quick table, not a careful one),
3. three latency budgets (by default the 10/30/60 % quantiles of random sub-nets' predicted latency;
   ``--budget-quantiles``),
4. one adaption request with the three budgets: GA with the real fitness (mean query loss after
   the MAML++ inner loop from the inherited weights, on 16-task validation slices), random
   search with the GA's number of evaluations, and the test accuracy (mean ± 95 % CI over
   Omniglot test tasks) of both choices per budget. Both end the same way: their finalists are
   compared by query accuracy on 4 held-out slices of fresh validation tasks (quick: 1;
   ``--final-slices 0`` compares them by loss on the search slices, the rule before
   2026-12-05; ``benchmarks/final_choice.py`` compares the rules). The GA's finalists are the
   best of every architecture it scored, ranked within slices (``--finalists-from last``: the
   last generation's best, the rule until the night of 2026-12-05).

``adapt_s`` is the GA's wall time for the middle budget (inside a sweep that shares its fitness
cache with the other budgets); ``ms_per_evaluation`` is the measured mean time of one fitness
evaluation (one architecture on one slice). Speed levers of the real fitness (query images per
class during the search, intra-op threads) are timed separately and printed.

The accuracies are those of a super-net meta-trained for seconds: far below the paper's, and GA vs
random differences at this scale are within the confidence intervals - read them as a working
pipeline, not as a replication.

``--supernet CKPT`` skips step 1 and adapts a super-net meta-trained elsewhere, for the quality
comparison, which needs one trained for longer than seconds, e.g. (about 30 minutes on 2 cores)::

    python -m engine meta-train --dataset omniglot --ways 20 --shots 1 --backbone vgg9 --preset cpu --out RUN
    python benchmarks/ga_adaption.py --supernet RUN/checkpoint.pt --pool 100 --iterations 30 --paper-iterations 0

``--synthetic`` keeps the earlier SYNTHETIC mode (clearly labelled in its output): GA vs random on
an analytic loss model, for the GA's search dynamics at the paper's P=100, M=200.

Then the issue's own request is timed, as the ``paper`` preset makes it: P=100, M=200 (quick: 2),
one 16-task data slice (``--paper-slices`` for more), the middle budget, with
one search process and with ``--search-workers`` processes (the ratio is a figure);
``--paper-production-only`` times the production way alone (at M=200 each way takes minutes);
``--paper-devices cpu,cuda`` also times it on this machine's GPU; ``--sweep-device cuda`` scores
and tests the GA-vs-random sweep there. ``--out DIR`` keeps the folder (LUT, packages, the sweep's
state): started again with the same arguments and ``--lut DIR/lut.json``, a sweep stopped at a
time limit continues where it stopped; the last line's JSON is also written there as
``summary.json`` (``benchmarks/ga_seeds.py`` runs several seeds and sums them up).

``--quick`` finishes in under a minute on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import engine.search.adapt as adapt_module
from benchmarks._scoring import scoring_path
from engine.adaption import ADAPTION_PRESETS, AdaptionRequest, load_supernet, run_adaption
from engine.adaption_presets import SEARCH_PRECISIONS
from engine.atomic import atomic_write_json
from engine.cpu import bfloat16_flags
from engine.latency.eyeriss import EyerissSimulator
from engine.latency.lut import LatencyTable, build_lut
from engine.latency.measure import LayerTimer
from engine.meta.maml import MamlConfig, MamlLearner
from engine.meta.runs import RunSpec, task_source
from engine.meta.service import execute_meta_training
from engine.meta.train import CHECKPOINT_NAME
from engine.search.adapt import SuperNetScorer, inner_loop_from_learner, make_costs_fn, slice_tasks
from engine.search.constraints import Constraint, CostModel
from engine.search.evolution import DEEPEN_MODES, FINALISTS_FROM, GAConfig, run_ga
from engine.search.random_search import random_search
from engine.seeding import derive_seed, seed_everything
from engine.space import SearchSpace
from engine.supernet import SuperNet

SUMMARY_NAME = "summary.json"  # with --out: the last line's JSON, also kept in the folder

# --------------------------------------------------------------------------- SYNTHETIC mode
SYNTHETIC_WAYS = 20
QUERIES_PER_CLASS = 15


class SyntheticFewShotLoss:
    """A seeded analytic stand-in for "mean query loss after the inner loop" (SYNTHETIC)."""

    def __init__(self, space: SearchSpace, costs: CostModel, num_slices: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.space = space
        self.costs = costs
        n = space.n_layers
        self.kernel = {(i, k): float(rng.normal(0, 0.04)) for i in range(n) for k in space.kernels}
        self.width = {(i, w): float(rng.normal(0, 0.04)) for i in range(n) for w in space.widths}
        bias = {"sigmoid": 0.12, "selu": -0.02, "elu": -0.01}
        self.activation = {
            (i, a): bias.get(a, 0.0) + float(rng.normal(0, 0.03)) for i in range(n) for a in space.activations
        }
        self.depth = {d: float(rng.normal(0, 0.05)) for d in space.depths}
        self.slice_difficulty = rng.normal(0, 0.08, size=num_slices)
        self.seed = seed

    def expected_loss(self, arch) -> float:
        arch = arch.canonical()
        params = self.costs.costs(arch)["params"]
        loss = 0.15 + 1.5 * (params / 1e4) ** -0.5 + self.depth[arch.depth]
        for index in range(arch.depth):
            layer = arch.layers[index]
            loss += self.kernel[(index, layer.kernel)] + self.width[(index, layer.width)]
            loss += self.activation[(index, layer.activation)]
        return max(loss, 0.01)

    def __call__(self, arch, slice_id: int) -> float:
        # Estimation noise of a 16-task mean: fixed per (arch, slice), so re-scoring is pointless.
        noise_seed = derive_seed(self.seed, zlib.crc32(f"{arch.canonical().to_json()}|{slice_id}".encode()))
        noise = float(np.random.default_rng(noise_seed).normal(0, 0.05))
        return self.expected_loss(arch) + float(self.slice_difficulty[slice_id]) + noise

    def accuracy(self, arch) -> float:
        return 100.0 * math.exp(-self.expected_loss(arch))


def latency_table(space: SearchSpace, lut_path: str | None) -> tuple[LatencyTable, str]:
    if lut_path:
        return LatencyTable.load(lut_path), f"measured LUT {lut_path}"
    with tempfile.TemporaryDirectory() as folder:
        simulator = EyerissSimulator(cache_path=Path(folder) / "cycles.json")
        table = build_lut(space, simulator, device="eyeriss-simulated")
    return table, "SIMULATED Eyeriss 12x14 @200 MHz (scalesim compute model), not a measured device"


def random_task(generator: torch.Generator, image_size: int):
    prototypes = torch.randn(SYNTHETIC_WAYS, 1, image_size, image_size, generator=generator)
    support_y = torch.arange(SYNTHETIC_WAYS)
    query_y = torch.arange(SYNTHETIC_WAYS).repeat_interleave(QUERIES_PER_CLASS)
    noise = 0.5
    support_x = prototypes + noise * torch.randn(
        SYNTHETIC_WAYS, 1, image_size, image_size, generator=generator
    )
    query_x = prototypes[query_y] + noise * torch.randn(
        len(query_y), 1, image_size, image_size, generator=generator
    )
    return support_x, support_y, query_x, query_y


def time_real_fitness(space: SearchSpace, archs: list, tasks: int, seed: int) -> dict:
    """Wall time of the real fitness (inner loop + query loss) per task, scaled to a 16-task slice."""
    torch.manual_seed(seed)
    supernet = SuperNet(space, bn_steps=5)
    # The MAML++ rule of engine.meta (BN weights not adapted, per-layer per-step rates), untrained.
    learner = MamlLearner(supernet, MamlConfig(inner_steps=5))
    generator = torch.Generator().manual_seed(seed)
    task_list = [random_task(generator, space.image_size) for _ in range(tasks)]
    scorer = SuperNetScorer(supernet, inner_loop_from_learner(learner))
    scorer.score(space.smallest(), task_list[:1])  # warm-up (allocator, first-call overheads)
    per_task_ms = []
    for arch in archs:
        started = time.perf_counter()
        scorer.score(arch, task_list)
        per_task_ms.append(1000 * (time.perf_counter() - started) / tasks)
    return {"per_task_ms": per_task_ms, "mean_ms": 16 * float(np.mean(per_task_ms)), "tasks": tasks}


def synthetic_main(args: argparse.Namespace) -> None:
    """The SYNTHETIC-fitness mode (``--synthetic``): GA vs random on an analytic loss model."""
    pool = args.pool or (50 if args.quick else 100)
    iterations = args.iterations or (60 if args.quick else 200)
    seeds = args.seeds or (2 if args.quick else 3)
    timing_archs = args.timing_archs or (2 if args.quick else 6)
    timing_tasks = args.timing_tasks or (2 if args.quick else 16)
    rngs = seed_everything(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=SYNTHETIC_WAYS)
    lut, lut_source = latency_table(space, args.lut)
    costs = CostModel(make_costs_fn(space, lut))
    fitness = SyntheticFewShotLoss(space, costs, args.slices, seed=0)
    sample = [space.sample(rngs.numpy) for _ in range(2000)]
    latencies = np.array([costs.costs(a)["latency_ms"] for a in sample])
    budgets = [float(np.round(np.quantile(latencies, q), 4)) for q in (0.1, 0.3, 0.6)]
    print(f"space: vgg9 Omniglot 20-way, size {space.size():.3g} ({space.distinct_size():.3g} distinct)")
    print(f"latency: {lut_source}")
    print("fitness for GA vs random: SYNTHETIC analytic few-shot loss; accuracy = 100*exp(-expected loss)")
    print(f"GA: P={pool} M={iterations} slices={args.slices} seeds/budget={seeds}")
    print(f"latency budgets (10/30/60 % quantiles of random archs): {budgets} ms\n")

    rows = []
    for budget in budgets:
        for seed in range(seeds):
            config = GAConfig(pool_size=pool, iterations=iterations, num_slices=args.slices, seed=seed)
            constraint = [Constraint("latency_ms", budget)]
            ga = run_ga(space, fitness, costs, constraint, config)
            rs = random_search(
                space,
                fitness,
                costs,
                constraint,
                evaluations=ga.evaluations,
                num_slices=args.slices,
                final_candidates=config.final_candidates,
                seed=seed,
            )
            rows.append(
                {
                    "budget_ms": budget,
                    "seed": seed,
                    "adapt_s": ga.elapsed_s,
                    "evaluations": ga.evaluations,
                    "cache_hits": ga.cache_hits,
                    "random_evaluations": rs.evaluations,
                    "ga_acc": fitness.accuracy(ga.best_arch),
                    "random_acc": fitness.accuracy(rs.best_arch),
                    "ga_latency_ms": ga.best_costs["latency_ms"],
                    "random_latency_ms": rs.best_costs["latency_ms"],
                    "constraint_met": ga.constraint_met and rs.constraint_met,
                }
            )
            r = rows[-1]
            print(
                f"budget {budget:8.4f} ms seed {seed}: GA acc {r['ga_acc']:.2f} (lat {r['ga_latency_ms']:.4f}) "
                f"vs random {r['random_acc']:.2f} (lat {r['random_latency_ms']:.4f}) | "
                f"{r['evaluations']} evals, {r['cache_hits']} hits, {r['adapt_s']:.2f} s"
            )

    # Time what the GA actually scores: feasible archs of the middle budget.
    middle_feasible = [a for a in sample if costs.costs(a)["latency_ms"] <= budgets[1]]
    timed = middle_feasible[:timing_archs]
    timing = time_real_fitness(space, timed, timing_tasks, seed=0)
    ms_per_evaluation = timing["mean_ms"]
    per_budget = {}
    for budget in budgets:
        mine = [r for r in rows if r["budget_ms"] == budget]
        per_budget[budget] = {
            "ga_acc": float(np.mean([r["ga_acc"] for r in mine])),
            "random_acc": float(np.mean([r["random_acc"] for r in mine])),
        }
    evaluations = float(np.mean([r["evaluations"] for r in rows]))
    print("\nper budget (synthetic accuracy, mean over seeds):")
    for budget, values in per_budget.items():
        gap = values["ga_acc"] - values["random_acc"]
        print(
            f"  {budget:8.4f} ms: GA {values['ga_acc']:.2f}  random {values['random_acc']:.2f}  gap {gap:+.2f}"
        )
    print(
        f"\nreal fitness (random-init super-net, random tasks, 16 x 20-way 1-shot, 5 inner steps): "
        f"{ms_per_evaluation:.0f} ms per evaluation ({len(timed)} feasible archs of the middle budget x "
        f"{timing_tasks} tasks, scaled to 16; per task {min(timing['per_task_ms']):.0f}-"
        f"{max(timing['per_task_ms']):.0f} ms)"
    )
    print(
        f"projected real adaption: {evaluations:.0f} evaluations x {ms_per_evaluation:.0f} ms = "
        f"{evaluations * ms_per_evaluation / 1000:.0f} s (P={pool}, M={iterations}; a projection, not a run)"
    )

    if args.fig4:
        print("\nFigure 4 preset (SYNTHETIC fitness): mean pool loss at iteration")
        checkpoints = [i for i in (10, 25, 50, 100, 150, 200) if i <= iterations]
        middle = [Constraint("latency_ms", budgets[1])]
        for pool_size in (50, 100, 200):
            config = GAConfig(pool_size=pool_size, iterations=iterations, num_slices=args.slices, seed=0)
            result = run_ga(space, fitness, costs, middle, config)
            curve = {h["generation"] + 1: h["mean_loss"] for h in result.history}
            print(f"  P={pool_size:3d}: " + "  ".join(f"M={m}: {curve[m]:.3f}" for m in checkpoints))

    middle_rows = [r for r in rows if r["budget_ms"] == budgets[1]]
    summary = {
        "mode": "SYNTHETIC fitness",
        "adapt_s": round(float(np.mean([r["adapt_s"] for r in middle_rows])), 3),
        "evaluations": int(np.mean([r["evaluations"] for r in middle_rows])),
        "cache_hits": int(np.mean([r["cache_hits"] for r in middle_rows])),
        "ms_per_evaluation": round(ms_per_evaluation, 1),
        "ga_acc": round(per_budget[budgets[1]]["ga_acc"], 2),
        "random_acc": round(per_budget[budgets[1]]["random_acc"], 2),
        "budget": {"kind": "latency_ms", "limit": budgets[1]},
        "constraint_met": all(r["constraint_met"] for r in rows),
        "ga_minus_random_per_budget": {
            str(b): round(v["ga_acc"] - v["random_acc"], 2) for b, v in per_budget.items()
        },
        "projected_real_adapt_s": round(
            float(np.mean([r["evaluations"] for r in middle_rows])) * ms_per_evaluation / 1000, 1
        ),
        "pool": pool,
        "iterations": iterations,
        "synthetic": {
            "fitness": "analytic few-shot loss model (adapt_s, evaluations, cache_hits, ga_acc, random_acc)",
            "accuracy": "100*exp(-expected synthetic loss), not a measured test accuracy",
            "ms_per_evaluation": (
                f"real inner loop on a random-init super-net with random-prototype tasks, "
                f"{timing_tasks} tasks timed and scaled to 16"
            ),
            "latency": lut_source,
        },
    }
    print(json.dumps(summary))


# --------------------------------------------------------------------------- REAL mode
def time_levers(run, spec: RunSpec, archs: list, search_queries: int) -> list[dict]:
    """ms per 16-task evaluation of the real fitness: query images per class x intra-op threads x
    scoring path (engine.search.adapt.SCORING_PATHS: "auto", the production choice between the
    other two per sub-net; "batched", the slice's tasks vmapped together on sliced weights;
    "sliced", one task at a time on sliced weights; "reference", one at a time on the full
    super-net tensors; same losses)."""
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    rows = []
    previous = torch.get_num_threads()
    for queries in sorted({spec.query_count, search_queries}, reverse=True):
        _, batches = task_source(spec.with_(queries=queries), "val")
        tasks = [task for batch in batches(16, 16, 0) for task in slice_tasks(batch)]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for path in adapt_module.SCORING_PATHS:
                with scoring_path(path):
                    scorer.score(archs[0], tasks[:2])  # warm-up
                    started = time.perf_counter()
                    for arch in archs:
                        scorer.score(arch, tasks)
                    ms = 1000 * (time.perf_counter() - started) / len(archs)
                rows.append(
                    {
                        "queries_per_class": queries,
                        "threads": threads,
                        "path": path,
                        "ms_per_evaluation": round(ms, 1),
                    }
                )
    torch.set_num_threads(previous)
    return rows


def production_speedup(levers: list[dict], queries: int) -> float:
    """Reference over production ms per evaluation at the search's query count and 1 thread."""
    ms = {
        row["path"]: row["ms_per_evaluation"]
        for row in levers
        if row["threads"] == 1 and row["queries_per_class"] == queries
    }
    return round(ms["reference"] / ms["auto"], 2)


def _precision(row: dict) -> str:
    """A timed row's search precision (rows written before it was timed are float32)."""
    return row.get("precision", "float32")


def paper_ga_summary(rows: list[dict]) -> dict:
    """Figures of the timed P=100 request: wall time of the production way (all processes,
    "auto" scoring), its ratios to the reference and to one process (absent when only the
    production path was timed), to forced batching where that was timed too (``--paper-batched``),
    and on a GPU its time and its ratio to the CPU's production way in the same run."""

    def seconds(workers: int | None, path: str, device: str) -> float | None:
        matches = [
            row["search_s"]
            for row in rows
            if row["path"] == path
            and row["device"] == device
            and workers in (None, row["search_workers"])
            and not row.get("patience")
            and _precision(row) == "float32"
        ]
        return matches[-1] if matches else None

    summary: dict = {}
    workers = max((row["search_workers"] for row in rows if row["device"] == "cpu"), default=None)
    production = seconds(workers, "auto", "cpu")
    single, reference = seconds(1, "auto", "cpu"), seconds(1, "reference", "cpu")
    batched, cuda = seconds(workers, "batched", "cpu"), seconds(None, "auto", "cuda")
    if production:
        summary["paper_ga_s"] = production
        if reference and single:
            summary["paper_ga_speedup_production"] = round(reference / single, 2)
            summary["paper_ga_speedup_vs_1_process"] = round(single / production, 2)
        if batched:
            summary["paper_ga_speedup_vs_batched"] = round(batched / production, 2)
    # Only the production way repeats with each patience and precision (time_paper_ga).
    production_rows = [
        row
        for row in rows
        if row["device"] == "cpu" and row["path"] == "auto" and row["search_workers"] == workers
    ]
    float32 = {row["patience"]: row for row in production_rows if _precision(row) == "float32"}
    stopped = {patience: row for patience, row in float32.items() if patience}
    if stopped:
        summary["paper_ga_patience_s"] = {str(k): row["search_s"] for k, row in stopped.items()}
        summary["paper_ga_patience_generations"] = {str(k): row["generations"] for k, row in stopped.items()}
        if production:
            summary["paper_ga_patience_speedup"] = {
                str(k): round(production / row["search_s"], 2) for k, row in stopped.items()
            }
    # Each patience's float32 way against the same patience in bfloat16 (same request otherwise).
    bfloat16 = {row["patience"]: row for row in production_rows if _precision(row) == "bfloat16"}
    if bfloat16:
        summary["paper_ga_bfloat16_s"] = {str(k): row["search_s"] for k, row in bfloat16.items()}
        summary["paper_ga_bfloat16_evaluations"] = {str(k): row["evaluations"] for k, row in bfloat16.items()}
        paired = [k for k in bfloat16 if k in float32]
        summary["paper_ga_bfloat16_speedup"] = {
            str(k): round(float32[k]["search_s"] / bfloat16[k]["search_s"], 2) for k in paired
        }
        summary["paper_ga_bfloat16_same_choice"] = {
            str(k): float32[k]["arch"] == bfloat16[k]["arch"] for k in paired
        }
    if cuda:
        summary["paper_ga_cuda_s"] = cuda
        if production:
            summary["paper_ga_cuda_speedup"] = round(production / cuda, 2)
    return summary


def time_paper_ga(
    checkpoint: str,
    lut_path: Path,
    budget: float,
    folder: Path,
    iterations: int,
    workers: int,
    seed: int,
    production_only: bool = False,
    devices: tuple[str, ...] = ("cpu",),
    extra_paths: tuple[str, ...] = (),
    slices: int | None = None,
    patiences: tuple[int, ...] = (0,),
    precisions: tuple[str, ...] = ("float32",),
) -> list[dict]:
    """Wall time of the issue's adaption: P=100, ``iterations`` generations, 16-task slices, one
    latency budget, same request three ways: 1 search process scoring tasks one at a time on the
    full super-net tensors (the reference path), 1 process on the production path ("auto"),
    then ``workers`` processes (production). ``production_only`` times the last way alone (M=200
    takes minutes per way on 2 cores). ``extra_paths`` first time the last way with each of those
    scoring paths forced for every slice (e.g. "batched", the production path before "auto", or
    "grouped"). ``devices`` with
    "cuda" adds the same request scored on this machine's GPU (one process, production path:
    batched there) as a last row. The request is the ``paper`` preset's (its final choice: 10
    finalists on 4 held-out slices); ``slices`` overrides its one 16-task data slice (None: the
    preset's). Until 2026-12-06 this timed the ``tiny`` preset's final choice (3 finalists, 1
    held-out slice) with 3 search slices. ``patiences`` repeats the production way (the last
    ``workers`` processes, "auto") with each ``GAConfig.patience`` after the first (0: all
    ``iterations``, Algorithm 1), and each of those with every search precision in
    ``precisions`` (``AdaptionRequest.search_precision``; the other ways use the first)."""
    rows = []
    slices = ADAPTION_PRESETS["paper"].num_slices if slices is None else slices
    variants = [(1, "reference", "cpu"), (1, "auto", "cpu")] + (
        [(workers, "auto", "cpu")] if workers > 1 else []
    )
    if production_only:
        variants = variants[-1:]
    for extra in extra_paths:
        variants.insert(len(variants) - 1, (variants[-1][0], extra, "cpu"))
    if "cpu" not in devices:
        variants = []
    variants = [(*variant, patiences[0], precisions[0]) for variant in variants]
    if variants and variants[-1][2] == "cpu":
        production = variants.pop()[:3]
        variants += [(*production, patience, precision) for patience in patiences for precision in precisions]
    if "cuda" in devices:
        variants.append((1, "auto", "cuda", patiences[0], "float32"))
    for search_workers, path, device, patience, precision in variants:
        request = AdaptionRequest(
            supernet=checkpoint,
            constraint="latency_ms",
            budgets=(budget,),
            lut=str(lut_path),
            preset="paper",
            pool_size=100,
            iterations=iterations,
            tasks_per_slice=16,
            num_slices=slices,
            seed=seed,
            search_queries=1,
            test_tasks=0,
            random_baseline=False,
            weights="meta",
            export_onnx=False,
            threads=1,
            search_workers=search_workers,
            device=device,
            patience=patience,
            search_precision=precision,
        )
        name = (
            f"paper_ga_{search_workers}_{path}_{device}"
            + (f"_patience{patience}" if patience else "")
            + ("" if precision == "float32" else f"_{precision}")
        )
        with scoring_path(path):
            result = run_adaption(request, out_dir=folder / name)
        search = result.outcomes[0].model_card["search"]
        rows.append(
            {
                "search_workers": search_workers,
                "slices": slices,
                "path": path,
                "device": device,
                "search_s": round(result.search_s, 2),
                "evaluations": result.evaluations,
                "cache_hits": result.cache_hits,
                "ms_per_evaluation": round(result.ms_per_evaluation, 1),
                "arch": result.outcomes[0].arch_code,
                "loss": search["loss"],
                "patience": patience,
                "precision": precision,
                "generations": search["generations"],
            }
        )
        print(
            f"P=100 M={iterations} {slices} slice(s) x 16 tasks, {device}, {search_workers} search process(es), {path}, "
            f"patience {patience or 'none'} ({search['generations']} generations run), {precision}: "
            f"{result.search_s:.1f} s, "
            f"{result.evaluations} evaluations, {result.cache_hits} cache hits, "
            f"{result.ms_per_evaluation:.1f} ms per evaluation (wall), arch {result.outcomes[0].arch_code} "
            f"(search loss {search['loss']})"
        )
    return rows


class PrintedProgress:
    """run_adaption's progress as a few plain lines: a long run on a slow CPU shows where it is.

    One line per tenth of each budget's GA generations and per quarter of each later stage,
    with the seconds since the request began (plain lines, not a bar, so a log file stays readable).
    """

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._printed: set[tuple] = set()

    def _print(self, key: tuple, text: str) -> None:
        if key not in self._printed:
            self._printed.add(key)
            print(f"  [{time.perf_counter() - self._started:7.1f} s] {text}", flush=True)

    def __call__(self, event: dict) -> None:
        if event["kind"] == "adapt":
            generations, done = event["generations"], event["generation"] + 1
            tenth = max(1, generations // 10)
            if done % tenth == 0 or done == generations:
                best = event["best_fitness"]
                score = "error rate" if event.get("metric") == "accuracy" else "loss"
                self._print(
                    ("adapt", event["budget_index"], done),
                    f"GA budget {event['budget_index'] + 1}/{event['budgets']}, generations done "
                    f"{done}/{generations}: best {score} {'none feasible' if best is None else f'{best:.4f}'} "
                    f"(on this generation's slice {event['slice'] + 1}; slices rotate), "
                    f"{event['evaluations']} evaluations, {event['cache_hits']} cache hits",
                )
        elif event["kind"] == "adapt_stage":
            total, current = max(1, event["total"]), event["current"]
            quarter = min(4, 4 * current // total)
            if quarter > 0:
                self._print(
                    ("stage", event["stage"], event.get("budget_index"), quarter),
                    f"{event['stage'].replace('_', ' ')}: {current}/{event['total']}",
                )


def real_main(args: argparse.Namespace) -> None:
    quick = args.quick
    threads = args.threads
    torch.set_num_threads(threads)
    pool = args.pool or (12 if quick else 30)
    iterations = args.iterations or (6 if quick else 15)
    tasks_per_slice = args.tasks_per_slice or (8 if quick else 16)
    slices = args.slices or (2 if quick else 4)
    test_tasks = args.test_tasks or (150 if quick else 600)
    search_queries = args.search_queries
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="ga_adaption_"))
    # With --out the sweep's adaption state lives there: a run stopped at a time limit (a lent GPU
    # machine's 10-minute calls) continues where it stopped when started again with the same
    # arguments and --lut (run_adaption refuses a state that belongs to another request).
    sweep_state = folder / "sweep_state.json" if args.out else None
    resumed = sweep_state is not None and sweep_state.exists()
    if args.supernet:
        # A super-net meta-trained elsewhere (e.g. ``python -m engine meta-train --preset cpu``):
        # the quality comparison needs one trained for longer than this script can afford.
        spec, run, trained_iterations = load_supernet(args.supernet)
        checkpoint = str(args.supernet)
        train_s = 0.0
        print(
            f"REAL mode: Omniglot {spec.ways}-way {spec.shots}-shot, {spec.backbone} super-net from "
            f"{checkpoint} ({spec.preset} preset, {trained_iterations} meta-iterations), folder {folder}"
        )
    else:
        spec = RunSpec(
            dataset="omniglot",
            ways=args.ways,
            shots=1,
            backbone="vgg9",
            preset="tiny",
            iterations=args.train_iterations or (None if quick else 300),
            threads=threads,
            seed=args.seed,
        )
        print(f"REAL mode: Omniglot {spec.ways}-way 1-shot, tiny vgg9 super-net, folder {folder}")
        started = time.perf_counter()
        trained = execute_meta_training(spec, folder / "supernet", eval_tasks=0)  # tested below
        train_s = time.perf_counter() - started
        checkpoint = str(folder / "supernet" / CHECKPOINT_NAME)
        spec, run, trained_iterations = load_supernet(checkpoint)
        print(
            f"meta-trained {trained_iterations} iterations in {train_s:.1f} s (train query accuracy, "
            f"last 20 meta-batches: {100 * trained['train_accuracy_last20']:.1f} %)"
        )

    started = time.perf_counter()
    if args.lut:
        lut = LatencyTable.load(args.lut)
        lut_source = f"LatencyTable {args.lut} (device {lut.device})"
    else:
        timer = LayerTimer(
            repeats=3 if quick else 10, warmup=1 if quick else 3, threads=1, subtract_call_overhead=True
        )
        lut = build_lut(run.space, timer, device="local-cpu", metadata=timer.metadata())
        lut_source = "measured on this CPU (1 thread, TorchScript, few repeats; shared machine)"
    lut_path = lut.save(folder / "lut.json")
    lut_s = time.perf_counter() - started
    print(f"latency table: {len(lut)} layers, {lut_s:.1f} s, {lut_source}")

    rng = np.random.default_rng(args.seed)
    sample = [run.space.sample(rng) for _ in range(2000)]
    latencies = np.array([lut.predict(run.space, arch) for arch in sample])
    quantiles = args.budget_quantiles
    budgets = tuple(float(f"{np.quantile(latencies, q):.4g}") for q in quantiles)
    names = "/".join(f"{100 * q:g}" for q in quantiles)
    print(f"latency budgets ({names} % quantiles of random sub-nets' predicted latency): {budgets} ms")

    middle = [arch for arch, ms in zip(sample, latencies, strict=True) if ms <= budgets[1]]
    levers = time_levers(run, spec, middle[: 2 if quick else 6], search_queries or 1)
    print("real fitness, one 16-task evaluation (feasible archs of the middle budget):")
    for row in levers:
        print(
            f"  {row['queries_per_class']} query images/class, {row['threads']} thread(s), {row['path']}: "
            f"{row['ms_per_evaluation']:.0f} ms"
        )

    request = AdaptionRequest(
        supernet=checkpoint,
        constraint="latency_ms",
        budgets=budgets,
        lut=str(lut_path),
        preset="tiny",
        pool_size=pool,
        iterations=iterations,
        tasks_per_slice=tasks_per_slice,
        num_slices=slices,
        final_candidates=min(3 if quick else 5, pool),
        final_slices=(1 if quick else 4) if args.final_slices is None else args.final_slices,
        final_metric=args.final_metric,
        search_metric=args.search_metric,
        finalists_from=args.finalists_from,
        # The paper preset's 10 at P=100: the best 10 %, as many as survive as elites.
        warm_start=max(1, round(0.1 * pool)) if args.warm_start is None else args.warm_start,
        patience=args.patience,
        deepen=args.deepen,
        depth_elites=args.depth_elites,
        search_precision=args.search_precision,
        seed=args.seed,
        search_queries=search_queries,
        test_tasks=test_tasks,
        weights="meta",
        export_onnx=False,
        threads=threads,
        device=args.sweep_device,
    )
    ga_config = request.ga_config()
    final_slices = ga_config.final_slices
    print(
        f"GA: P={pool} M={iterations}, {slices} slices x {tasks_per_slice} tasks, on {args.sweep_device}, "
        f"query images/class while searching: {search_queries or spec.query_count}, minimising the "
        f"{'error rate' if request.search_metric_value == 'accuracy' else 'loss'}; test tasks {test_tasks}; "
        f"GA finalists from the {ga_config.finalists_from}; warm start {ga_config.warm_start}; "
        f"patience {ga_config.patience or 'none'}; added layers {ga_config.deepen}; "
        f"elites per depth {ga_config.depth_elites or 'none'}; "
        f"search precision {request.search_precision_value} "
        f"(CPU bfloat16 flags: {', '.join(bfloat16_flags()) or 'none'}); "
        f"final choice on {final_slices or 'the search'} slices"
        + (
            f" held out ({spec.query_count} query images/class, by {request.final_metric_value})"
            if final_slices
            else ""
        )
    )
    started = time.perf_counter()
    if resumed:
        print(f"resuming the sweep from {sweep_state}: its times below cover this process only")
    result = run_adaption(
        request, out_dir=folder / "packages", progress=PrintedProgress(), state_path=sweep_state
    )
    total_s = time.perf_counter() - started
    rows = []
    for outcome in result.outcomes:
        ga, rs = outcome.test_accuracy, outcome.random
        # None only for a sweep resumed from a state scored before the per-task lists were kept.
        paired = rs["ga_minus_random"] or {"mean": math.nan, "ci95": math.nan}
        rows.append(
            {
                "budget_ms": outcome.budget["limit"],
                "ga_arch": outcome.arch_code,
                "ga_latency_ms": outcome.costs["latency_ms"],
                "ga_acc": 100 * ga["mean"],
                "ga_ci95": 100 * ga["ci95"],
                "random_arch": rs["arch_code"],
                "random_latency_ms": rs["costs"]["latency_ms"],
                "random_acc": 100 * rs["test_accuracy"]["mean"],
                "random_ci95": 100 * rs["test_accuracy"]["ci95"],
                # Paired on the same test tasks: tighter than the two CIs above taken apart.
                "ga_minus_random": 100 * paired["mean"],
                "ga_minus_random_ci95": 100 * paired["ci95"],
                "adapt_s": outcome.search_s,
                "random_s": rs["elapsed_s"],
                "evaluations": outcome.evaluations,
                "random_evaluations": rs["evaluations"],
                "cache_hits": outcome.cache_hits,
                "warm_start_seeds": outcome.model_card["search"]["warm_start_seeds"],
                "generations": outcome.model_card["search"]["generations"],
                "random_inherited": rs["inherited"],
                "constraint_met": outcome.constraint_met and rs["constraint_met"],
            }
        )
        r = rows[-1]
        print(
            f"budget {r['budget_ms']:.4g} ms: GA {r['ga_acc']:.2f} ± {r['ga_ci95']:.2f} % ({r['ga_arch']}, "
            f"{r['ga_latency_ms']:.4g} ms) vs random {r['random_acc']:.2f} ± {r['random_ci95']:.2f} % "
            f"({r['random_arch']}, {r['random_latency_ms']:.4g} ms); GA - random "
            f"{r['ga_minus_random']:+.2f} ± {r['ga_minus_random_ci95']:.2f} points (paired) | GA {r['evaluations']} evals, "
            f"{r['cache_hits']} hits, {r['warm_start_seeds']} seeds, {r['generations']} generations, "
            f"{r['adapt_s']:.1f} s; random "
            f"{r['random_evaluations']} evals, {r['random_inherited']} inherited"
        )
    paper_iterations = (2 if quick else 200) if args.paper_iterations is None else args.paper_iterations
    paper_rows = (
        time_paper_ga(
            checkpoint,
            lut_path,
            budgets[1],
            folder,
            paper_iterations,
            args.search_workers,
            args.seed,
            production_only=args.paper_production_only,
            devices=tuple(args.paper_devices.split(",")),
            # --paper-batched is the older spelling of --paper-paths batched.
            extra_paths=(("batched",) if args.paper_batched else ()) + args.paper_paths,
            slices=args.paper_slices,
            patiences=args.paper_patience,
            precisions=args.paper_precisions,
        )
        if paper_iterations > 0
        else []
    )
    print(
        f"adaption request total {total_s:.1f} s (GA sweep {result.search_s:.1f} s, random {result.random_s:.1f} s, "
        f"{result.evaluations} evaluations, {result.cache_hits} cache hits, "
        f"{result.ms_per_evaluation:.0f} ms per evaluation)"
    )
    mid = rows[1]
    summary = {
        "mode": "real",
        "adapt_s": round(mid["adapt_s"], 3),
        "evaluations": mid["evaluations"],
        "cache_hits": mid["cache_hits"],
        "ms_per_evaluation": round(result.ms_per_evaluation, 1),
        "ga_acc": round(mid["ga_acc"], 2),
        "random_acc": round(mid["random_acc"], 2),
        "budget": {"kind": "latency_ms", "limit": mid["budget_ms"]},
        "constraint_met": all(r["constraint_met"] for r in rows),
        "per_budget": [
            {
                k: (round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v
                for k, v in r.items()
            }
            for r in rows
        ],
        "ga_minus_random_per_budget": {
            str(r["budget_ms"]): round(r["ga_acc"] - r["random_acc"], 2) for r in rows
        },
        "ga_minus_random_ci95_per_budget": {
            str(r["budget_ms"]): round(r["ga_minus_random_ci95"], 2)
            if math.isfinite(r["ga_minus_random_ci95"])
            else None
            for r in rows
        },
        "sweep_s": round(result.search_s, 2),
        "request_s": round(total_s, 2),
        "train_s": round(train_s, 2),
        "train_iterations": trained_iterations,
        "supernet": checkpoint if args.supernet else "tiny, trained here",
        "lut_s": round(lut_s, 2),
        "levers": levers,
        "production_speedup": production_speedup(levers, search_queries or 1),
        "paper_ga": paper_rows,
        **(paper_ga_summary(paper_rows) if paper_rows else {}),
        "config": {
            "ways": spec.ways,
            "pool": pool,
            "iterations": iterations,
            "tasks_per_slice": tasks_per_slice,
            "slices": slices,
            "final_slices": final_slices,
            "final_metric": request.final_metric_value,
            "search_metric": request.search_metric_value,
            "finalists_from": ga_config.finalists_from,
            "warm_start": ga_config.warm_start,
            "patience": ga_config.patience,
            "deepen": ga_config.deepen,
            "depth_elites": ga_config.depth_elites,
            "search_precision": request.search_precision_value,
            "test_tasks": test_tasks,
            "search_queries": search_queries or spec.query_count,
            "threads": threads,
            "sweep_device": args.sweep_device,
            "resumed": resumed,
        },
    }
    if args.out:
        # benchmarks/ga_seeds.py collects the sweeps of several seeds from here.
        atomic_write_json(folder / SUMMARY_NAME, summary)
    print(json.dumps(summary))


def budget_quantiles_argument(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) < 2 or not all(0 < value < 1 for value in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected two or more increasing quantiles in (0, 1), got {text!r}")
    return values


def _patiences(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(value < 0 for value in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return values


def _precisions(text: str) -> tuple[str, ...]:
    values = tuple(filter(None, text.split(",")))
    if not values or len(set(values)) != len(values) or not set(values) <= set(SEARCH_PRECISIONS):
        raise argparse.ArgumentTypeError(
            f"expected distinct values among {','.join(SEARCH_PRECISIONS)}, got {text!r}"
        )
    return values


def _scoring_paths(text: str) -> tuple[str, ...]:
    paths = tuple(filter(None, text.split(",")))
    unknown = sorted(set(paths) - set(adapt_module.SCORING_PATHS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {adapt_module.SCORING_PATHS}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small preset, under a minute")
    parser.add_argument("--synthetic", action="store_true", help="the SYNTHETIC analytic-fitness mode")
    parser.add_argument("--pool", type=int, default=None, help="GA pool size P")
    parser.add_argument("--iterations", type=int, default=None, help="GA iterations M")
    parser.add_argument("--slices", type=int, default=None, help="validation slices")
    parser.add_argument(
        "--lut", default=None, help="LatencyTable JSON (real: of the tiny space; synthetic: vgg9)"
    )
    parser.add_argument("--seed", type=int, default=0)
    real = parser.add_argument_group("real mode")
    real.add_argument("--ways", type=int, default=20)
    real.add_argument(
        "--train-iterations",
        type=int,
        default=None,
        help="meta-iterations (quick: the tiny preset's 48; else 300)",
    )
    real.add_argument("--tasks-per-slice", type=int, default=None)
    real.add_argument(
        "--final-slices",
        type=int,
        default=None,
        help="held-out slices for the GA's and random search's final choice (default 4, quick 1; 0: none)",
    )
    real.add_argument(
        "--final-metric",
        choices=("loss", "accuracy"),
        default=None,
        help="the final choice's criterion on the held-out slices (default: accuracy, the preset's)",
    )
    real.add_argument(
        "--search-metric",
        choices=("loss", "accuracy"),
        default=None,
        help="what the GA and random search minimise while searching (default: loss, Algorithm 1's)",
    )
    real.add_argument(
        "--finalists-from",
        choices=FINALISTS_FROM,
        default=None,
        help="the GA's finalists: the last generation's best, or the best of all it scored (default archive, the preset's)",
    )
    real.add_argument(
        "--warm-start",
        type=int,
        default=None,
        help="GA pools seeded with this many of the best fitting sub-nets already scored, budgets "
        "loosest first (default 10 %% of --pool; 0: random pools in the given order)",
    )
    real.add_argument(
        "--budget-quantiles",
        type=budget_quantiles_argument,
        default=(0.1, 0.3, 0.6),
        help="latency budgets (two or more) as quantiles of random sub-nets' latency, e.g. 0.3,0.6,0.9; "
        "the summary's figures are the second budget's",
    )
    real.add_argument(
        "--test-tasks", type=int, default=None, help="test tasks per accuracy (quick 150, else 600)"
    )
    real.add_argument("--search-queries", type=int, default=1, help="query images per class while searching")
    real.add_argument("--threads", type=int, default=2)
    real.add_argument(
        "--search-workers", type=int, default=2, help="processes of the timed P=100 adaption (vs 1 process)"
    )
    real.add_argument(
        "--paper-iterations",
        type=int,
        default=None,
        help="M of the timed P=100 adaption (200; quick 2; 0 skips it)",
    )
    real.add_argument(
        "--paper-slices",
        type=int,
        default=None,
        help="16-task slices of the timed P=100 adaption (default: the paper preset's one data slice)",
    )
    real.add_argument(
        "--patience",
        type=int,
        default=None,
        help="the sweep's GAs stop once their elites stood still this many generations (default: none)",
    )
    real.add_argument(
        "--deepen",
        choices=DEEPEN_MODES,
        default=None,
        help="what the layers a GA mutation adds hold: stored (default, Algorithm 1 on this encoding) "
        "or copy-last (the last layer's choices)",
    )
    real.add_argument(
        "--depth-elites",
        type=int,
        default=None,
        help="the sweep's GAs keep the best this many sub-nets of every depth as elites too (default: none)",
    )
    real.add_argument(
        "--search-precision",
        choices=SEARCH_PRECISIONS,
        default=None,
        help="arithmetic of the sweep's search slices (GA and random search): float32 (default) or "
        "bfloat16 (CPU autocast; the final choice and the test tasks stay float32)",
    )
    real.add_argument(
        "--paper-precisions",
        type=_precisions,
        default=("float32",),
        help="comma-separated search precisions of the timed P=100 adaption; the production way runs "
        "once per value and patience (default float32), e.g. float32,bfloat16",
    )
    real.add_argument(
        "--paper-patience",
        type=_patiences,
        default=(0,),
        help="comma-separated GA patiences of the timed P=100 adaption; the production way runs once per "
        "value after the first (default 0: all M generations, Algorithm 1), e.g. 0,20",
    )
    real.add_argument(
        "--paper-production-only",
        action="store_true",
        help="time the P=100 adaption on the production path only ('auto' scoring, --search-workers processes)",
    )
    real.add_argument(
        "--paper-batched",
        action="store_true",
        help="also time the production way with every slice batched (SCORING_PATH 'batched'), before it",
    )
    real.add_argument(
        "--paper-paths",
        type=_scoring_paths,
        default=(),
        help="also time the production way with these scoring paths forced, before it (e.g. grouped,sliced)",
    )
    real.add_argument(
        "--paper-devices",
        default="cpu",
        help="where the timed P=100 adaption runs: cpu, cuda or cpu,cuda (the GPU way: 1 process, batched)",
    )
    real.add_argument(
        "--out",
        default=None,
        help="folder for the LUT, packages and the sweep's resumable state (default: a new temporary one)",
    )
    real.add_argument(
        "--sweep-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the GA-vs-random sweep scores and tests its sub-nets (cuda: one process, batched)",
    )
    real.add_argument(
        "--supernet",
        default=None,
        help="super-net checkpoint to adapt instead of meta-training a tiny one here "
        "(e.g. from python -m engine meta-train --preset cpu)",
    )
    synthetic = parser.add_argument_group("synthetic mode")
    synthetic.add_argument("--seeds", type=int, default=None, help="seeds per budget (default 3; quick 2)")
    synthetic.add_argument("--timing-archs", type=int, default=None)
    synthetic.add_argument("--timing-tasks", type=int, default=None)
    synthetic.add_argument("--fig4", action="store_true", help="also run the Figure 4 preset (P=50/100/200)")
    args = parser.parse_args()
    if args.synthetic:
        if args.slices is None:
            args.slices = 8
        synthetic_main(args)
    else:
        real_main(args)


if __name__ == "__main__":
    main()
