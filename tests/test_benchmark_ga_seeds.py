"""What benchmarks/ga_seeds.py makes of several seeds' GA-vs-random sweeps."""

import json
import math
import sys

import pytest

from benchmarks.ga_seeds import (
    COMMAND_NAME,
    compare_runs,
    finished_summary,
    mean_with_ci95,
    pick_depth,
    summarise,
    t_critical_95,
)

# The five seeds of docs/BENCHMARKS.md, "Five seeds on a fourth full super-net" (GA - random, points,
# at the 90/70/50/30 % budgets).
FOURTH_SUPERNET = {
    1: [9.23, 5.32, 0.00, 1.69],
    2: [2.29, 3.84, 0.01, 0.00],
    3: [7.89, 3.94, 4.17, 1.61],
    4: [0.06, 4.70, 5.09, 0.83],
    5: [4.77, 7.33, 4.06, 1.93],
}


def test_the_interval_is_students_t_over_the_seeds():
    # By hand: mean 2, sample standard deviation sqrt(2/3), t(0.975, 3 df) = 3.182.
    mean, half_width = mean_with_ci95([1.0, 2.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half_width == pytest.approx(3.182 * math.sqrt(2 / 3) / 2)
    assert t_critical_95(4) == 2.776
    assert t_critical_95(1000) == 2.042  # beyond the table: the 30-df value
    assert math.isnan(mean_with_ci95([1.5])[1])
    with pytest.raises(ValueError):
        t_critical_95(0)


def test_the_fourth_supernets_seeds_meet_the_goal_by_their_means_but_not_one_by_one():
    figures = summarise(FOURTH_SUPERNET, goal_points=1.0, goal_budgets=3)
    assert figures["seeds"] == [1, 2, 3, 4, 5]
    assert figures["ga_minus_random_mean"] == pytest.approx([4.848, 5.026, 2.666, 1.212])
    assert figures["ga_minus_random_min"] == [0.06, 3.84, 0.00, 0.00]
    assert figures["seeds_leading_by_goal"] == [4, 5, 3, 3]
    # Seeds 1, 3 and 5 led by a point at three or more budgets; 2 and 4 at two.
    assert figures["sweeps_meeting_goal"] == 3
    assert figures["budgets_where_mean_meets_goal"] == 4
    assert figures["goal_met_by_mean"] is True
    # 30 %: mean 1.212, sd 0.793, so 2.776 * 0.793 / sqrt(5) = 0.985: the interval excludes zero.
    # 50 %: mean 2.666 but sd 2.46, so ± 3.06: it does not (two seeds had 0.00 and 0.01).
    assert figures["ga_minus_random_ci95"][3] == pytest.approx(0.985, abs=1e-3)
    assert figures["ga_minus_random_ci95"][2] == pytest.approx(3.056, abs=1e-3)
    assert figures["budgets_ahead_beyond_ci"] == 3


def test_a_lead_below_the_goal_on_average_is_not_counted():
    figures = summarise({1: [0.5, 2.0], 2: [0.7, 0.0]}, goal_points=1.0, goal_budgets=2)
    assert figures["ga_minus_random_mean"] == pytest.approx([0.6, 1.0])
    assert figures["budgets_where_mean_meets_goal"] == 1
    assert figures["goal_met_by_mean"] is False
    assert figures["sweeps_meeting_goal"] == 0


def test_sweeps_with_different_budget_counts_or_none_are_refused():
    with pytest.raises(ValueError, match="different numbers of budgets"):
        summarise({1: [1.0, 2.0], 2: [1.0]}, goal_points=1.0, goal_budgets=1)
    with pytest.raises(ValueError, match="no finished sweeps"):
        summarise({}, goal_points=1.0, goal_budgets=1)


def test_a_finished_seed_is_kept_an_unfinished_one_runs_and_another_commands_folder_is_refused(tmp_path):
    folder = tmp_path / "seed-1"
    command = [sys.executable, "ga_adaption.py", "--seed", "1", "--out", str(folder)]
    assert finished_summary(command, folder) is None  # nothing there yet: it runs
    folder.mkdir()
    (folder / COMMAND_NAME).write_text(json.dumps(["/another/python", *command[1:]]))
    assert finished_summary(command, folder) is None  # started, not finished: it continues
    (folder / "summary.json").write_text(json.dumps({"per_budget": [{"ga_minus_random": 1.5}]}))
    # Same arguments under another interpreter: the finished sweep is reused.
    assert finished_summary(command, folder)["per_budget"][0]["ga_minus_random"] == 1.5

    other = [*command[:3], "2", *command[4:]]
    with pytest.raises(SystemExit, match="holds a sweep of another command"):
        finished_summary(other, folder)
    assert json.loads((folder / COMMAND_NAME).read_text())[1:] == command[1:]  # left as it was


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "1"], "two or more different seeds"),
        (["--seeds", "1,1"], "two or more different seeds"),
        (["--seeds", "1,x"], "comma-separated integers"),
        (["--goal-budgets", "5"], "between 1 and the 4 budgets"),
        (["--jobs", "0"], "at least 1"),
        (["--budget-quantiles", "0.5,0.3"], "increasing quantiles"),
    ],
)
def test_bad_arguments_stop_with_a_clear_error_before_any_sweep(
    monkeypatch, capsys, tmp_path, arguments, message
):
    from benchmarks import ga_seeds

    monkeypatch.setattr(sys, "argv", ["ga_seeds.py", "--out", str(tmp_path / "out"), *arguments])
    with pytest.raises(SystemExit) as stopped:
        ga_seeds.main()
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _sweep_summary(budgets, ga_accs, ga_archs, random_accs):
    return {
        "per_budget": [
            {"budget_ms": b, "ga_acc": g, "ga_arch": a, "random_acc": r, "ga_minus_random": g - r}
            for b, g, a, r in zip(budgets, ga_accs, ga_archs, random_accs, strict=True)
        ]
    }


