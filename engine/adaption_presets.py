"""The adaption presets: GA and evaluation sizes of a request, and what its search minimises.

Apart from :mod:`engine.adaption` (which re-exports them) so that the web process can name a
run's search metric - the Pareto chart's y-axis - without importing PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What a search slice (AdaptionPreset.search_metric) or the final choice's held-out slices
#: (final_metric) score: "loss", the mean query loss of Algorithm 1, or "accuracy", the query
#: error rate. Among a GA's finalists, held-out query accuracy ranked test accuracy better than
#: either loss (docs/BENCHMARKS.md, "final choice"): after a few inner steps the logits are flat
#: (loss ~2 for 20 ways), so the loss mostly measures their scale, not which class wins.
FINAL_METRICS = ("loss", "accuracy")
#: What the layers a mutation adds (a larger depth) hold: the super-net's "stored" choices or
#: copies of the last layer's ("copy-last"). See engine.search.evolution.GAConfig.deepen.
DEEPEN_MODES = ("stored", "copy-last")
#: The arithmetic of a search slice's scores (AdaptionPreset.search_precision): "float32", or
#: "bfloat16" (CPU autocast: convolutions and matrix products in bfloat16, weights, gradient
#: updates and the final choice's and test tasks' scores in float32). See
#: engine.search.adapt.scoring_precision and docs/ADAPTION.md, "Search precision".
SEARCH_PRECISIONS = ("float32", "bfloat16")
#: Algorithm 1's share of the pool that survives and parents the next (GAConfig.top_fraction).
TOP_FRACTION = 0.1
#: The most depths a search space offers (Adaptive Number of Layers: vgg9's 1-4 layers,
#: resnet12's 1-4 blocks); what the web process, which never builds a space, assumes.
MAX_SPACE_DEPTHS = 4


def elite_count(pool_size: int, top_fraction: float) -> int:
    """Algorithm 1's elites: the best ``round(top_fraction * P)`` survive (at least 1)."""
    return max(1, min(pool_size, round(top_fraction * pool_size)))


def most_depth_elites(pool_size: int, top_fraction: float, depths: int) -> int:
    """The largest ``depth_elites`` (GAConfig) that leaves at least half of the pool to children.

    The elites are the best ``elite_count`` plus at most ``depth_elites`` of each of ``depths``
    depths, and every place they take is one child fewer: a pool of elites alone would score
    nothing new, generation after generation."""
    return max(0, (pool_size // 2 - elite_count(pool_size, top_fraction)) // max(1, depths))


@dataclass(frozen=True)
class AdaptionPreset:
    """GA and evaluation sizes of a request (any of them can be overridden in the request)."""

    name: str
    pool_size: int
    iterations: int
    tasks_per_slice: int
    num_slices: int
    final_candidates: int
    test_tasks: int
    #: Held-out slices of fresh tasks (with the super-net's own query count, not
    #: ``search_queries``) that only the final choice scores on; 0: it uses the search slices.
    final_slices: int = 0
    #: What the final choice minimises on held-out slices: "loss" or "accuracy" (the query
    #: error rate). See FINAL_METRICS.
    final_metric: str = "loss"
    #: Where the GA's finalists come from: "last" (the last generation's best) or "archive"
    #: (every architecture it scored, ranked within slices). See GAConfig.finalists_from.
    finalists_from: str = "last"
    #: Fine-tuning steps on a support set = this x the learner's evaluation inner steps.
    finetune_factor: int = 3
    #: A sweep's budgets run loosest first and each GA's pool starts with at most this many of
    #: the best feasible architectures already scored (GAConfig.warm_start); 0: random Init(P).
    warm_start: int = 0
    #: Stop a GA once its elites have stood still this many generations (GAConfig.patience);
    #: 0: all ``iterations``, as Algorithm 1. No preset sets it: it is the request's choice.
    patience: int = 0
    #: What the GA minimises on its search slices: "loss" (Algorithm 1's mean query loss:
    #: "paper", "tiny") or "accuracy" (the query error rate, ties broken by the loss: "cpu").
    #: See FINAL_METRICS and docs/ADAPTION.md, "What the search minimises".
    search_metric: str = "loss"
    #: What the layers a mutation adds hold: "stored" (every preset) or "copy-last" (the
    #: choices of the last layer before them; an experiment). See GAConfig.deepen.
    deepen: str = "stored"
    #: The best this many architectures of every depth survive as elites besides the best 10 %
    #: (GAConfig.depth_elites); 0 (every preset): Algorithm 1's elites only.
    depth_elites: int = 0
    #: The arithmetic of the search slices' scores: "float32" (every preset) or "bfloat16". See
    #: SEARCH_PRECISIONS.
    search_precision: str = "float32"


ADAPTION_PRESETS: dict[str, AdaptionPreset] = {
    # Seconds on 2 cores with a tiny super-net: tests, demos, smoke checks.
    "tiny": AdaptionPreset("tiny", pool_size=12, iterations=6, tasks_per_slice=4, num_slices=3,
                           final_candidates=3, test_tasks=40, final_slices=1, final_metric="accuracy",
                           finalists_from="archive", warm_start=2),
    # Minutes on a CPU server: a smaller pool and fewer generations than the paper. It searches
    # on the query error rate, not the loss: on full super-nets the error rate ranked sub-nets
    # by test accuracy with Spearman 0.98 against 0.44-0.50 for the loss, and its GA picks were
    # as good or better at 9 of 12 budgets, +1.14 points on average (docs/BENCHMARKS.md, "Which
    # score ranks sub-nets" and "Two more seeds on a full super-net, both search metrics").
    "cpu": AdaptionPreset("cpu", pool_size=50, iterations=40, tasks_per_slice=16, num_slices=4,
                          final_candidates=5, test_tasks=600, final_slices=4, final_metric="accuracy",
                          finalists_from="archive", warm_start=5, search_metric="accuracy"),
    # Algorithm 1 as in the paper (Appendix E): P=100, M=200, one data slice of 16 tasks ("pick
    # 16 tasks to build a data slice for the architectures to traverse"); 600 test tasks. The
    # final choice among its 10 finalists (which the paper leaves open) is ours, as in "cpu".
    # One slice, not several drawn in turn (8 until 2026-12-06): on a `cpu`-preset super-net it
    # chose the same sub-nets as 4 slices at the 30 % and 60 % budgets with a third of the
    # evaluations (docs/BENCHMARKS.md, "One data slice").
    "paper": AdaptionPreset("paper", pool_size=100, iterations=200, tasks_per_slice=16, num_slices=1,
                            final_candidates=10, test_tasks=600, final_slices=4, final_metric="accuracy",
                            finalists_from="archive", warm_start=10),
}  # fmt: skip
