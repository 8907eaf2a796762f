"""MetaNAS search space, soft-pruning, pruning by threshold and export (no meta-training here)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.metanas import (
    OPERATIONS,
    PRESET_NAMES,
    Genotype,
    GenotypeError,
    MetaNasConfig,
    MetaNasConfigError,
    MetaNasSearchNet,
    SyntheticTaskSource,
    TaskBatchError,
    adapt_task,
    build_task_network,
    derive_genotype,
    export_task_model,
    initial_meta_state,
    temperature_at,
)
from engine.metanas.search_net import input_combinations
from engine.progress import ListProgress
from engine.seeding import make_rngs

TINY = MetaNasConfig.preset("tiny")

# Largest accepted drop in query accuracy from pruning the soft-pruned one-shot model (Section 4:
# "pruning no longer results in significant drops in accuracy"). One query example of 12 is 0.083.
PRUNING_ACCURACY_TOLERANCE = 0.09


def tiny_task(seed: int = 7, query_shots: int = 4):
    source = SyntheticTaskSource(
        n_way=TINY.n_way, shots=TINY.meta_train_shots, query_shots=query_shots, image_size=TINY.image_size
    )
    batch = source(1, make_rngs(seed))
    return batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The machine is shared: intra-op threads only spin against other jobs for these tiny tensors.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def adapted(single_thread):
    """One tiny 4-cell task adaption from the initial meta state (the expensive part, shared)."""
    support_x, support_y, query_x, query_y = tiny_task()
    meta = initial_meta_state(TINY, make_rngs(3))
    progress = ListProgress()
    task_model = adapt_task(meta, support_x, support_y, rngs=make_rngs(11), progress=progress)
    return task_model, query_x, query_y, progress


# ------------------------------------------------------------------------------------------ config
def test_paper_preset_is_appendix_a2_and_section_5_1():
    config = MetaNasConfig.preset("paper")
    assert config.operations == OPERATIONS
    assert "none" not in config.operations and len(config.operations) == 7
    assert (config.num_cells, config.reduction_cells, config.nodes_per_cell) == (4, (1, 3), 3)
    assert (config.meta_epochs, config.warmup_epochs) == (30_000, 15_000)
    assert (config.meta_batch_size, config.task_batch_size, config.task_train_steps) == (10, 20, 5)
    assert (config.test_arch_steps, config.test_weight_steps) == (50, 50)
    assert (config.meta_lr_weights, config.meta_lr_arch) == (1.0, 0.6)
    assert config.weight_decay_weights == 0.0 and config.prune_threshold == 0.01
    assert set(PRESET_NAMES) >= {"paper", "tiny", "cpu"}


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(MetaNasConfigError, match="warmup_epochs"):
        TINY.replace(warmup_epochs=TINY.meta_epochs + 1)
    with pytest.raises(MetaNasConfigError, match="operations"):
        TINY.replace(operations=("conv_3x3", "none"))
    with pytest.raises(MetaNasConfigError, match="prune_threshold"):
        TINY.replace(prune_threshold=0.5)
    with pytest.raises(MetaNasConfigError, match="reduction_cells"):
        TINY.replace(reduction_cells=(4,))
    with pytest.raises(MetaNasConfigError, match="no field"):
        TINY.replace(learning_rate=1.0)
    with pytest.raises(MetaNasConfigError, match="unknown MetaNAS preset"):
        MetaNasConfig.preset("huge")
    assert MetaNasConfig.from_dict(TINY.to_dict()) == TINY


# ------------------------------------------------------------------------------------------ search space
def test_search_net_has_the_paper_structure():
    net = MetaNasSearchNet(TINY, rngs=make_rngs(0))
    assert [cell.reduction for cell in net.cells] == [False, True, False, True]
    for cell in net.cells:
        assert [len(node_edges) for node_edges in cell.edges] == [2, 3, 4]
        assert all(len(ops) == 7 for node_edges in cell.edges for ops in node_edges)
    # Eq. 7: one weight per 2-combination of a node's inputs.
    assert [net.beta[f"normal_{j}"].numel() for j in range(3)] == [1, 3, 6]
    assert input_combinations(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    x = torch.randn(5, 1, TINY.image_size, TINY.image_size)
    assert net(x, 1.0).shape == (5, TINY.n_way)
    # Constant channel count: every cell outputs nodes * channels maps.
    assert net.classifier.in_features == TINY.nodes_per_cell * TINY.channels


def test_temperature_is_annealed_linearly_to_the_minimum():
    schedule = [temperature_at(s, 5, 1.0, 0.05) for s in range(7)]
    assert schedule[0] == 1.0 and schedule[4] == pytest.approx(0.05) and schedule[6] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(schedule[:5], schedule[1:5], strict=False))


def test_pruned_genotype_network_computes_the_thresholded_one_shot_model_exactly():
    net = MetaNasSearchNet(TINY, rngs=make_rngs(1))
    with torch.no_grad():
        for param in net.arch_parameters():
            param.copy_(torch.randn(param.shape, generator=make_rngs(2).torch))
    genotype = derive_genotype(net, temperature=0.1, prune_threshold=0.01)
    network = build_task_network(net, genotype)
    x = torch.randn(6, 1, TINY.image_size, TINY.image_size, generator=make_rngs(3).torch)
    with torch.no_grad():
        assert torch.equal(network(x), net(x, 0.1, prune_threshold=0.01))
    # Only kept operations are instantiated and no architecture parameter survives.
    names = [name for name, _ in network.named_parameters()]
    assert not any(name.startswith(("alpha", "beta")) for name in names)
    kept = genotype.kept_operation_count()
    assert 0 < kept < 2 * 9 * 7
    assert sum(1 for m in network.modules() if type(m).__name__ == "WeightedOp") == 2 * kept
    assert Genotype.from_json(genotype.to_json()) == genotype


def test_genotype_from_dict_rejects_malformed_descriptions():
    net = MetaNasSearchNet(TINY, rngs=make_rngs(1))
    data = derive_genotype(net, 1.0, 0.01).to_dict()
    data["normal"][0]["edges"][0]["source"] = 5
    with pytest.raises(GenotypeError, match="does not precede"):
        Genotype.from_dict(data)
    with pytest.raises(GenotypeError, match="missing or bad field"):
        Genotype.from_dict({"normal": []})


# ------------------------------------------------------------------------------------------ soft-pruning
def test_soft_pruned_operation_weights_are_near_one_hot_at_the_final_temperature(adapted):
    task_model = adapted[0]
    assert task_model.temperature == TINY.temperature_min
    for cell_type in ("normal", "reduce"):
        final = task_model.one_shot.mixture_weights(cell_type, task_model.temperature)
        uniform = task_model.one_shot.mixture_weights(cell_type, TINY.temperature_max)
        top2 = torch.cat([w.topk(2, dim=-1).values for w in final.ops])
        # Near one-hot: on average the strongest operation of an edge carries > 90% of its weight and on
        # every edge at most two operations share > 95% of it (Section 4 allows "usually not more than
        # two" weights above zero); at the initial temperature the same alphas are near uniform.
        assert float(top2[:, 0].mean()) > 0.9, top2
        assert float(top2.sum(dim=1).min()) > 0.95, top2
        assert float(torch.cat([w.max(dim=-1).values for w in uniform.ops]).max()) < 0.5
        # The input combinations are sparsified the same way (eq. 7).
        combo_max = torch.stack([w.max() for w in final.combos])
        assert float(combo_max.mean()) > 0.9, combo_max


def test_pruning_changes_accuracy_less_than_the_tolerance(adapted):
    task_model, query_x, query_y, _ = adapted
    result = task_model.evaluate(query_x, query_y)
    assert result["one_shot_accuracy"] > 1.0 / TINY.n_way  # it learned the task ...
    assert abs(result["pruning_drop"]) <= PRUNING_ACCURACY_TOLERANCE, result  # ... and pruning keeps it
    assert task_model.num_parameters < task_model.one_shot_parameters / 2


def test_without_annealing_hard_pruning_changes_the_function_much_more(adapted):
    """Appendix A.1's control: a dense (temperature 1) adaption, pruned DARTS-style to the strongest choices."""
    task_model, query_x, _, _ = adapted
    support_x, support_y, _, _ = tiny_task()
    flat = TINY.replace(temperature_min=TINY.temperature_max)
    dense = adapt_task(initial_meta_state(flat, make_rngs(3)), support_x, support_y, rngs=make_rngs(11))

    def output_change(model) -> float:
        genotype = derive_genotype(
            model.one_shot, model.temperature, TINY.prune_threshold, strongest_only=True
        )
        with torch.no_grad():
            pruned = torch.softmax(build_task_network(model.one_shot, genotype)(query_x), dim=1)
        one_shot = torch.softmax(model.one_shot_logits(query_x), dim=1)
        return float((one_shot - pruned).abs().sum(dim=1).mean())

    soft_pruned_change = output_change(task_model)
    dense_change = output_change(dense)
    assert dense_change > 3 * soft_pruned_change, (dense_change, soft_pruned_change)


