"""Benchmark: the GA against random search over several seeds, per budget.

One sweep of ``benchmarks/ga_adaption.py`` pits one GA run against one random search with the same
number of evaluations. Which of the two is lucky varies from seed to seed. On the fourth full
super-net (docs/BENCHMARKS.md, "Five seeds on a fourth full super-net") the GA's picks stayed within
about 2 points of each other across five seeds, while random search's spread over up to 9.5
points. One seed's sweep therefore says little about the GA's lead. This script runs the same
sweep for several seeds (``--jobs`` at a time, each in its own folder under ``--out``) and reports,
per budget:

* the mean of GA - random (test accuracy on the same 600 tasks, points) with a 95 % Student-t
  interval over the seeds;
* the smallest lead, and on how many seeds the GA led by at least ``--goal-points``;
* how many single sweeps met the issue's goal (a lead of ``--goal-points`` at ``--goal-budgets``
  budgets), and whether the *mean* leads meet it.

Each seed's folder holds the sweep's resumable state, its log and ``summary.json``. Started again
with the same arguments, the script keeps finished seeds and lets ``ga_adaption.py`` continue the
unfinished ones. A folder made by another command is refused, not overwritten.

    python benchmarks/ga_seeds.py --supernet RUN/checkpoint.pt --lut T/lut.json --seeds 1,2,3,4,5 \\
        --out DIR -- --pool 100 --iterations 50 --slices 1 --test-tasks 600 --patience 10 \\
        --search-queries 3 --search-metric accuracy
    python benchmarks/ga_seeds.py --quick

Arguments after ``--`` go unchanged to every ``ga_adaption.py`` run; this script adds ``--seed``,
``--out``, ``--threads``, ``--budget-quantiles``, ``--paper-iterations 0`` and, where given,
``--supernet`` and ``--lut``. ``--quick`` runs two seeds of ``ga_adaption.py --quick``. Each of
those meta-trains its own seconds-long super-net, so the seeds differ in the super-net too: a
smoke check of the pipeline, not a measurement.

``--compare-with DIR`` names another run of this script (same seeds, same budgets; for example
the same sweeps without a GA option passed after ``--``) and adds, per budget, this run's GA
minus that run's GA (test accuracy on the same tasks, points) with its 95 % t interval over the
seeds, and both GAs' picks' depths. Each seed's line shows the depth of its GA's picks.

Last line: JSON with ``ga_minus_random_mean``, ``ga_minus_random_ci95``, ``seeds_leading_by_goal``
(one entry per budget), ``sweeps_meeting_goal`` and ``goal_met_by_mean``; with ``--compare-with``
also ``ga_minus_compared_mean``, ``ga_minus_compared_ci95`` and ``ga_depths``/``compared_depths``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ga_adaption import SUMMARY_NAME, budget_quantiles_argument  # noqa: E402
from engine.atomic import atomic_write_json  # noqa: E402

GA_ADAPTION = Path(__file__).resolve().parent / "ga_adaption.py"
COMMAND_NAME = "command.json"

# Two-sided 95 % critical values of Student's t for 1..30 degrees of freedom (standard tables;
# scipy is not a dependency). Beyond 30 the 30-df value is used: at most 4 % wider than exact.
T_CRITICAL_95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_critical_95(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError("a t interval needs at least two values")
    return T_CRITICAL_95[min(degrees_of_freedom, len(T_CRITICAL_95)) - 1]


def mean_with_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (NaN for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_critical_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(leads_by_seed: dict[int, Sequence[float]], goal_points: float, goal_budgets: int) -> dict:
    """``leads_by_seed``: per seed, GA - random in points at each budget (same budget order for
    every seed). Per budget: mean, 95 % interval, smallest lead, seeds leading by the goal; then
    how many sweeps, and whether the mean leads, reach the goal at ``goal_budgets`` budgets."""
    if not leads_by_seed:
        raise ValueError("no finished sweeps to sum up")
    budget_counts = {len(leads) for leads in leads_by_seed.values()}
    if len(budget_counts) != 1:
        raise ValueError(f"the sweeps have different numbers of budgets: {sorted(budget_counts)}")
    per_budget = list(zip(*leads_by_seed.values(), strict=True))
    means, intervals = zip(*(mean_with_ci95(leads) for leads in per_budget), strict=True)
    budgets_where_mean_meets_goal = sum(mean >= goal_points for mean in means)
    return {
        "seeds": sorted(leads_by_seed),
        "ga_minus_random_mean": list(means),
        "ga_minus_random_ci95": list(intervals),
        "ga_minus_random_min": [min(leads) for leads in per_budget],
        "seeds_leading_by_goal": [sum(lead >= goal_points for lead in leads) for leads in per_budget],
        "sweeps_meeting_goal": sum(
            sum(lead >= goal_points for lead in leads) >= goal_budgets for leads in leads_by_seed.values()
        ),
        "budgets_where_mean_meets_goal": budgets_where_mean_meets_goal,
        "goal_met_by_mean": budgets_where_mean_meets_goal >= goal_budgets,
        # Budgets where the GA is ahead beyond the seeds' scatter (the interval excludes zero).
        "budgets_ahead_beyond_ci": sum(
            mean - interval > 0
            for mean, interval in zip(means, intervals, strict=True)
            if math.isfinite(interval)
        ),
    }


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def pick_depth(arch_code: str) -> int:
    """The depth of a pick from its code (``d2:3/1/relu,...``, engine.search.package.arch_code)."""
    head = arch_code.split(":", 1)[0]
    if not head.startswith("d") or not head[1:].isdigit():
        raise ValueError(f"not an architecture code: {arch_code!r}")
    return int(head[1:])


def compare_runs(ours: dict[int, dict], theirs: dict[int, dict]) -> dict:
    """Per budget, our GA's test accuracy minus theirs over the seeds both ran (``summary.json``
    of each seed's sweep), with a 95 % t interval, and both GAs' pick depths per seed. The two
    runs must share each seed's budgets: the same table and quantiles, so the same
    sub-nets fit."""
    seeds = sorted(set(ours) & set(theirs))
    if len(seeds) < 2:
        raise ValueError(f"the compared runs share {len(seeds)} finished seed(s); two are needed")
    for seed in seeds:
        budgets, other_budgets = _column(ours[seed], "budget_ms"), _column(theirs[seed], "budget_ms")
        if budgets != other_budgets:
            raise ValueError(
                f"seed {seed} has other budgets in the compared run: {other_budgets} ms, not {budgets}"
            )
    differences = [
        [
            ga - other
            for ga, other in zip(_column(ours[seed], "ga_acc"), _column(theirs[seed], "ga_acc"), strict=True)
        ]
        for seed in seeds
    ]
    means, intervals = zip(
        *(mean_with_ci95(column) for column in zip(*differences, strict=True)), strict=True
    )
    return {
        "compared_seeds": seeds,
        "ga_minus_compared_mean": list(means),
        "ga_minus_compared_ci95": list(intervals),
        "ga_depths": {str(seed): [pick_depth(c) for c in _column(ours[seed], "ga_arch")] for seed in seeds},
        "compared_depths": {
            str(seed): [pick_depth(c) for c in _column(theirs[seed], "ga_arch")] for seed in seeds
        },
    }


def _column(summary: dict, key: str) -> list:
    return [row[key] for row in summary["per_budget"]]


def sweep_command(args: argparse.Namespace, seed: int, folder: Path, passed: Sequence[str]) -> list[str]:
    command = [sys.executable, str(GA_ADAPTION), *passed]
    if args.quick:
        command.append("--quick")
    for flag, value in (("--supernet", args.supernet), ("--lut", args.lut)):
        if value:
            command += [flag, value]
    quantiles = ",".join(f"{q:g}" for q in args.budget_quantiles)
    return command + [
        "--budget-quantiles", quantiles,
        "--threads", str(args.threads),
        "--paper-iterations", "0",
        "--seed", str(seed),
        "--out", str(folder),
    ]  # fmt: skip


def finished_summary(command: list[str], folder: Path) -> dict | None:
    """The summary of ``command``'s sweep in ``folder`` once it has finished, else None. A folder
    that holds another command's sweep is refused: its state belongs to another request."""
    recorded = folder / COMMAND_NAME
    if not recorded.exists():
        return None
    earlier = json.loads(recorded.read_text())
    # Compared without the interpreter's path, which may differ between virtual environments.
    if earlier[1:] != command[1:]:
        raise SystemExit(
            f"{folder} holds a sweep of another command ({' '.join(earlier[1:])}); "
            "choose another --out or remove that folder"
        )
    summary_path = folder / SUMMARY_NAME
    return json.loads(summary_path.read_text()) if summary_path.exists() else None