def test_two_runs_are_compared_seed_by_seed_on_the_same_budgets():
    budgets = [0.05, 0.09]
    ours = {
        1: _sweep_summary(budgets, [52.0, 60.0], ["d2:3/1/selu,3/1/selu", "d4:1/1/relu"], [50.0, 58.0]),
        2: _sweep_summary(budgets, [50.0, 58.0], ["d1:3/2/selu", "d3:3/1/selu"], [49.0, 57.0]),
        3: _sweep_summary(budgets, [51.0, 59.0], ["d2:3/1/selu", "d2:5/1/selu"], [50.0, 50.0]),
    }
    theirs = {
        1: _sweep_summary(budgets, [51.0, 50.0], ["d2:3/1/selu", "d2:3/1/selu"], [50.0, 58.0]),
        2: _sweep_summary(budgets, [50.0, 49.0], ["d1:3/2/selu", "d2:3/1/selu"], [49.0, 57.0]),
        4: _sweep_summary(budgets, [10.0, 10.0], ["d1:1/1/relu", "d1:1/1/relu"], [9.0, 9.0]),
    }
    figures = compare_runs(ours, theirs)
    assert figures["compared_seeds"] == [1, 2]  # only the seeds both runs finished
    assert figures["ga_minus_compared_mean"] == pytest.approx([0.5, 9.5])
    # Differences 1 and 0 at the first budget: sd sqrt(1/2), t(1 df) 12.706, over sqrt(2).
    assert figures["ga_minus_compared_ci95"][0] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert figures["ga_depths"] == {"1": [2, 4], "2": [1, 3]}
    assert figures["compared_depths"] == {"1": [2, 2], "2": [1, 2]}

    with pytest.raises(ValueError, match="share 1 finished seed"):
        compare_runs(ours, {1: theirs[1]})
    other_table = {seed: _sweep_summary([0.04, 0.09], [1, 1], ["d1:1/1/relu"] * 2, [1, 1]) for seed in (1, 2)}
    with pytest.raises(ValueError, match="seed 1 has other budgets"):
        compare_runs(ours, other_table)
    assert pick_depth("d12:3/1/relu") == 12
    with pytest.raises(ValueError, match="not an architecture code"):
        pick_depth("x2:3/1/relu")


def test_compare_with_reports_this_ga_minus_another_runs_from_finished_folders(monkeypatch, capsys, tmp_path):
    from benchmarks import ga_seeds

    budgets, quantiles = [0.05, 0.09], (0.5, 0.9)
    ours, theirs = tmp_path / "depth", tmp_path / "plain"
    passed = ["--pool", "4"]
    args = ga_seeds.argparse.Namespace(
        quick=False, supernet=None, lut=None, budget_quantiles=quantiles, threads=1
    )
    for seed, (ga, other) in {1: ([52.0, 60.0], [51.0, 50.0]), 2: ([50.0, 58.0], [50.0, 49.0])}.items():
        mine = ga_seeds.seed_folder(ours, seed)
        mine.mkdir(parents=True)
        (mine / COMMAND_NAME).write_text(json.dumps(ga_seeds.sweep_command(args, seed, mine, passed)))
        (mine / "summary.json").write_text(
            json.dumps(_sweep_summary(budgets, ga, ["d3:3/1/selu"] * 2, [50, 50]))
        )
        compared = ga_seeds.seed_folder(theirs, seed)
        compared.mkdir(parents=True)
        (compared / "summary.json").write_text(
            json.dumps(_sweep_summary(budgets, other, ["d2:3/1/selu"] * 2, [50, 50]))
        )
    argv = ["ga_seeds.py", "--seeds", "1,2", "--budget-quantiles", "0.5,0.9", "--out", str(ours)]
    monkeypatch.setattr(sys, "argv", [*argv, "--compare-with", str(theirs), "--", *passed])
    ga_seeds.main()  # both seeds finished: nothing runs
    printed = capsys.readouterr().out
    assert "GA picks d3 d3" in printed
    assert "90 % budget: this GA - the GA of" in printed and "1: d3/d2, 2: d3/d2" in printed
    figures = json.loads(printed.strip().splitlines()[-1])
    assert figures["ga_minus_compared_mean"] == pytest.approx([0.5, 9.5])
    assert figures["compared_seeds"] == [1, 2]

    monkeypatch.setattr(sys, "argv", [*argv, "--compare-with", str(tmp_path / "missing"), "--", *passed])
    with pytest.raises(SystemExit, match="no such folder"):
        ga_seeds.main()
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", [*argv, "--compare-with", str(tmp_path / "empty"), "--", *passed])
    with pytest.raises(SystemExit) as stopped:
        ga_seeds.main()
    assert stopped.value.code == 2 and "fewer than two finished sweeps" in capsys.readouterr().err