def test_adapt_reports_progress_and_validates_input(adapted):
    _, _, _, progress = adapted
    events = progress.of_kind("metanas")
    assert [e["current"] for e in events] == list(range(1, TINY.test_arch_steps + TINY.test_weight_steps + 1))
    assert {e["stage"] for e in events} == {"adapt"}
    assert events[-1]["temperature"] == TINY.temperature_min
    meta = initial_meta_state(TINY, make_rngs(3))
    support_x, support_y, _, _ = tiny_task()
    with pytest.raises(TaskBatchError, match="support_y holds labels outside"):
        adapt_task(meta, support_x, support_y + TINY.n_way, rngs=make_rngs(0))
    with pytest.raises(TaskBatchError, match="channels"):
        adapt_task(meta, support_x.repeat(1, 3, 1, 1), support_y, rngs=make_rngs(0))
    with pytest.raises(MetaNasConfigError, match="different search space"):
        adapt_task(meta, support_x, support_y, TINY.replace(channels=6), rngs=make_rngs(0))


# ------------------------------------------------------------------------------------------ export
def test_exported_model_round_trips_through_torchscript_in_a_fresh_process(adapted, tmp_path):
    task_model, query_x, _, _ = adapted
    path = tmp_path / "task_model.pt"
    scripted = export_task_model(task_model, path)
    expected = task_model.predict(query_x)
    with torch.no_grad():
        assert torch.equal(scripted(query_x), expected)
    torch.save(query_x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        model = torch.jit.load({str(path)!r})
        with torch.no_grad():
            y = model(torch.load({str(tmp_path / "x.pt")!r}))
        torch.save(y, {str(tmp_path / "y.pt")!r})
        loaded = sorted(name for name in sys.modules if name == "engine" or name.startswith("engine."))
        print(loaded)
        assert not loaded, loaded
        names = [name for name, _ in model.named_parameters()]
        assert not any("alpha" in n or "beta" in n for n in names), names
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": ""},
    )
    assert completed.returncode == 0, completed.stderr
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)
    summary = task_model.summary()
    assert json.loads(json.dumps(summary))["genotype"]["method"] == "metanas"
