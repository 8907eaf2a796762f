"""engine.adaption end to end on a tiny super-net meta-trained in the test (synthetic tasks).

Covers: every result meets its budget, the packages (TorchScript + ONNX + model card) and a
TorchScript round trip in a clean subprocess that never imports ``engine`` and classifies the
support images, resume after a cancelled run equals the uninterrupted run, every bad input
(fails before writing anything), re-training, the CLI.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.adaption import (
    AdaptionInputError,
    AdaptionRequest,
    AdaptionRequestError,
    AdaptionResult,
    AdaptionStateError,
    InfeasibleBudgetError,
    accuracy_on_tasks,
    load_supernet,
    paired_difference,
    request_test_tasks,
    retrain_subnet,
    run_adaption,
)
from engine.cost import arch_params
from engine.export import onnx_roundtrip_error
from engine.latency.lut import LatencyTable
from engine.meta.runs import RunSpec, build_run, task_source
from engine.meta.train import load_checkpoint, meta_train
from engine.progress import JobCancelled, ListProgress
from engine.search.adapt import SuperNetScorer, inner_loop_from_learner
from engine.search.package import MODEL_CARD_NAME, ONNX_NAME, TORCHSCRIPT_NAME, read_model_card
from engine.space import Arch, SearchSpace

REPO = Path(__file__).resolve().parents[2]
WAYS = 5
SPEC = RunSpec(
    dataset="synthetic",
    ways=WAYS,
    shots=1,
    backbone="vgg9",
    preset="tiny",
    iterations=16,
    threads=1,
    strategy="loop",
)


def fake_lut(space: SearchSpace, device: str = "test-board") -> LatencyTable:
    """A lookup table for ``space`` whose entries grow with MACs (a stand-in for a measured device)."""
    entries = {spec.key: 1e-3 + spec.macs() * 1e-6 for spec in space.all_layer_specs()}
    return LatencyTable(device=device, entries=entries, metadata={"search_space": space.to_dict()})


def write_support_zip(path: Path, classes: int, per_class: int = 4, seed: int = 0) -> list[str]:
    """N classes of distinct blocky patterns + noise, as PNG files in class folders."""
    rng = np.random.default_rng(seed)
    names = [f"glyph_{chr(ord('a') + c)}" for c in range(classes)]
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            prototype = np.kron(rng.random((7, 7)), np.ones((4, 4)))
            for index in range(per_class):
                image = np.clip(prototype + 0.08 * rng.standard_normal((28, 28)), 0, 1)
                buffer = io.BytesIO()
                Image.fromarray((image * 255).astype(np.uint8), "L").save(buffer, "PNG")
                archive.writestr(f"{name}/{index}.png", buffer.getvalue())
    return names


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adaption")
    run = build_run(SPEC)
    train, _ = task_source(SPEC, "train")
    meta_train(run.learner, train, run.config, out_dir=root / "supernet", space=run.space, run_info=run.info)
    fake_lut(run.space).save(root / "lut.json")
    classes = write_support_zip(root / "support.zip", WAYS)
    rng = np.random.default_rng(0)
    lut = LatencyTable.load(root / "lut.json")
    latencies = [lut.predict(run.space, run.space.sample(rng)) for _ in range(300)]
    budgets = tuple(round(float(np.quantile(latencies, q)), 5) for q in (0.15, 0.5))
    yield {
        "root": root,
        "checkpoint": str(root / "supernet" / "checkpoint.pt"),
        "lut": str(root / "lut.json"),
        "support": str(root / "support.zip"),
        "classes": classes,
        "space": run.space,
        "budgets": budgets,
    }
    torch.set_num_threads(previous)


def request_for(world, **changes) -> AdaptionRequest:
    values = dict(
        supernet=world["checkpoint"],
        constraint="latency_ms",
        budgets=world["budgets"],
        lut=world["lut"],
        preset="tiny",
        support=world["support"],
        test_tasks=10,
    )
    values.update(changes)
    return AdaptionRequest(**values)


@pytest.fixture(scope="module")
def adapted(world):
    events = ListProgress()
    request = request_for(world, measure_latency=True)
    out = world["root"] / "out"
    result = run_adaption(request, out_dir=out, progress=events, state_path=world["root"] / "state.json")
    return request, result, events, out


def comparable(result: AdaptionResult) -> dict:
    """What must not depend on being interrupted (no timings, paths or creation times)."""
    return {
        "outcomes": [
            {
                "arch": o.arch,
                "costs": o.costs,
                "search_loss": o.search_loss,
                "evaluations": o.evaluations,
                "cache_hits": o.cache_hits,
                "test_accuracy": o.test_accuracy,
                "random": {k: v for k, v in o.random.items() if k != "elapsed_s"},
                "support_accuracy": o.model_card["finetuning"]["support_accuracy"],
            }
            for o in result.outcomes
        ],
        "front": result.front,
        "evaluations": result.evaluations,
        "cache_hits": result.cache_hits,
    }


# --------------------------------------------------------------------------- the request
def test_request_round_trips_through_json(world):
    request = AdaptionRequest.from_budget_strings(
        ["latency_ms=0.02", "latency_ms=50us"], supernet=world["checkpoint"], lut=world["lut"], preset="tiny"
    )
    assert request.budgets == (0.02, 0.05) and request.unit == "ms"  # mixed units -> base unit
    assert AdaptionRequest.from_json(request.to_json()) == request
    assert json.loads(request.to_json())["budgets"] == [0.02, 0.05]
    params = AdaptionRequest.from_budget_strings(["params=3K", "params=5K"], supernet="x.pt")
    assert params.unit == "K" and params.constraints()[1].base_limit == 5000
    assert params.weights_kind == "meta" and request_for(world).weights_kind == "finetuned"
    config = request_for(world, pool_size=7).ga_config()
    assert (config.pool_size, config.iterations, config.tasks_per_slice) == (7, 6, 4)
    assert (
        config.deepen == "stored" and request_for(world, deepen="copy-last").ga_config().deepen == "copy-last"
    )
    assert config.depth_elites == 0 and request_for(world, depth_elites=2).ga_config().depth_elites == 2
    # Unset, it stays out of the identity: a request saved before the knob existed still matches.
    assert "depth_elites" not in request_for(world).identity()
    assert request_for(world).search_precision_value == "float32"
    assert request_for(world, search_precision="bfloat16").search_precision_value == "bfloat16"
    assert "search_precision" not in request_for(world).identity()
    assert request_for(world, search_precision="bfloat16").identity() != request_for(world).identity()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budgets": (0.02, -1.0)}, "budget 2"),
        ({"budgets": (math.nan,)}, "finite"),
        ({"budgets": (math.inf,)}, "finite"),
        ({"budgets": (0.0,)}, "positive"),
        ({"budgets": ()}, "non-empty"),
        ({"budgets": (0.02, 0.02)}, "distinct"),
        ({"constraint": "joules"}, "constraint must be one of"),
        ({"lut": None}, "needs a latency table"),
        ({"preset": "huge"}, "unknown preset"),
        ({"pool_size": 1}, "pool_size"),
        ({"patience": -1}, "patience"),
        ({"deepen": "grow"}, "deepen must be one of"),
        ({"depth_elites": -1}, "depth_elites"),
        ({"depth_elites": 1.5}, "depth_elites"),
        ({"search_precision": "float16"}, "search_precision must be one of"),
        ({"device": "cuda", "search_workers": 1, "search_precision": "bfloat16"}, "a CPU option"),
        ({"test_tasks": 1}, "test_tasks"),
        ({"task_source": "web"}, "task_source"),
        ({"task_source": "support", "support": None}, "needs a support set"),
        ({"weights": "finetuned", "support": None}, "fine-tune"),
        ({"unit": "parsec"}, "unknown unit"),
        ({"seed": -1}, "seed"),
        ({"search_workers": 0}, "search_workers"),
        ({"device": "tpu"}, "device must be one of"),
        ({"device": "cuda", "search_workers": 2}, "search_workers must be 1 on cuda"),
    ],
)
def test_bad_request_fields_are_named(world, changes, message):
    with pytest.raises(AdaptionRequestError, match=message):
        request_for(world, **changes)


def test_bad_request_json_is_refused():
    with pytest.raises(AdaptionRequestError, match="unknown adaption request fields"):
        AdaptionRequest.from_dict({"supernet": "a", "constraint": "params", "budgets": [1], "colour": "red"})
    with pytest.raises(AdaptionRequestError, match="lacks"):
        AdaptionRequest.from_dict({"supernet": "a"})
    with pytest.raises(AdaptionRequestError, match="one kind"):
        AdaptionRequest.from_budget_strings(["params=1K", "macs=1M"], supernet="a")
    with pytest.raises(AdaptionRequestError, match="cannot parse"):
        AdaptionRequest.from_budget_strings(["latency=fast"], supernet="a")


# --------------------------------------------------------------------------- end to end
def test_every_budget_gets_a_feasible_package_with_a_model_card(world, adapted):
    request, result, events, out = adapted
    assert len(result.outcomes) == 2 and result.constraints_met
    for outcome, budget in zip(result.outcomes, request.budgets, strict=True):
        assert outcome.costs["latency_ms"] <= budget
        assert outcome.random is not None and outcome.random["costs"]["latency_ms"] <= budget
        assert outcome.random["evaluations"] <= outcome.evaluations
        folder = Path(outcome.package)
        assert folder.parent == out and {p.name for p in folder.iterdir()} >= {
            TORCHSCRIPT_NAME,
            ONNX_NAME,
            MODEL_CARD_NAME,
            "weights.pt",
            "inner_loop.json",
        }
        card = read_model_card(folder)
        assert card == outcome.model_card
        assert card["architecture"] == outcome.arch and card["device"] == "test-board"
        assert card["budget"]["limit"] == budget and card["constraint_met"] is True
        assert card["latency_ms"]["lut_predicted"] == pytest.approx(outcome.costs["latency_ms"])
        assert card["latency_ms"]["measured_here"]["median_ms"] > 0
        assert card["latency_ms"]["measured_at_reference"] is None  # the table has no speed reference
        assert card["params"] == outcome.costs["params"] and card["macs"] == outcome.costs["macs"]
        assert (
            0 <= card["accuracy"]["mean"] <= 1
            and card["accuracy"]["tasks"] == 10
            and card["accuracy"]["ci95"] >= 0
        )
        assert card["classes"] == world["classes"] and card["weights"] == "finetuned"
        assert card["preprocessing"]["input_shape"] == [1, 1, 28, 28]
        assert card["preprocessing"]["mean"] == [0.0] and card["preprocessing"]["invert"] is False
        assert card["bn_statistics"]["source"] == "support set"
        assert card["finetuning"]["steps"] == 3 * 2  # tiny preset: 2 inner steps, fine-tuned for 3x
    # The front is the non-dominated set of (latency, loss) over everything evaluated.
    points = [(p["costs"]["latency_ms"], p["loss"]) for p in result.front]
    assert points == sorted(points) and all(a[1] > b[1] for a, b in zip(points, points[1:], strict=False))
    assert AdaptionResult.load(out) == result
    baselines = {b["name"]: b for b in result.baselines}
    assert set(baselines) == {"MAML 4-conv", "MAML++ 4-conv"}
    assert baselines["MAML 4-conv"]["params"] == 112_261  # 64 filters, 28x28x1, 5-way
    assert (
        baselines["MAML 4-conv"]["accuracy"] is None
        and "no baseline checkpoint" in baselines["MAML 4-conv"]["accuracy_note"]
    )
    assert result.ms_per_evaluation > 0 and result.evaluations > 0


def test_ga_minus_random_is_paired_on_the_same_test_tasks(world, adapted):
    """The GA's choice and random search's are scored on the same test tasks, so the card states
    their difference task by task; the per-task lists stay in the state, out of cards."""
    _, result, _, _ = adapted
    state = json.loads((world["root"] / "state.json").read_text())
    for outcome in result.outcomes:
        ga_key = Arch.from_dict(outcome.arch).canonical().to_json()
        random_key = Arch.from_dict(outcome.random["arch"]).canonical().to_json()
        ga_tasks = state["test"][ga_key]["task_accuracies"]
        random_tasks = state["test"][random_key]["task_accuracies"]
        assert len(ga_tasks) == len(random_tasks) == 10
        assert np.mean(ga_tasks) == pytest.approx(outcome.test_accuracy["mean"])
        difference = np.subtract(ga_tasks, random_tasks)
        paired = outcome.random["ga_minus_random"]
        assert paired == outcome.model_card["random_search"]["ga_minus_random"]
        assert paired["tasks"] == 10
        assert paired["mean"] == pytest.approx(difference.mean())
        assert paired["mean"] == pytest.approx(
            outcome.test_accuracy["mean"] - outcome.random["test_accuracy"]["mean"]
        )
        assert paired["ci95"] == pytest.approx(1.96 * difference.std(ddof=1) / math.sqrt(10))
        assert "task_accuracies" not in outcome.test_accuracy
        assert "task_accuracies" not in outcome.model_card["random_search"]["test_accuracy"]
    assert "task_accuracies" not in json.dumps(result.to_dict())


def test_scoring_a_pick_again_on_the_requests_test_tasks_repeats_the_sweeps_figures(world, adapted):
    """request_test_tasks redraws the request's own test tasks, so a sub-net scored after the
    request (benchmarks/headroom.py) is paired task by task with what the request scored."""
    request, result, _, _ = adapted
    state = json.loads((world["root"] / "state.json").read_text())
    spec, run, _ = load_supernet(request.supernet)
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    batches = request_test_tasks(request, spec)
    assert sum(batch.support_x.shape[0] for batch in batches) == 10
    for outcome in result.outcomes:
        key = Arch.from_dict(outcome.arch).canonical().to_json()
        again = accuracy_on_tasks(scorer, Arch.from_dict(outcome.arch), batches, spec.dataset)
        assert again["task_accuracies"] == pytest.approx(state["test"][key]["task_accuracies"], abs=1e-6)
        assert again["tasks"] == 10 and again["split"] == "test"
    # Another draw: other tasks of the same split, as many as asked for.
    other = request_test_tasks(request, spec, draw=1, count=20)
    assert sum(batch.support_x.shape[0] for batch in other) == 20
    assert not torch.equal(other[0].query_x[0], batches[0].query_x[0])
    assert torch.equal(request_test_tasks(request, spec, draw=1, count=20)[0].query_x, other[0].query_x)


def test_headroom_benchmark_on_a_finished_sweep(world, adapted, tmp_path):
    """benchmarks/headroom.py: the best found is at least as good as both picks, its
    differences are paired on the sweep's tasks, and the scores it adds are kept."""
    from benchmarks.headroom import HEADROOM_NAME, STATE_NAME, SweepHeadroom

    request, result, _, _ = adapted
    (tmp_path / STATE_NAME).write_text((world["root"] / "state.json").read_text())
    rows = SweepHeadroom(tmp_path, confirm_tasks=10).budget_rows(top=3)
    kept = json.loads((tmp_path / HEADROOM_NAME).read_text())
    assert len(rows) == len(request.budgets) == len(result.outcomes)
    for row, outcome in zip(rows, result.outcomes, strict=True):
        assert row["budget"]["limit"] == outcome.budget["limit"]
        assert row["ga_acc"] == pytest.approx(100 * outcome.test_accuracy["mean"], abs=1e-3)
        assert row["random_acc"] == pytest.approx(100 * outcome.random["test_accuracy"]["mean"], abs=1e-3)
        assert row["best_acc"] >= max(row["ga_acc"], row["random_acc"]) - 1e-9
        assert row["headroom_over_random"] == pytest.approx(row["best_acc"] - row["random_acc"], abs=2e-3)
        assert row["ga_shortfall"] == pytest.approx(row["best_acc"] - row["ga_acc"], abs=2e-3)
        assert 0 < row["feasible_ga"] <= row["feasible_in_archive"]
        assert row["best_search_rank"] is None or 1 <= row["best_search_rank"] <= 3
        # On 10 other tasks the best found need not stay ahead, but the figures are paired there.
        assert math.isfinite(row["confirmed_headroom_over_random"])
        assert row["confirmed_ga_shortfall_ci95"] >= 0
    assert kept["request"] == request.identity()
    assert sum(row["scored_now"] for row in rows) == len(kept["test"]) + len(kept["confirm-10"])
    assert len(kept["test"]) > 0 and 1 <= len(kept["confirm-10"]) <= 3 * len(rows)
    # Again: everything is kept, nothing is scored twice, and the figures are the same.
    again = SweepHeadroom(tmp_path, confirm_tasks=10).budget_rows(top=3)
    assert [row["scored_now"] for row in again] == [0] * len(rows)

    def figures(row):
        return {key: value for key, value in row.items() if key not in ("scored_now", "score_s")}

    assert [figures(row) for row in again] == [figures(row) for row in rows]
    # Scores kept for another request are refused, not mixed in.
    other = json.loads((tmp_path / STATE_NAME).read_text())
    other["request"]["seed"] += 1
    (tmp_path / STATE_NAME).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another sweep's request"):
        SweepHeadroom(tmp_path)


