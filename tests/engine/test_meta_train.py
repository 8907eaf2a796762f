"""Meta-training: schedules, progressive shrinking, checkpoints that resume exactly, progress, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.meta.runs import RunSpec, build_run, task_source
from engine.meta.schedule import ScheduleError, largest_probability, per_step_loss_weights, use_second_order
from engine.meta.train import CHECKPOINT_NAME, MetaTrainError, load_checkpoint, meta_train, read_metrics
from engine.progress import JobCancelled, ListProgress

REPO = Path(__file__).resolve().parents[2]
TINY = RunSpec(dataset="synthetic", ways=5, shots=1, backbone="vgg9", preset="tiny", iterations=16, threads=2)


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("p_end", [0.0, 0.25, 0.5])
def test_largest_probability_follows_paper_equation_4(p_end: float) -> None:
    total, alpha, e_s = 100, 5.0, 30
    for epoch in range(total):
        expected = (
            1.0 if epoch < e_s else p_end + (1.0 - p_end) * math.exp(-alpha * (epoch - e_s) / (total - e_s))
        )
        assert largest_probability(epoch, total, p_end=p_end) == pytest.approx(expected, abs=1e-12)
    assert largest_probability(29, total, p_end=p_end) == 1.0
    assert largest_probability(100, total, p_end=p_end) == pytest.approx(p_end + (1 - p_end) * math.exp(-5))
    with pytest.raises(ScheduleError, match="p_end"):
        largest_probability(0, total, p_end=1.5)


def test_multi_step_loss_weights_anneal_to_the_final_step() -> None:
    start = per_step_loss_weights(0, 5, 10)
    assert np.allclose(start, 0.2)
    middle = per_step_loss_weights(5, 5, 10)
    assert middle[-1] > 0.2 > middle[0] and middle.sum() == pytest.approx(1.0)
    assert np.array_equal(per_step_loss_weights(10, 5, 10), [0, 0, 0, 0, 1])
    assert np.array_equal(per_step_loss_weights(0, 3, 0), [0, 0, 1])
    assert (
        not use_second_order(4, True, 5)
        and use_second_order(5, True, 5)
        and not use_second_order(9, False, 0)
    )


# ------------------------------------------------------------------------------------ training loop
def _train(spec: RunSpec, out: Path, **kwargs):
    run = build_run(spec)
    source, _ = task_source(spec, "train")
    result = meta_train(
        run.learner, source, run.config, out_dir=out, space=run.space, run_info=run.info, **kwargs
    )
    return run, result


def test_progressive_shrinking_samples_subnets_and_reports_progress(tmp_path: Path) -> None:
    events = ListProgress()
    run, result = _train(TINY, tmp_path, progress=events)
    total = run.config.total_iterations
    assert result.iterations == total == 16
    history = result.history
    # Before e_s only the largest net trains; afterwards p decays and sub-nets are sampled.
    e_s = round(0.3 * run.config.epochs)
    assert all(r["largest"] and r["p_largest"] == 1.0 for r in history if r["epoch"] < e_s)
    late = [r for r in history if r["epoch"] > e_s]
    assert late and all(r["p_largest"] < 1.0 for r in late)
    assert any(not r["largest"] for r in late) and all("arch" in r for r in history if not r["largest"])
    assert [r["second_order"] for r in history] == [r["epoch"] >= 2 for r in history]
    lrs = [r["meta_lr"] for r in history]
    assert lrs[-1] < lrs[0]  # cosine annealing
    meta = events.of_kind("meta_train")
    assert [e["current"] for e in meta] == list(range(1, total + 1))
    assert all(e["total"] == total and e["it_per_s"] > 0 for e in meta)
    assert meta[-1]["eta_s"] == 0
    assert {"loss", "accuracy", "epoch", "p_largest"} <= meta[0].keys()
    metrics = read_metrics(tmp_path)
    assert metrics["iteration"] == total and len(metrics["history"]) == total


def test_resume_in_process_equals_uninterrupted_run(tmp_path: Path) -> None:
    whole, _ = _train(TINY, tmp_path / "whole")
    _train(TINY, tmp_path / "split", stop_after=6)
    with pytest.raises(MetaTrainError, match="resume"):
        _train(TINY, tmp_path / "split")
    resumed, result = _train(TINY, tmp_path / "split", resume=True)
    assert result.iterations == 16
    for (name, a), (_, b) in zip(
        whole.learner.state_dict().items(), resumed.learner.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert read_metrics(tmp_path / "whole")["history"] == read_metrics(tmp_path / "split")["history"]
    with pytest.raises(MetaTrainError, match="different configuration"):
        _train(TINY.with_(seed=1), tmp_path / "split", resume=True)


def test_processes_strategy_trains_the_super_net_exactly_like_threads(tmp_path: Path) -> None:
    """Super-net meta-training (sampled sub-nets travel to the workers with each meta-batch)
    with forked workers ends bit-identical to the threads strategy, and no worker outlives it."""
    psutil = pytest.importorskip("psutil")
    before = {child.pid for child in psutil.Process().children()}
    threads, _ = _train(TINY, tmp_path / "threads")
    processes, result = _train(TINY.with_(strategy="processes"), tmp_path / "processes")
    assert result.iterations == 16 and any(not r["largest"] for r in result.history)
    for (name, a), (_, b) in zip(
        threads.learner.state_dict().items(), processes.learner.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert {child.pid for child in psutil.Process().children()} - before == set()


def test_cancel_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    def cancel_at_5(event):
        if event["current"] == 5:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        _train(TINY, tmp_path, progress=cancel_at_5)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["iteration"] == 5


def test_training_runs_at_the_runs_thread_count_and_gives_the_previous_one_back(tmp_path: Path) -> None:
    """A worker process runs other jobs after a training; they must find its own thread count."""
    seen = []
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _train(
            TINY.with_(iterations=2, threads=1),
            tmp_path,
            progress=lambda _: seen.append(torch.get_num_threads()),
        )
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 3

        def cancel(_event):
            raise JobCancelled()

        with pytest.raises(JobCancelled):
            _train(TINY.with_(threads=1), tmp_path / "cancelled", progress=cancel)
        assert torch.get_num_threads() == 3  # also when the run ends by an exception
    finally:
        torch.set_num_threads(previous)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["meta-train", "--dataset", "synthetic", "--ways", "5", "--backbone", "maml", "--preset", "tiny",
              "--iterations", "32", "--eval-tasks", "0", "--quiet", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_cli(*common, "--out", str(killed_dir)), cwd=REPO, env=env)
    metrics = killed_dir / "metrics.json"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if metrics.exists() and json.loads(metrics.read_text())["iteration"] >= 4:
                break
            if process.poll() is not None:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(killed_dir / CHECKPOINT_NAME)["iteration"]
    assert 4 <= killed_at < 32
    subprocess.run(
        _cli(*common, "--out", str(killed_dir), "--resume"), cwd=REPO, env=env, check=True, timeout=240
    )
    whole_dir = tmp_path / "whole"
    subprocess.run(_cli(*common, "--out", str(whole_dir)), cwd=REPO, env=env, check=True, timeout=240)
    resumed = load_checkpoint(killed_dir / CHECKPOINT_NAME)
    whole = load_checkpoint(whole_dir / CHECKPOINT_NAME)
    assert resumed["iteration"] == whole["iteration"] == 32
    for name, value in whole["learner"].items():
        assert torch.equal(resumed["learner"][name], value), name
    assert resumed["history"] == whole["history"]


@pytest.mark.slow
def test_cli_meta_train_then_evaluate(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run"
    train = subprocess.run(
        _cli(
            "meta-train",
            "--dataset",
            "synthetic",
            "--ways",
            "5",
            "--preset",
            "tiny",
            "--iterations",
            "16",
            "--out",
            str(out),
            "--eval-tasks",
            "20",
            "--quiet",
        ),  # fmt: skip
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 16 and summary["test"]["tasks"] == 20
    evaluated = subprocess.run(
        _cli("evaluate", "--run", str(out), "--tasks", "20", "--arch", "smallest", "--quiet"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["tasks"] == 20 and result["arch"]["depth"] == 1 and 0 <= result["mean"] <= 1
    bad = subprocess.run(
        _cli("evaluate", "--run", str(tmp_path / "nope")), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "meta-train run folder" in bad.stderr


@pytest.mark.slow
def test_tiny_meta_training_on_omniglot_beats_chance_and_the_untrained_net(tmp_path: Path) -> None:
    from engine.data.errors import DatasetNotFoundError
    from engine.meta.evaluate import evaluate

    spec = RunSpec(dataset="omniglot", ways=5, shots=1, backbone="vgg9", preset="tiny", threads=2)
    try:
        train_tasks, _ = task_source(spec, "train")
        _, test_batches = task_source(spec, "test")
    except DatasetNotFoundError as missing:
        pytest.skip(f"Omniglot not available: {missing}")
    run = build_run(spec)
    largest = {"arch": run.space.largest()}
    before = evaluate(run.learner, test_batches(100, 10, 7), forward_kwargs=largest)
    meta_train(run.learner, train_tasks, run.config, out_dir=tmp_path, space=run.space)
    after = evaluate(run.learner, test_batches(100, 10, 7), forward_kwargs=largest)
    chance = 1 / spec.ways
    assert after.tasks == 100 and after.ci95 < 0.05
    assert after.mean > chance + 0.25, after  # chance is 20 %
    assert after.mean > before.mean + 0.05, (before, after)
