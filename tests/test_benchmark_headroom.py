"""What benchmarks/headroom.py makes of a sweep's archive and test scores (hand-made figures;
tests/engine/test_adaption.py runs it on a real sweep)."""

import json
import math

import pytest

from benchmarks.headroom import budget_headroom, ranked_feasible, search_archive, summarise


def _key(arch_dict):
    return json.dumps(arch_dict, sort_keys=True)


def test_the_archive_joins_both_caches_and_leaves_out_held_out_slices():
    a, b, c = {"name": "a"}, {"name": "b"}, {"name": "c"}
    state = {
        "cache": {"entries": [[a, 0, 0.5], [a, 1, 0.7], [a, 2, 0.1], [b, 0, None]]},
        "random_cache": {"entries": [[a, 0, 0.5], [c, 0, 0.4]]},
    }
    # Two search slices: slice 2 is the final choice's held-out slice, not a search score.
    archive = search_archive(state, 2, _key)
    assert archive[_key(a)]["search_fitness"] == pytest.approx(0.6)
    assert archive[_key(a)]["sources"] == {"ga", "random"}
    assert archive[_key(b)]["search_fitness"] == math.inf  # diverged
    assert archive[_key(c)]["sources"] == {"random"}
    # A cold sweep keeps no random-search cache: the GA's archive alone.
    assert set(search_archive({"cache": state["cache"], "random_cache": None}, 2, _key)) == {_key(a), _key(b)}


def test_feasible_sub_nets_are_ranked_by_search_fitness_ties_by_key():
    archive = {
        "x": {"search_fitness": 0.3},
        "w": {"search_fitness": 0.3},
        "y": {"search_fitness": 0.1},
        "z": {"search_fitness": 0.05},
        "nan": {"search_fitness": math.inf},
    }
    feasible = {"x": True, "w": True, "y": True, "z": False, "nan": True}
    assert ranked_feasible(archive, feasible) == ["y", "w", "x"]


def _scored(values):
    return {"mean": sum(values) / len(values), "ci95": 0.0, "task_accuracies": list(values)}


def test_headroom_is_the_best_found_minus_each_pick_task_by_task():
    scored = {
        "ga": _scored([0.5, 0.6, 0.7, 0.6]),
        "random": _scored([0.4, 0.6, 0.5, 0.5]),
        "top1": _scored([0.5, 0.5, 0.6, 0.6]),
        "top2": _scored([0.6, 0.7, 0.7, 0.6]),  # the best, ranked second by search fitness
    }
    sources = {"ga": {"ga"}, "top1": {"ga", "random"}, "top2": {"random"}, "random": {"random"}}
    row = budget_headroom(["top1", "top2"], scored, "ga", "random", sources)
    assert row["best_key"] == "top2" and row["best_search_rank"] == 2 and row["best_from"] == ["random"]
    assert row["best_acc"] == pytest.approx(65.0)
    assert row["headroom_over_random"] == pytest.approx(65.0 - 50.0)
    assert row["ga_shortfall"] == pytest.approx(65.0 - 60.0)
    # Paired: the per-task differences of top2 - ga are 0.1, 0.1, 0, 0.
    assert row["ga_shortfall_ci95"] == pytest.approx(100 * 1.96 * 0.057735 / 2, abs=1e-3)
    assert row["ga_archive_best"] == pytest.approx(60.0)  # ga and top1
    assert row["random_archive_best"] == pytest.approx(65.0)


def test_a_pick_outside_the_ranked_top_can_be_the_best_and_no_headroom_is_zero():
    scored = {"ga": _scored([0.9, 0.8]), "random": _scored([0.9, 0.8]), "top1": _scored([0.5, 0.5])}
    row = budget_headroom(["top1"], scored, "ga", "random", {"top1": {"ga"}})
    assert row["best_key"] == "ga" and row["best_search_rank"] is None and row["best_from"] == []
    assert row["headroom_over_random"] == 0.0 and row["ga_shortfall"] == 0.0
    assert row["random_archive_best"] is None  # no random-search archive (a cold sweep)


def test_the_summary_counts_budgets_with_room_for_the_goal():
    def rows(headrooms, shortfalls):
        return [
            {"headroom_over_random": h, "ga_shortfall": s, "best_from": ["ga"]}
            for h, s in zip(headrooms, shortfalls, strict=True)
        ]

    summary = summarise(
        {"s1": rows([0.5, 2.0, 3.0], [0.0, 1.0, 0.0]), "s2": rows([1.0, 0.0, 4.0], [1.0, 0.0, 2.0])}, 1.0
    )
    assert summary["headroom_over_random_mean"] == [0.75, 1.0, 3.5]
    assert summary["ga_shortfall_mean"] == [0.5, 0.5, 1.0]
    assert summary["budgets_with_goal_headroom"] == {"s1": 2, "s2": 2}
    assert summary["best_from"] == {"s1": ["ga"] * 3, "s2": ["ga"] * 3}


def test_the_summary_gives_the_confirmed_figures_where_every_row_has_them():
    rows = [
        {"headroom_over_random": 2.0, "ga_shortfall": 0.0, "best_from": [], "confirmed_headroom_over_random": 0.5,
         "confirmed_ga_shortfall": 0.25},
        {"headroom_over_random": 1.5, "ga_shortfall": 1.5, "best_from": ["random"],
         "confirmed_headroom_over_random": 1.25, "confirmed_ga_shortfall": 1.0},
    ]  # fmt: skip
    summary = summarise({"s": rows}, 1.0)
    assert summary["budgets_with_goal_headroom"] == {"s": 2}
    assert summary["confirmed_budgets_with_goal_headroom"] == {"s": 1}
    assert summary["confirmed_ga_shortfall_mean"] == [0.25, 1.0]
    assert summary["best_from"] == {"s": ["pick", "random"]}
    without = summarise(
        {"s": [{k: v for k, v in row.items() if not k.startswith("confirmed")} for row in rows]}, 1.0
    )
    assert "confirmed_headroom_over_random" not in without
