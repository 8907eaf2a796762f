"""RunSpec's search-space switches (head pool size, Global Expansion, Adaptive Number of Layers).

They are what ``benchmarks/ablation_table2.py`` varies (H-Meta-NAS Table 2); these tests check
that they reach the space, survive the checkpoint into an adaption request, and that specs
stored before the switches existed still load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.adaption import AdaptionRequest, run_adaption
from engine.meta.runs import RunSpec, RunSpecError, build_run
from engine.meta.service import execute_meta_training, load_run
from engine.meta.train import CHECKPOINT_NAME

ABLATED = RunSpec(
    dataset="synthetic",
    ways=5,
    shots=1,
    backbone="vgg9",
    preset="tiny",
    iterations=8,
    threads=1,
    strategy="loop",
    pool_size=1,
    global_expansion=False,
    adaptive_layers=False,
)


def test_switches_build_the_ablated_space() -> None:
    space = build_run(ABLATED).space
    assert (space.pool_size, space.global_expansion, space.adaptive_layers) == (1, False, False)
    assert space.depths == (4,)
    assert space.allowed_widths(0) == (1.0,) and space.allowed_widths(3) == (1.0,)
    assert len(space.allowed_widths(1)) > 1
    full = build_run(ABLATED.with_(pool_size=5, global_expansion=True, adaptive_layers=True)).space
    assert full.depths == (1, 2, 3, 4) and len(full.allowed_widths(0)) > 1
    assert full.size() > space.size()


def test_a_spec_stored_before_the_switches_loads_with_the_full_space() -> None:
    stored = RunSpec().to_dict()
    for name in ("pool_size", "global_expansion", "adaptive_layers"):
        del stored[name]
    spec = RunSpec.from_dict(stored)
    assert (spec.pool_size, spec.global_expansion, spec.adaptive_layers) == (5, True, True)


@pytest.mark.parametrize(
    "changes",
    [
        {"pool_size": 0},
        {"pool_size": 2.5},
        {"pool_size": True},
        {"global_expansion": "no"},
        {"adaptive_layers": 0},
        {"backbone": "maml", "pool_size": 1},
        {"backbone": "maml", "adaptive_layers": False},
    ],
)
def test_bad_switches_are_refused(changes: dict) -> None:
    with pytest.raises(RunSpecError):
        RunSpec(**changes)


def test_ablated_space_survives_the_checkpoint_into_a_params_constrained_adaption(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        execute_meta_training(ABLATED, tmp_path / "run", eval_tasks=0)
        run, _ = load_run(tmp_path / "run")
        assert (run.space.pool_size, run.space.global_expansion, run.space.adaptive_layers) == (
            1,
            False,
            False,
        )
        budget = 1200  # between the cheapest arch of this space (129 params) and the largest (~16K)
        request = AdaptionRequest(
            supernet=str(tmp_path / "run" / CHECKPOINT_NAME),
            constraint="params",
            budgets=(budget,),
            preset="tiny",
            pool_size=6,
            iterations=2,
            tasks_per_slice=2,
            num_slices=2,
            test_tasks=4,
            random_baseline=False,
            export_onnx=False,
        )
        outcome = run_adaption(request, out_dir=tmp_path / "adapt").outcomes[0]
    finally:
        torch.set_num_threads(previous)
    arch = outcome.arch
    assert outcome.constraint_met and outcome.costs["params"] <= budget
    assert arch["depth"] == 4  # no ANL: the depth is not searched
    assert arch["layers"][0]["width"] == 1.0 and arch["layers"][3]["width"] == 1.0  # no GE
    assert 0.0 <= outcome.test_accuracy["mean"] <= 1.0


def test_the_shrinking_decay_alpha_reaches_the_training_config():
    """Table 9's knob: RunSpec.shrink_alpha sets eq. 4's alpha; specs stored before it existed load as 5."""
    from engine.meta.runs import RunSpec, RunSpecError, train_config

    spec = RunSpec(dataset="synthetic", preset="tiny", shrink_alpha=0.5)
    assert train_config(spec).shrink.alpha == 0.5
    stored = {
        k: v for k, v in RunSpec(dataset="synthetic", preset="tiny").to_dict().items() if k != "shrink_alpha"
    }
    assert RunSpec.from_dict(stored) == RunSpec(dataset="synthetic", preset="tiny")
    for bad in (0, -1.0, float("nan"), True, "5"):
        with pytest.raises(RunSpecError, match="shrink_alpha"):
            RunSpec(shrink_alpha=bad)


def test_runs_use_forked_worker_processes_by_default_and_refuse_unknown_strategies():
    from engine.meta.runs import RunSpec, RunSpecError, train_config

    assert train_config(RunSpec(dataset="synthetic", preset="tiny")).maml.strategy == "processes"
    assert train_config(RunSpec(dataset="synthetic", preset="tiny", strategy="loop")).maml.strategy == "loop"
    with pytest.raises(RunSpecError, match="strategy"):
        RunSpec(strategy="gpu")
