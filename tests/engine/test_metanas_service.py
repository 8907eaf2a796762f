"""engine.metanas.service: a MetaNAS run folder end to end on synthetic tasks (resume, evaluate, adapt, export)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.metanas.service import (
    MetaNasAdaptionRequest,
    MetaNasRunError,
    MetaNasRunSpec,
    adapt_metanas,
    execute_metanas_training,
    load_metanas_run,
)
from engine.progress import JobCancelled

SPEC = MetaNasRunSpec(dataset="synthetic", ways=3, shots=2, preset="tiny")


def test_a_cancelled_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = execute_metanas_training(SPEC, tmp_path / "a", eval_tasks=0)

    def cancel_after_two(event):
        if event["kind"] == "meta_train" and event["current"] == 2:
            raise JobCancelled("stop")

    with pytest.raises(JobCancelled):
        execute_metanas_training(SPEC, tmp_path / "b", progress=cancel_after_two, eval_tasks=0)
    assert load_metanas_run(tmp_path / "b")[1].epochs_done == 2
    events = []
    resumed = execute_metanas_training(
        SPEC, tmp_path / "b", resume=True, progress=events.append, eval_tasks=0
    )
    assert [e["current"] for e in events] == [3, 4] and {"loss", "accuracy", "eta_s"} <= set(events[0])
    assert resumed["iterations"] == straight["iterations"] == 4
    a, b = load_metanas_run(tmp_path / "a")[1], load_metanas_run(tmp_path / "b")[1]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    with pytest.raises(MetaNasRunError, match="different run"):
        execute_metanas_training(SPEC.__class__(dataset="synthetic", ways=4), tmp_path / "b", resume=True)


def test_evaluation_and_adaption_measure_the_exported_network(tmp_path):
    summary = execute_metanas_training(SPEC, tmp_path, eval_tasks=2)
    reference = summary["reference"]
    per_task = summary["test_tasks"]
    assert reference["accuracy"]["tasks"] == 2 and summary["test"] == reference["accuracy"]
    assert reference["params"] == sum(t["params"] for t in per_task) / 2
    assert all(t["latency_ms"] > 0 for t in per_task)
    assert json.loads((tmp_path / "summary.json").read_text())["reference"]["params"] == reference["params"]

    request = MetaNasAdaptionRequest(
        run_dir=str(tmp_path), constraint="macs", budgets=(10, 1e9), eval_tasks=2
    )
    result = adapt_metanas(request, tmp_path / "adapt")
    card = result["model_card"]
    model = torch.jit.load(str(tmp_path / "adapt" / "model" / "model.pt"))
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert card["macs"] == result["costs"]["macs"] > card["params"]
    assert [check["met"] for check in card["budgets"]] == [False, True]
    assert card["measured_latency_ms"] > 0 and card["accuracy"]["tasks"] == 2
    assert (
        json.loads((tmp_path / "adapt" / "model" / "model_card.json").read_text())["params"] == card["params"]
    )
    probe = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); print(tuple(m(torch.rand(6, 1, 12, 12)).shape))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "adapt" / "model" / "model.pt")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "(6, 3)", out.stderr


def test_bad_specs_and_folders_are_refused(tmp_path):
    with pytest.raises(MetaNasRunError, match="dataset"):
        MetaNasRunSpec(dataset="imagenet")
    with pytest.raises(MetaNasRunError, match="preset"):
        MetaNasRunSpec(preset="huge")
    with pytest.raises(MetaNasRunError, match="ways"):
        MetaNasRunSpec(ways=1)
    with pytest.raises(MetaNasRunError, match="not a MetaNAS run spec"):
        MetaNasRunSpec.from_dict({"method": "hmetanas"})
    with pytest.raises(MetaNasRunError, match="run.json not found"):
        load_metanas_run(tmp_path)
    with pytest.raises(MetaNasRunError, match="budgets"):
        MetaNasAdaptionRequest(run_dir=str(tmp_path), budgets=(float("nan"),))
    assert MetaNasRunSpec(meta_epochs=2).config().warmup_epochs == 1  # the preset's warm-up share
