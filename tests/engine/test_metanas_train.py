"""MetaNAS meta-training: the REPTILE update, warm-up, determinism, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch

from engine.metanas import (
    MetaNasCheckpointError,
    MetaNasConfig,
    MetaState,
    SyntheticTaskSource,
    TaskBatch,
    TaskBatchError,
    adapt_task,
    initial_meta_state,
    reptile_meta_train,
    reptile_update,
    sampler_task_source,
    train_on_task,
)
from engine.metanas.train import CHECKPOINT_NAME, epoch_rngs
from engine.progress import JobCancelled, ListProgress
from engine.seeding import make_rngs

# Two cells keep these runs short; the 4-cell structure is covered in test_metanas.py.
SMALL = MetaNasConfig.preset(
    "tiny",
    num_cells=2,
    reduction_cells=(1,),
    meta_epochs=3,
    warmup_epochs=1,
    meta_batch_size=2,
    task_train_steps=2,
    test_arch_steps=3,
    test_weight_steps=1,
    checkpoint_every=1,
)
SOURCE = SyntheticTaskSource(
    n_way=SMALL.n_way, shots=SMALL.meta_train_shots, query_shots=2, image_size=SMALL.image_size
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The machine is shared: intra-op threads only spin against other jobs for these tiny tensors.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference_run(single_thread):
    """An uninterrupted 3-epoch run (1 warm-up epoch) with seed 5."""
    progress = ListProgress()
    state = reptile_meta_train(SMALL, SOURCE, rngs=make_rngs(5), progress=progress)
    return state, progress


# ------------------------------------------------------------------------------------------ REPTILE
def test_reptile_update_formula_on_numbers():
    phi = {"w": torch.tensor([0.0, 2.0]), "a": torch.tensor([1.0])}
    tasks = [
        {"w": torch.tensor([1.0, 4.0]), "a": torch.tensor([2.0])},
        {"w": torch.tensor([3.0, 0.0]), "a": torch.tensor([4.0])},
    ]
    updated = reptile_update(phi, tasks, {"w": 0.5, "a": 0.6})
    # phi + eps * (mean_i W_i - phi): w: [0, 2] + 0.5 * ([2, 2] - [0, 2]); a: 1 + 0.6 * (3 - 1).
    assert torch.equal(updated["w"], torch.tensor([1.0, 2.0]))
    assert torch.allclose(updated["a"], torch.tensor([2.2]))
    with pytest.raises(ValueError, match="at least one task"):
        reptile_update(phi, [], {"w": 1.0, "a": 1.0})


def test_a_meta_epoch_is_exactly_reptile_over_the_task_trained_parameters():
    config = SMALL.replace(meta_epochs=1, warmup_epochs=0)
    rngs = make_rngs(21)
    state = reptile_meta_train(config, SOURCE, rngs=rngs)

    # Recompute the epoch by hand from the same random streams.
    phi = initial_meta_state(config, rngs).state_dict
    streams = epoch_rngs(rngs, 0)
    batch = SOURCE(config.meta_batch_size, streams.child(0))
    trained = []
    for task in range(config.meta_batch_size):
        net = initial_meta_state(config, rngs).to_net()
        train_on_task(
            net,
            batch.support_x[task],
            batch.support_y[task],
            config,
            steps=config.task_train_steps,
            arch_steps=config.task_train_steps,
            rngs=streams.child(task + 1),
        )
        trained.append({name: t.detach() for name, t in net.state_dict().items()})
    for name, before in phi.items():
        eps = config.meta_lr_arch if name.startswith(("alpha.", "beta.")) else config.meta_lr_weights
        mean = torch.stack([w[name] for w in trained]).mean(dim=0)
        assert torch.equal(state.state_dict[name], before + eps * (mean - before)), name
    # The architecture moved, by 0.6 of the mean task change (not all the way as the weights with eps=1).
    alpha = "alpha.normal_0"
    mean_alpha = torch.stack([w[alpha] for w in trained]).mean(dim=0)
    assert not torch.equal(state.state_dict[alpha], phi[alpha])
    assert not torch.allclose(state.state_dict[alpha], mean_alpha)


def test_warmup_epochs_do_not_touch_the_architecture():
    config = SMALL.replace(meta_epochs=1, warmup_epochs=1)
    rngs = make_rngs(8)
    state = reptile_meta_train(config, SOURCE, rngs=rngs)
    initial = initial_meta_state(config, rngs).state_dict
    arch = [name for name in initial if name.startswith(("alpha.", "beta."))]
    assert arch and all(torch.equal(state.state_dict[name], initial[name]) for name in arch)
    assert not torch.equal(state.state_dict["classifier.weight"], initial["classifier.weight"])
    assert state.history[0]["phase"] == "warmup"


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_result_other_seed_other_result(reference_run):
    state, _ = reference_run
    again = reptile_meta_train(SMALL, SOURCE, rngs=make_rngs(5))
    assert_same_state(state.state_dict, again.state_dict)
    assert [h["query_accuracy"] for h in state.history] == [h["query_accuracy"] for h in again.history]
    other = reptile_meta_train(SMALL.replace(meta_epochs=1), SOURCE, rngs=make_rngs(6))
    assert not torch.equal(other.state_dict["stem.conv.weight"], state.state_dict["stem.conv.weight"])


def test_adaption_is_deterministic_per_seed(reference_run):
    state, _ = reference_run
    batch = SOURCE(1, make_rngs(40))
    first = adapt_task(state, batch.support_x[0], batch.support_y[0], rngs=make_rngs(1))
    second = adapt_task(state, batch.support_x[0], batch.support_y[0], rngs=make_rngs(1))
    assert first.genotype == second.genotype
    assert torch.equal(first.predict(batch.query_x[0]), second.predict(batch.query_x[0]))


def test_progress_reports_every_meta_epoch(reference_run):
    state, progress = reference_run
    events = progress.of_kind("metanas")
    assert [(e["current"], e["total"], e["phase"]) for e in events] == [
        (1, 3, "warmup"),
        (2, 3, "search"),
        (3, 3, "search"),
    ]
    assert all(e["stage"] == "meta_train" and 0.0 <= e["query_accuracy"] <= 1.0 for e in events)
    assert state.epochs_done == 3 and len(state.history) == 3


# ------------------------------------------------------------------------------------------ checkpoints
def test_cancelled_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    reference, _ = reference_run

    def cancel_after_two(event):
        if event["current"] == 2:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        reptile_meta_train(
            SMALL, SOURCE, rngs=make_rngs(5), progress=cancel_after_two, checkpoint_dir=tmp_path
        )
    saved = MetaState.load(tmp_path / CHECKPOINT_NAME)
    assert saved.epochs_done == 2 and saved.config == SMALL
    progress = ListProgress()
    resumed = reptile_meta_train(
        SMALL, SOURCE, rngs=make_rngs(5), progress=progress, checkpoint_dir=tmp_path, resume=True
    )
    assert [e["current"] for e in progress.of_kind("metanas")] == [3]
    assert_same_state(resumed.state_dict, reference.state_dict)
    assert [h["query_accuracy"] for h in resumed.history] == [h["query_accuracy"] for h in reference.history]
    assert MetaState.load(tmp_path / CHECKPOINT_NAME).epochs_done == 3
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temp files"


def test_resume_refuses_a_checkpoint_of_another_run(reference_run, tmp_path):
    reference, _ = reference_run
    reference.save(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(MetaNasCheckpointError, match="different config"):
        reptile_meta_train(
            SMALL.replace(arch_lr=0.1), SOURCE, rngs=make_rngs(5), checkpoint_dir=tmp_path, resume=True
        )
    with pytest.raises(MetaNasCheckpointError, match="seed"):
        reptile_meta_train(SMALL, SOURCE, rngs=make_rngs(9), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(MetaNasCheckpointError, match="checkpoint_dir"):
        reptile_meta_train(SMALL, SOURCE, rngs=make_rngs(5), resume=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MetaNasCheckpointError, match="cannot read"):
        MetaState.load(tmp_path / "junk.pt")
    # A finished run resumes to itself without training.
    finished = reptile_meta_train(SMALL, SOURCE, rngs=make_rngs(5), checkpoint_dir=tmp_path, resume=True)
    assert_same_state(finished.state_dict, reference.state_dict)


# ------------------------------------------------------------------------------------------ task source
def test_bad_task_batches_are_rejected_with_the_tensor_named():
    good = SOURCE(SMALL.meta_batch_size, make_rngs(0))

    def source_returning(batch):
        return lambda n, rngs: batch

    cases = [
        (TaskBatch(good.support_x[0], good.support_y, good.query_x, good.query_y), "support_x must be a 5-d"),
        (
            TaskBatch(good.support_x, good.support_y[:, :-1], good.query_x, good.query_y),
            "support_y must have shape",
        ),
        (
            TaskBatch(good.support_x, good.support_y, good.query_x, good.query_y.float()),
            "query_y must hold integer",
        ),
        (TaskBatch(good.support_x, good.support_y + 5, good.query_x, good.query_y), "outside"),
        ((good.support_x, good.support_y), "needs 4 tensors"),
        (object(), "lacks support_x"),
    ]
    for batch, message in cases:
        with pytest.raises(TaskBatchError, match=message):
            reptile_meta_train(SMALL.replace(meta_epochs=1), source_returning(batch), rngs=make_rngs(0))
    # A plain 4-tuple is accepted.
    tuple_source = source_returning((good.support_x, good.support_y, good.query_x, good.query_y))
    state = reptile_meta_train(SMALL.replace(meta_epochs=1), tuple_source, rngs=make_rngs(0))
    assert state.epochs_done == 1


def test_meta_training_draws_tasks_from_the_data_layer_sampler_reproducibly():
    import numpy as np

    from engine.data import FewShotDataset, TaskSampler

    rng = np.random.default_rng(0)
    classes = 5
    images = rng.integers(0, 256, size=(classes * 6, SMALL.image_size, SMALL.image_size, 1), dtype=np.uint8)
    dataset = FewShotDataset(
        images=images,
        labels=np.repeat(np.arange(classes), 6),
        class_names=tuple(f"c{i}" for i in range(classes)),
    )
    config = SMALL.replace(meta_epochs=1, warmup_epochs=0)

    def run(advance_sampler: bool) -> MetaState:
        sampler = TaskSampler(dataset, ways=config.n_way, shots=config.meta_train_shots, queries=2, rngs=1)
        if advance_sampler:
            sampler.sample(3)  # the sampler's own generator must not matter
        return reptile_meta_train(config, sampler_task_source(sampler), rngs=make_rngs(4))

    assert_same_state(run(False).state_dict, run(True).state_dict)
    with pytest.raises(TypeError, match="plan"):
        sampler_task_source(object())