def run_sweep(command: list[str], folder: Path) -> tuple[dict, float]:
    """Run (or continue) one seed's sweep; its summary and wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / COMMAND_NAME, command)
    started = time.perf_counter()
    # ga_adaption.py imports the repository's packages (benchmarks._scoring, engine).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
    }
    with open(folder / "log.txt", "ab") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if finished.returncode != 0:
        raise SystemExit(
            f"the sweep in {folder} failed (exit {finished.returncode}); see {folder / 'log.txt'}"
        )
    return json.loads((folder / SUMMARY_NAME).read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="two seeds of ga_adaption.py --quick (about a minute)"
    )
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 1,2,3,4,5; quick 1,2)")
    parser.add_argument("--jobs", type=int, default=2, help="sweeps at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per sweep")
    parser.add_argument(
        "--budget-quantiles",
        type=budget_quantiles_argument,
        default=None,
        help="budgets as quantiles of random sub-nets' latency (default 0.3,0.5,0.7,0.9; quick 0.3,0.6)",
    )
    parser.add_argument("--goal-points", type=float, default=1.0, help="the lead the issue asks for")
    parser.add_argument(
        "--goal-budgets", type=int, default=None, help="at how many budgets (default 3, at most all of them)"
    )
    parser.add_argument("--supernet", default=None, help="super-net checkpoint for every sweep")
    parser.add_argument(
        "--lut", default=None, help="latency table for every sweep (one table: equal budgets)"
    )
    parser.add_argument(
        "--out", default=None, help="folder of the seeds' sweeps (default: a new temporary one)"
    )
    parser.add_argument(
        "--compare-with",
        default=None,
        help="--out folder of another run (same seeds and budgets): also report this GA minus that one",
    )
    own, passed = _split_at_double_dash(sys.argv[1:])
    args = parser.parse_args(own)
    if args.budget_quantiles is None:
        args.budget_quantiles = (0.3, 0.6) if args.quick else (0.3, 0.5, 0.7, 0.9)
    if args.goal_budgets is None:
        # The three budgets; --quick's two-budget sweeps are checked at both.
        args.goal_budgets = min(3, len(args.budget_quantiles))
    if not 1 <= args.goal_budgets <= len(args.budget_quantiles):
        parser.error(f"--goal-budgets must be between 1 and the {len(args.budget_quantiles)} budgets")
    try:
        seeds = [int(seed) for seed in (args.seeds or ("1,2" if args.quick else "1,2,3,4,5")).split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        parser.error("--seeds needs two or more different seeds")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    compared = _finished_summaries(Path(args.compare_with), seeds) if args.compare_with else None
    if compared is not None and len(compared) < 2:
        parser.error(
            f"--compare-with {args.compare_with} holds fewer than two finished sweeps of these seeds"
        )
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ga_seeds_"))
    folders = {seed: seed_folder(out, seed) for seed in seeds}
    commands = {seed: sweep_command(args, seed, folders[seed], passed) for seed in seeds}
    print(f"{len(seeds)} sweeps, {args.jobs} at a time, in {out}; each: {' '.join(commands[seeds[0]][1:])}")
    # Every folder is checked before any sweep starts, so a refusal leaves nothing running.
    kept = {seed: finished_summary(commands[seed], folders[seed]) for seed in seeds}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            seed: pool.submit(run_sweep, commands[seed], folders[seed])
            for seed in seeds
            if kept[seed] is None
        }
        ran = {seed: future.result() for seed, future in futures.items()}
    wall_s = time.perf_counter() - started
    leads, budgets, accuracies, summaries = {}, {}, {"ga": {}, "random": {}}, {}
    for seed in seeds:
        summary, seconds = ran[seed] if seed in ran else (kept[seed], None)
        summaries[seed] = summary
        leads[seed] = _column(summary, "ga_minus_random")
        budgets[seed] = _column(summary, "budget_ms")
        for method in accuracies:
            accuracies[method][seed] = _column(summary, f"{method}_acc")
        shown = " ".join(f"{lead:+6.2f}" for lead in leads[seed])
        when = "kept from an earlier start" if seconds is None else f"{seconds:.0f} s"
        depths = " ".join(f"d{pick_depth(code)}" for code in _column(summary, "ga_arch"))
        print(
            f"seed {seed}: GA - random per budget {shown} points ({when}); GA picks {depths}; "
            f"budgets {budgets[seed]} ms"
        )
    figures = summarise(leads, args.goal_points, args.goal_budgets)
    # How much each method's pick moved with the seed: per budget, lowest and highest test accuracy (%).
    accuracy_ranges = {
        method: [(min(column), max(column)) for column in zip(*by_seed.values(), strict=True)]
        for method, by_seed in accuracies.items()
    }
    for index, quantile in enumerate(args.budget_quantiles):
        mean, interval = figures["ga_minus_random_mean"][index], figures["ga_minus_random_ci95"][index]
        print(
            f"{100 * quantile:g} % budget: GA - random {mean:+.2f} ± {interval:.2f} points (95 % t, "
            f"{len(seeds)} seeds), smallest {figures['ga_minus_random_min'][index]:+.2f}, "
            f"GA ahead by ≥ {args.goal_points:g} on {figures['seeds_leading_by_goal'][index]} of {len(seeds)}; "
            f"test accuracy over the seeds: GA {_spread(accuracy_ranges['ga'][index])}, "
            f"random {_spread(accuracy_ranges['random'][index])}"
        )
    print(
        f"sweeps with the GA ≥ {args.goal_points:g} point(s) ahead at ≥ {args.goal_budgets} budgets: "
        f"{figures['sweeps_meeting_goal']} of {len(seeds)}; by the mean leads: "
        f"{figures['budgets_where_mean_meets_goal']} budgets ({'met' if figures['goal_met_by_mean'] else 'not met'})"
    )
    comparison = compare_runs(summaries, compared) if compared is not None else {}
    for index, quantile in enumerate(args.budget_quantiles if comparison else ()):
        mean, interval = (
            comparison["ga_minus_compared_mean"][index],
            comparison["ga_minus_compared_ci95"][index],
        )
        depth_pairs = ", ".join(
            f"{seed}: d{comparison['ga_depths'][str(seed)][index]}/d{comparison['compared_depths'][str(seed)][index]}"
            for seed in comparison["compared_seeds"]
        )
        print(
            f"{100 * quantile:g} % budget: this GA - the GA of {args.compare_with} {mean:+.2f} ± {interval:.2f} "
            f"points (95 % t, {len(comparison['compared_seeds'])} seeds); pick depths this/that by seed {depth_pairs}"
        )
    print(
        json.dumps(
            {
                **comparison,
                **{
                    key: [round(v, 3) if math.isfinite(v) else None for v in value]
                    if key.startswith("ga_minus_random")
                    else value
                    for key, value in figures.items()
                },
                "budget_quantiles": list(args.budget_quantiles),
                "budgets_ms": {str(seed): budgets[seed] for seed in seeds},
                **{
                    f"{method}_acc_range": [list(extremes) for extremes in ranges]
                    for method, ranges in accuracy_ranges.items()
                },
                "goal_points": args.goal_points,
                "goal_budgets": args.goal_budgets,
                "wall_s": round(wall_s, 1),
                "quick": args.quick,
            }
        )
    )


def _finished_summaries(folder: Path, seeds: Sequence[int]) -> dict[int, dict]:
    """The ``summary.json`` of each of ``seeds`` that finished in another run's ``folder``."""
    if not folder.is_dir():
        raise SystemExit(f"--compare-with {folder}: no such folder")
    found = {seed: seed_folder(folder, seed) / SUMMARY_NAME for seed in seeds}
    return {seed: json.loads(path.read_text()) for seed, path in found.items() if path.exists()}


def _spread(extremes: tuple[float, float]) -> str:
    return f"{extremes[0]:.2f}-{extremes[1]:.2f} %"


def _split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's own arguments, and those after ``--`` for every ga_adaption.py run."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


if __name__ == "__main__":
    main()
