"""Where meta-training runs: the ``device`` of a RunSpec, the ``vmap`` strategy through the whole
training loop, and a run trained on one device evaluated on another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.meta.runs import RunSpec, RunSpecError, build_run, default_strategy
from engine.meta.service import RUN_FILE, evaluate_run, execute_meta_training, load_run
from tests.engine.test_meta_train import _train

TINY = RunSpec(dataset="synthetic", ways=5, preset="tiny", iterations=16, strategy="vmap")


def test_device_and_strategy_are_validated_with_clear_errors() -> None:
    with pytest.raises(RunSpecError, match="unknown device 'tpu'"):
        RunSpec(device="tpu")
    with pytest.raises(RunSpecError, match="strategy 'processes' does not run on cuda"):
        RunSpec(device="cuda", strategy="processes")
    assert RunSpec(device="cuda", strategy="vmap").device == "cuda"
    assert default_strategy("cuda") == "vmap" and default_strategy("cpu") == "processes"
    # Specs stored before ``device`` existed still load, on the CPU.
    stored = RunSpec().to_dict()
    del stored["device"]
    assert RunSpec.from_dict(stored).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_anything_is_built() -> None:
    with pytest.raises(RunSpecError, match="no CUDA GPU"):
        build_run(TINY.with_(device="cuda"))


def test_vmap_strategy_trains_the_super_net_and_resumes_exactly(tmp_path: Path) -> None:
    whole, result = _train(TINY, tmp_path / "whole")
    assert result.iterations == 16 and any(not record["largest"] for record in result.history)
    _train(TINY, tmp_path / "split", stop_after=7)
    resumed, _ = _train(TINY, tmp_path / "split", resume=True)
    for (name, a), (_, b) in zip(
        whole.learner.state_dict().items(), resumed.learner.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The running statistics moved: the per-task BatchNorm copies were merged back.
    assert any(
        not torch.equal(buffer, initial)
        for buffer, initial in zip(
            whole.learner.model.buffers(), build_run(TINY).learner.model.buffers(), strict=True
        )
    )


def test_a_run_trained_elsewhere_is_evaluated_on_the_device_asked_for(tmp_path: Path) -> None:
    """A GPU-trained run (its run.json says cuda) evaluated on a CPU: load_run(device="cpu")."""
    out = tmp_path / "run"
    execute_meta_training(TINY, out, eval_tasks=0)
    here, _ = load_run(out)
    expected = evaluate_run(here, 10)
    record = json.loads((out / RUN_FILE).read_text())
    record["spec"]["device"] = "cuda"  # as written by a run on a GPU machine (strategy vmap)
    (out / RUN_FILE).write_text(json.dumps(record))
    moved, state = load_run(out, device="cpu")
    assert moved.spec.device == "cpu" and moved.spec.strategy == "processes" and state["iteration"] == 16
    assert next(moved.learner.parameters()).device.type == "cpu"
    assert evaluate_run(moved, 10)["mean"] == pytest.approx(expected["mean"])
    record["spec"]["strategy"] = "loop"
    (out / RUN_FILE).write_text(json.dumps(record))
    assert load_run(out, device="cpu")[0].spec.strategy == "loop"