def test_a_state_scored_before_the_per_task_lists_resumes_without_a_paired_difference(
    world, adapted, tmp_path
):
    request, result, _, _ = adapted
    old = json.loads((world["root"] / "state.json").read_text())
    for entry in old["test"].values():
        del entry["task_accuracies"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    resumed = run_adaption(request, out_dir=tmp_path / "out", state_path=tmp_path / "old.json")
    assert resumed.resumed
    for before, after in zip(result.outcomes, resumed.outcomes, strict=True):
        assert after.random["ga_minus_random"] is None
        assert after.test_accuracy == before.test_accuracy  # taken from the state, not re-scored
        assert after.random["test_accuracy"] == before.random["test_accuracy"]


def test_paired_difference_of_two_score_lists():
    def scored(values):
        return {"mean": float(np.mean(values)), "task_accuracies": list(values)}

    ga, rival = scored([0.5, 0.75, 1.0, 0.25]), scored([0.25, 0.5, 1.0, 0.25])
    paired = paired_difference(ga, rival)
    assert paired["mean"] == pytest.approx(0.125) and paired["tasks"] == 4
    assert paired["ci95"] == pytest.approx(1.96 * np.std([0.25, 0.25, 0.0, 0.0], ddof=1) / 2)
    # The same architecture on both sides: exactly no difference, no spread.
    assert paired_difference(ga, ga) == {"mean": 0.0, "ci95": 0.0, "tasks": 4}
    # Entries scored before the per-task lists were kept, or on other task counts: no claim.
    assert paired_difference({"mean": 0.5}, rival) is None
    assert paired_difference(ga, scored([0.5])) is None
    assert paired_difference(None, rival) is None


def test_progress_events_are_small_json_with_population_front_and_best(adapted):
    request, result, events, _ = adapted
    generations = events.of_kind("adapt")
    assert len(generations) == 2 * 6
    assert [e["current"] for e in generations] == list(range(1, 13)) and generations[0]["total"] == 12
    for event in generations:
        text = json.dumps(event, allow_nan=False)
        assert len(text) < 20_000
        assert len(event["population"]) == 12 and event["front"] and event["best"]["backbone"] == "vgg9"
        assert event["budget"]["limit"] == request.budgets[event["budget_index"]]
        assert all(p["costs"]["latency_ms"] <= event["budget"]["limit"] for p in event["population"])
        assert event["metric"] == "loss"  # what every fitness and front "loss" of it measures
    assert result.to_dict()["search_metric"] == "loss"  # the tiny preset's, though the request left it open
    stages = {e["stage"] for e in events.of_kind("adapt_stage")}
    assert stages == {"random_search", "evaluate", "package"}
    # The tiny preset warm-starts: the looser budget's GA runs first and seeds the tighter one.
    assert [e["budget_index"] for e in generations] == [1] * 6 + [0] * 6
    assert [e["budget_index"] for e in events.of_kind("adapt_stage") if e["stage"] == "random_search"] == [
        1,
        0,
    ]
    assert result.outcomes[1].random["inherited"] == 0 and result.outcomes[0].random["inherited"] > 0
    seeds = [o.model_card["search"]["warm_start_seeds"] for o in result.outcomes]
    assert seeds == [2, 0]
    # No patience in the preset: every GA runs all its generations.
    assert not any(e["stopped_early"] for e in generations)
    assert [o.model_card["search"]["generations"] for o in result.outcomes] == [6, 6]


def test_a_state_saved_before_warm_starts_resumes_as_it_ran(world, adapted, tmp_path):
    """States written before 2026-12-06 have no run order (and their requests no warm_start
    field): they finish in the given order with random initial pools, as they started."""
    cold = request_for(world, warm_start=0, measure_latency=False)
    uninterrupted = run_adaption(cold, out_dir=tmp_path / "cold", progress=ListProgress())
    state = tmp_path / "state.json"
    with pytest.raises(JobCancelled):
        run_adaption(request_for(world, measure_latency=False), out_dir=tmp_path / "out",
                     progress=_cancel_at_adapt_event(9), state_path=state)  # fmt: skip
    assert json.loads(state.read_text())["order"] == [1, 0]
    with pytest.raises(JobCancelled):
        run_adaption(
            cold,
            out_dir=tmp_path / "out2",
            progress=_cancel_at_adapt_event(9),
            state_path=tmp_path / "old.json",
        )
    old = json.loads((tmp_path / "old.json").read_text())
    assert old.pop("order") == [0, 1]
    del old["request"]["warm_start"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    resumed = run_adaption(
        request_for(world, measure_latency=False), out_dir=tmp_path / "out2", state_path=tmp_path / "old.json"
    )
    assert resumed.resumed and comparable(resumed) == comparable(uninterrupted)
    assert [o.model_card["search"]["warm_start_seeds"] for o in resumed.outcomes] == [0, 0]


def _cancel_at_adapt_event(count: int):
    seen = []

    def progress(event: dict) -> None:
        if event["kind"] == "adapt":
            seen.append(event)
            if len(seen) == count:
                raise JobCancelled()

    return progress


def test_exported_model_classifies_the_support_set_in_a_process_without_engine(world, adapted):
    _, result, _, _ = adapted
    script = textwrap.dedent(
        """
        import io, json, sys, zipfile
        import numpy as np, torch
        from PIL import Image
        package, support = sys.argv[1], sys.argv[2]
        card = json.load(open(package + "/model_card.json"))
        pre = card["preprocessing"]
        model = torch.jit.load(package + "/" + card["files"]["torchscript"])
        mean = np.array(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.array(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
        right = total = 0
        with zipfile.ZipFile(support) as archive:
            for name in sorted(archive.namelist()):
                if not name.endswith(".png"):
                    continue
                image = Image.open(io.BytesIO(archive.read(name))).convert(pre["color_mode"])
                image = image.resize(tuple(pre["input_size"][::-1]), Image.Resampling.LANCZOS)
                pixels = np.asarray(image, dtype=np.float32).reshape(pre["channels"], *pre["input_size"])
                if pre["invert"]:
                    pixels = 255.0 - pixels
                x = torch.from_numpy((pixels / 255.0 - mean) / std).unsqueeze(0)
                with torch.no_grad():
                    predicted = card["classes"][int(model(x).argmax(dim=1))]
                right += predicted == name.split("/")[0]
                total += 1
        assert "engine" not in sys.modules
        print(json.dumps({"accuracy": right / total, "images": total}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for outcome in result.outcomes:
        done = subprocess.run(
            [sys.executable, "-c", script, outcome.package, world["support"]],
            cwd=world["root"],  # not the repository: engine is not importable there
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["images"] == WAYS * 4
        assert report["accuracy"] >= 0.8, report
        assert report["accuracy"] == pytest.approx(outcome.model_card["finetuning"]["support_accuracy"])


def test_onnx_export_matches_the_torchscript_model(world, adapted):
    _, result, _, _ = adapted
    from engine.export import load_torchscript

    folder = Path(result.outcomes[0].package)
    module = load_torchscript(folder / TORCHSCRIPT_NAME)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert onnx_roundtrip_error(module, folder / ONNX_NAME, x) < 1e-4


def test_resume_after_cancellation_equals_the_uninterrupted_run(world, adapted):
    request, uninterrupted, _, _ = adapted
    root = world["root"] / "resume"
    state = root / "state.json"
    out = root / "out"

    class CancelAt:
        def __init__(self, kind: str, count: int) -> None:
            self.kind, self.count, self.seen = kind, count, 0
            self.events = ListProgress()

        def __call__(self, event: dict) -> None:
            self.events(event)
            if event["kind"] == self.kind:
                self.seen += 1
                if self.seen == self.count:
                    raise JobCancelled()

    in_second_budget = CancelAt("adapt", 9)  # budget 2, generation 3
    with pytest.raises(JobCancelled):
        run_adaption(request, out_dir=out, progress=in_second_budget, state_path=state)
    assert state.exists() and not out.exists()  # nothing but the state is written before the end
    while_evaluating = CancelAt("adapt_stage", 3)  # 2 random searches done, first test evaluation done
    # Resumed by a worker that runs the search in 2 processes: how it runs is not what it computes.
    on_another_worker = replace(request, search_workers=2)
    with pytest.raises(JobCancelled):
        run_adaption(on_another_worker, out_dir=out, progress=while_evaluating, state_path=state)
    resumed_generations = while_evaluating.events.of_kind("adapt")
    assert resumed_generations[0]["current"] == 10  # continued after the last finished generation
    final = run_adaption(request, out_dir=out, progress=ListProgress(), state_path=state)
    assert final.resumed
    assert comparable(final) == comparable(uninterrupted)
    with pytest.raises(AdaptionStateError, match="different adaption request"):
        run_adaption(request_for(world, seed=5), out_dir=root / "other", state_path=state)


def test_a_sweep_never_resumes_on_another_search_metric(world, tmp_path):
    """A request that leaves the metric to its preset resumes only a state that searched on the
    metric the preset names now: `cpu` switched from the loss to the error rate on 2026-12-07."""
    from engine.adaption import _StateFile

    request = request_for(world, measure_latency=False)  # tiny: the loss
    state = tmp_path / "state.json"
    with pytest.raises(JobCancelled):
        run_adaption(request, out_dir=tmp_path / "out", progress=_cancel_at_adapt_event(3), state_path=state)
    saved = json.loads(state.read_text())
    assert saved["search_metric"] == "loss" and saved["request"]["search_metric"] is None
    assert _StateFile(state, request).resumed
    del saved["search_metric"]  # a state written before the field: every preset searched on the loss
    state.write_text(json.dumps(saved))
    assert _StateFile(state, request).resumed
    saved["search_metric"] = "accuracy"  # as if the preset had searched on the error rate then
    state.write_text(json.dumps(saved))
    with pytest.raises(
        AdaptionStateError, match="minimised the 'accuracy' metric, this request's minimises 'loss'"
    ):
        run_adaption(request, out_dir=tmp_path / "out", state_path=state)
    assert not (tmp_path / "out").exists()


def test_search_in_worker_processes_gives_the_same_result(world, adapted):
    """GA and random search scored by 2 forked processes choose exactly what 1 process chooses."""
    import psutil

    request, single, _, _ = adapted
    assert (request.search_workers or request.threads) == 1
    children_before = {child.pid for child in psutil.Process().children()}
    parallel = run_adaption(
        request_for(world, measure_latency=True, search_workers=2), out_dir=world["root"] / "parallel"
    )
    assert comparable(parallel) == comparable(single)
    assert parallel.evaluations == single.evaluations > 0
    # The workers are plain os.fork children (multiprocessing does not know them): none is left.
    assert {child.pid for child in psutil.Process().children()} <= children_before


def test_search_in_spawned_worker_processes_gives_the_same_result(world, adapted, monkeypatch):
    """On a machine with a GPU the search processes are spawned, not forked (a fork after the
    first backward cannot run autograd there); forced here: same choices as one process."""
    from engine.search import parallel

    monkeypatch.setattr(parallel, "_fork_breaks_autograd", lambda: True)
    _, single, _, _ = adapted
    spawned = run_adaption(
        request_for(world, measure_latency=True, search_workers=2), out_dir=world["root"] / "spawned"
    )
    assert comparable(spawned) == comparable(single)


def test_fitness_memo_answers_later_requests_without_changing_any_choice(world, adapted, tmp_path):
    """Requests sharing a memo choose exactly what they choose alone; a repeat scores nothing,
    another device's request reuses what the first scored."""
    from engine.search.memo import FitnessMemo, model_key

    _, alone, _, _ = adapted
    memo_path = tmp_path / "memo.sqlite"
    first = run_adaption(
        request_for(world, measure_latency=True, search_workers=2, fitness_memo=str(memo_path)),
        out_dir=tmp_path / "first",
    )
    assert comparable(first) == comparable(alone)
    # Random search re-meets architectures the GA scored on the same slice: answered by the memo.
    assert 0 < first.memo_hits < first.evaluations
    assert first.ms_per_evaluation is not None

    repeat = run_adaption(
        request_for(world, measure_latency=True, fitness_memo=str(memo_path)), out_dir=tmp_path / "r"
    )
    assert comparable(repeat) == comparable(alone)
    assert repeat.memo_hits >= repeat.evaluations > 0 and repeat.ms_per_evaluation is None  # nothing scored

    # Another device (its table twice as slow per layer) and one other budget: fitness does not
    # depend on either, so the first request's losses are reused; the choice equals a memo-less run.
    slow = LatencyTable.load(world["lut"])
    slow = LatencyTable(
        device="slow-board", entries={k: 2 * v for k, v in slow.entries.items()}, metadata=slow.metadata
    )
    slow.save(tmp_path / "slow.json")
    other = dict(lut=str(tmp_path / "slow.json"), budgets=(2 * world["budgets"][1],), random_baseline=False)
    cold = run_adaption(request_for(world, **other), out_dir=tmp_path / "cold")
    warm = run_adaption(request_for(world, **other, fitness_memo=str(memo_path)), out_dir=tmp_path / "warm")
    assert [o.arch for o in warm.outcomes] == [o.arch for o in cold.outcomes]
    assert [o.search_loss for o in warm.outcomes] == [o.search_loss for o in cold.outcomes]
    assert warm.evaluations == cold.evaluations and warm.memo_hits > 0

    # A memo holds rows of this super-net only (its weights' digest).
    weights = build_run(SPEC).learner.state_dict()  # untrained: not the checkpoint's weights
    assert FitnessMemo(memo_path, model_key(weights, "cpu")).count() == 0
    # What the result says is what the request kept: the memo path is not part of its identity.
    assert AdaptionResult.load(tmp_path / "warm").memo_hits == warm.memo_hits
    assert request_for(world, fitness_memo=str(memo_path)).identity() == request_for(world).identity()


def test_bfloat16_search_scores_only_the_search_slices_in_bfloat16(world):
    """Search slices score under bfloat16 autocast: deterministic, close to float32 and not
    equal to it (so the autocast took effect); held-out slices, which decide the final choice,
    score exactly as in float32; the memo never mixes the two arithmetics."""
    from engine.adaption import TimedFitness, load_supernet
    from engine.search.adapt import SuperNetScorer, inner_loop_from_learner, slice_tasks, task_slices

    _, run, _ = load_supernet(world["checkpoint"])
    tasks = slice_tasks(task_source(SPEC, "val")[0](np.random.default_rng(3), 8))
    scorer = SuperNetScorer(run.learner.model, inner_loop_from_learner(run.learner))
    slices = task_slices(tasks, 4)  # slice 0 searches, slice 1 is held out

    def fitness(precision: str) -> TimedFitness:
        return TimedFitness(scorer, slices, search_slices=1, final_metric="loss", search_precision=precision)

    float32, bfloat16 = fitness("float32"), fitness("bfloat16")
    archs = [world["space"].sample(np.random.default_rng(seed)) for seed in range(6)]
    search32 = [float32(arch, 0) for arch in archs]
    search16 = [bfloat16(arch, 0) for arch in archs]
    assert search16 == [bfloat16(arch, 0) for arch in archs]  # deterministic
    assert search16 != search32
    # Losses ~1-1.6 here. Measured: at most 0.026 apart with native bfloat16 instructions, 0.114
    # with oneDNN held to AVX2 (emulated, and another super-net: training's kernels differ too).
    assert max(abs(a - b) for a, b in zip(search16, search32, strict=True)) < 0.2
    assert [bfloat16(arch, 1) for arch in archs] == [float32(arch, 1) for arch in archs]
    assert bfloat16.slice_key(0) != float32.slice_key(0)
    assert bfloat16.slice_key(1) == float32.slice_key(1)


def test_a_fitness_memo_that_is_not_one_fails_before_anything_is_written(world, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 50)
    with pytest.raises(AdaptionRequestError, match="not a fitness memo"):
        run_adaption(request_for(world, fitness_memo=str(notes)), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and notes.read_text().startswith("not a database")
    with pytest.raises(AdaptionRequestError, match="fitness_memo must be a non-empty path"):
        request_for(world, fitness_memo="  ")


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_before_anything_is_written(world, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InfeasibleBudgetError, match="the smallest one .* none of"):
        run_adaption(request_for(world, budgets=(1e-6,)), out_dir=out)
    other = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=WAYS)  # full width: another space
    fake_lut(other, "other-board").save(tmp_path / "other_lut.json")
    with pytest.raises(AdaptionInputError, match="another search space"):
        run_adaption(request_for(world, lut=str(tmp_path / "other_lut.json")), out_dir=out)
    write_support_zip(tmp_path / "three.zip", 3)
    with pytest.raises(AdaptionRequestError, match="has 3 classes .* 5-way"):
        run_adaption(request_for(world, support=str(tmp_path / "three.zip")), out_dir=out)
    with pytest.raises(AdaptionRequestError, match="does not exist"):
        run_adaption(request_for(world, support=str(tmp_path / "missing.zip")), out_dir=out)
    with pytest.raises(ValueError, match="no checkpoint"):
        run_adaption(request_for(world, supernet=str(tmp_path / "none.pt")), out_dir=out)
    single = tmp_path / "single.zip"
    write_support_zip(single, WAYS, per_class=1)
    with pytest.raises(AdaptionRequestError, match=">= 2 images per class"):
        run_adaption(request_for(world, support=str(single), task_source="support"), out_dir=out)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            run_adaption(request_for(world, device="cuda"), out_dir=out)
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_search_on_the_gpu_chooses_what_the_cpu_chooses(world, adapted):
    """Scored on CUDA (float32 there too), the GA picks the same architectures; the packages are
    built on the CPU and fit their budgets."""
    _, on_cpu, _, _ = adapted
    on_gpu = run_adaption(request_for(world, device="cuda"), out_dir=world["root"] / "gpu")
    assert [o.arch for o in on_gpu.outcomes] == [o.arch for o in on_cpu.outcomes]
    assert all(o.constraint_met for o in on_gpu.outcomes)
    package = on_gpu.outcomes[0]
    model = torch.jit.load(package.package + "/" + package.model_card["files"]["torchscript"])
    assert next(iter(model.parameters())).device.type == "cpu"


# --------------------------------------------------------------------------- other paths
def test_meta_weight_package_and_support_tasks(world, tmp_path):
    """Inherited meta-weights (task-agnostic card) and GA fitness on tasks cut from the support set.

    Under a params budget, the device's table still prices the chosen sub-net's latency; a table
    built at a speed reference gets the package's timing at that reference speed too."""
    space = world["space"]
    referenced = LatencyTable.load(world["lut"])
    referenced.metadata["speed_reference"] = {"workload": "conv3x3 32->32", "base_ms": 0.1}
    referenced.save(tmp_path / "referenced_lut.json")
    request = request_for(
        world,
        constraint="params",
        budgets=(float(arch_params(space, space.largest())),),
        lut=str(tmp_path / "referenced_lut.json"),
        measure_latency=True,
        weights="meta",
        task_source="support",
        pool_size=4,
        iterations=2,
        num_slices=2,
        test_tasks=0,
        random_baseline=False,
        export_onnx=False,
    )
    result = run_adaption(request, out_dir=tmp_path / "out")
    (outcome,) = result.outcomes
    card = outcome.model_card
    assert card["classes"] == "task-agnostic" and card["weights"] == "meta"
    assert card["accuracy"] is None and outcome.random is None and "onnx" not in card["files"]
    assert card["budget"]["kind"] == "params" and card["params"] <= request.budgets[0]
    predicted = LatencyTable.load(world["lut"]).predict(space, Arch.from_dict(outcome.arch))
    assert card["latency_ms"]["lut_predicted"] == pytest.approx(predicted) and predicted > 0
    measured = card["latency_ms"]["measured_here"]
    assert measured["relative"] > 0 and card["latency_ms"]["measured_at_reference"] == pytest.approx(
        measured["relative"] * 0.1
    )
    assert card["search"]["task_source"] == "support" and "support" in card["bn_statistics"]["source"]
    rates = json.loads((Path(outcome.package) / "inner_loop.json").read_text())
    assert rates["steps"] == 2 and "head.2.weight" in rates["learning_rates"]
    assert all(len(values) == 2 for values in rates["learning_rates"].values())


def test_final_choice_scores_on_held_out_validation_tasks(world, tmp_path):
    """final_slices adds slices of fresh validation tasks, at the super-net's own query count
    (not search_queries), that GA and random search score only their finalists on."""
    from engine.adaption import _prepare

    request = request_for(
        world, support=None, search_queries=1, final_slices=2, pool_size=6, iterations=2,
        num_slices=2, final_candidates=2, test_tasks=0, export_onnx=False,
    )  # fmt: skip
    context = _prepare(request)
    slices = context.fitness.slices
    assert len(slices) == 2 + 2 and all(len(s) == 4 for s in slices)
    query_images = [{task[2].shape[0] for task in s} for s in slices]
    assert query_images == [{WAYS * 1}] * 2 + [{WAYS * SPEC.query_count}] * 2 and SPEC.query_count > 1
    search_images = torch.cat([task[0] for s in slices[:2] for task in s])
    for task in slices[2][:2]:  # fresh tasks, not the search's again
        assert not any(
            torch.equal(task[0], search_images[i : i + WAYS]) for i in range(0, len(search_images), WAYS)
        )
    context.fitness.close()

    # With final_metric "accuracy" a held-out slice scores the query error rate, a search slice the loss.
    arch = world["space"].largest()
    assert request.final_metric_value == "accuracy"  # the tiny preset's
    score = context.scorer.score(arch, slices[2])
    assert context.fitness._loss(arch, 2) == pytest.approx(1.0 - score.accuracy)
    assert context.fitness._loss(arch, 1) == pytest.approx(context.scorer.score(arch, slices[1]).loss)
    context.fitness.close()

    result = run_adaption(request, out_dir=tmp_path / "out")
    for outcome in result.outcomes:
        for final in (outcome.model_card["search"]["final_choice"], outcome.random["final_choice"]):
            assert {k: final[k] for k in ("candidates", "held_out_slices", "tasks_per_slice", "metric")} == {
                "candidates": 2, "held_out_slices": 2, "tasks_per_slice": 4, "metric": "accuracy",
            }  # fmt: skip
            assert 0.0 <= final["held_out_accuracy"] <= 1.0
        # The GA's finalists come from everything it scored (the tiny preset's); random search
        # has one screening list, so its summary names no such choice.
        assert outcome.model_card["search"]["final_choice"]["finalists_from"] == "archive"
        assert "finalists_from" not in outcome.random["final_choice"]
        assert outcome.constraint_met and outcome.random["constraint_met"]
        # A mean query loss over the search slices it was scored on, not an error rate (which a
        # fixed threshold cannot tell apart: a well-adapted tiny net's loss can be below 0.5).
        chosen = Arch.from_dict(outcome.arch)
        scores = [context.scorer.score(chosen, slices[i]) for i in (0, 1)]
        losses = [score.loss for score in scores]
        errors = [1.0 - score.accuracy for score in scores]
        assert outcome.search_loss in [pytest.approx(v, rel=1e-3) for v in (*losses, sum(losses) / 2)]
        assert outcome.search_loss not in [pytest.approx(v, rel=1e-3) for v in (*errors, sum(errors) / 2)]
    by_loss = run_adaption(
        replace(request, final_metric="loss", random_baseline=False), out_dir=tmp_path / "by_loss"
    )
    final = by_loss.outcomes[0].model_card["search"]["final_choice"]
    chosen = Arch.from_dict(by_loss.outcomes[0].arch)
    held_out = [context.scorer.score(chosen, slices[i]) for i in (2, 3)]
    assert final["metric"] == "loss"
    assert final["held_out_loss"] == pytest.approx(sum(s.loss for s in held_out) / 2, rel=1e-3)
    assert final["held_out_loss"] != pytest.approx(sum(1.0 - s.accuracy for s in held_out) / 2, rel=1e-3)
    with pytest.raises(AdaptionRequestError, match="final_slices"):
        request_for(world, final_slices=-1)
    with pytest.raises(AdaptionRequestError, match="final_metric"):
        request_for(world, final_metric="f1")
    with pytest.raises(AdaptionRequestError, match="finalists_from"):
        request_for(world, finalists_from="best")
    assert request_for(world, finalists_from="last").ga_config().finalists_from == "last"


def test_searching_on_the_error_rate_scores_every_slice_by_accuracy(world, tmp_path):
    """search_metric "accuracy" (the `cpu` preset's): the search slices score the query error rate
    too (Algorithm 1, `tiny` and `paper` search on the loss), in memo entries of their own."""
    from engine.adaption import MAX_TIE_BREAK_LOSS, SEARCH_ERROR_TIE_BREAK, _prepare

    request = request_for(
        world, support=None, search_metric="accuracy", final_slices=1, pool_size=6, iterations=2,
        num_slices=2, final_candidates=2, test_tasks=0, export_onnx=False,
    )  # fmt: skip
    assert request.search_metric_value == "accuracy" and request_for(world).search_metric_value == "loss"
    presets = {name: request_for(world, preset=name).search_metric_value for name in ("tiny", "cpu", "paper")}
    assert presets == {"tiny": "loss", "cpu": "accuracy", "paper": "loss"}
    context = _prepare(request)
    by_loss = _prepare(replace(request, search_metric=None))
    arch = world["space"].largest()
    slices = context.fitness.slices
    for slice_id in (0, 1):  # the search slices: the error rate, ties broken by the loss
        score = context.scorer.score(arch, slices[slice_id])
        expected = 1.0 - score.accuracy + SEARCH_ERROR_TIE_BREAK * min(score.loss, MAX_TIE_BREAK_LOSS)
        assert context.fitness._loss(arch, slice_id) == pytest.approx(expected, rel=1e-12, abs=0)
        assert context.fitness._loss(arch, slice_id) != pytest.approx(1.0 - score.accuracy, rel=1e-12, abs=0)
    held_out = context.scorer.score(arch, slices[2])  # the final choice's: the error rate alone
    assert context.fitness._loss(arch, 2) == pytest.approx(1.0 - held_out.accuracy, rel=1e-12, abs=0)
    assert by_loss.fitness._loss(arch, 0) == pytest.approx(context.scorer.score(arch, slices[0]).loss)
    # The same tasks, another number: a memo shared with loss-searching requests must not mix them.
    assert context.fitness.slice_key(0) != by_loss.fitness.slice_key(0)
    assert context.fitness.slice_key(2) == by_loss.fitness.slice_key(2)  # held out: error rate in both
    context.fitness.close()
    by_loss.fitness.close()

    result = run_adaption(request, out_dir=tmp_path / "out")
    for outcome in result.outcomes:
        assert outcome.model_card["search"]["metric"] == "accuracy"
        assert 0.0 <= outcome.search_loss <= 1.0 and 0.0 <= outcome.random["search_loss"] <= 1.0
        # The mean fitness (error rate, ties broken by the loss) over the search slices it was
        # scored on (one or both).
        errors = [context.fitness._loss(Arch.from_dict(outcome.arch), i) for i in (0, 1)]
        assert any(outcome.search_loss == pytest.approx(e, rel=1e-9) for e in (*errors, np.mean(errors)))
    assert all(0.0 <= point["loss"] <= 1.0 for point in result.front)
    assert result.to_dict()["search_metric"] == "accuracy"
    with pytest.raises(AdaptionRequestError, match="search_metric must be one of"):
        request_for(world, search_metric="speed")


def test_retrain_changes_only_the_subnets_weights(world, tmp_path):
    space = world["space"]
    arch = space.smallest().with_layer(0, kernel=3).with_depth(2)
    events = ListProgress()
    result = retrain_subnet(world["checkpoint"], arch.to_dict(), iterations=3, out=tmp_path, progress=events)
    assert result.iterations == 3 and len(events.of_kind("meta_train")) == 3
    before = load_checkpoint(world["checkpoint"])["learner"]
    after = load_checkpoint(result.checkpoint)["learner"]
    assert load_checkpoint(result.checkpoint)["run_info"]["retrain"]["arch"] == arch.canonical().to_dict()
    assert not torch.equal(before["model.layers.0.conv.weight"], after["model.layers.0.conv.weight"])
    assert torch.equal(
        before["model.layers.3.conv.weight"], after["model.layers.3.conv.weight"]
    )  # unused layer
    with pytest.raises(AdaptionRequestError, match="re-trained fixed sub-net"):
        run_adaption(request_for(world, supernet=result.checkpoint), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="depth 9"):
        retrain_subnet(
            world["checkpoint"],
            Arch.from_dict({**arch.to_dict(), "depth": 9}),
            iterations=1,
            out=tmp_path / "bad",
        )


def test_cli_adapt_and_its_errors(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    common = [
        sys.executable,
        "-m",
        "engine",
        "adapt",
        "--supernet",
        world["checkpoint"],
        "--lut",
        world["lut"],
    ]
    tiny = [
        "--preset",
        "tiny",
        "--pool",
        "10",  # room for one elite of each depth: most_depth_elites(10, 0.1, 4) == 1
        "--iterations",
        "2",
        "--test-tasks",
        "4",
        "--final-slices",
        "1",
        "--final-metric",
        "loss",
        "--finalists-from",
        "last",
        "--warm-start",
        "0",
        "--patience",
        "1",
        "--depth-elites",
        "1",
        "--search-precision",
        "bfloat16",
        "--search-metric",
        "accuracy",
        "--no-onnx",
        "--quiet",
    ]
    budget = f"latency_ms={world['budgets'][1]}"
    done = subprocess.run(
        [*common, "--budget", budget, *tiny, "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["constraints_met"] and len(summary["packages"]) == 1
    card = read_model_card(Path(summary["packages"][0]))
    assert card["search"]["final_choice"]["held_out_slices"] == 1
    assert card["search"]["final_choice"]["metric"] == "loss"
    assert card["search"]["final_choice"]["finalists_from"] == "last"
    saved = AdaptionResult.load(tmp_path / "out").request
    assert saved.warm_start == 0 and saved.patience == 1 and saved.search_metric == "accuracy"
    assert saved.depth_elites == 1 and saved.ga_config().depth_elites == 1
    assert saved.search_precision == "bfloat16" and card["search"]["precision"] == "bfloat16"
    assert card["search"]["metric"] == "accuracy" and 0.0 <= card["search"]["loss"] <= 1.0
    assert 1 <= card["search"]["generations"] <= saved.ga_config().iterations
    assert (tmp_path / "out" / ".adaption-state.json").exists()
    bad = subprocess.run(
        [*common, "--budget", "latency_ms=-3", *tiny, "--out", str(tmp_path / "bad")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "must be positive" in bad.stderr and not (tmp_path / "bad").exists()


def test_adapt_events_stay_small_at_the_papers_pool_size():
    """P=100 on the full vgg9 space: the streamed event (population, front, best) is < 20 KB."""
    from engine.adaption import _compact_adapt_event
    from engine.search.adapt import make_costs_fn
    from engine.search.constraints import Constraint
    from engine.search.evolution import GAConfig, run_ga

    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=20)
    costs = make_costs_fn(space)

    def fitness(arch, slice_id: int) -> float:  # synthetic: bigger is better, plus a per-slice shift
        return 1e5 / costs(arch)["params"] + 0.01 * slice_id

    events = ListProgress()
    config = GAConfig(pool_size=100, iterations=3, num_slices=2, final_candidates=2)
    run_ga(
        space,
        fitness,
        costs,
        [Constraint("params", 60_000)],
        config,
        progress=events,
        event_extra={"budget": {}},
    )
    decode = Arch.from_dict
    for event in events.of_kind("adapt"):
        compact = _compact_adapt_event(event, 0, 0, 1, decode, "loss")
        assert len(compact["population"]) == 100
        assert len(json.dumps(compact, allow_nan=False)) < 20_000
