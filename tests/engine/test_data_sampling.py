"""FewShotDataset and episodic TaskSampler: shapes, determinism, disjointness, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import (
    DatasetError,
    EmptyClassError,
    FewShotDataset,
    Normalization,
    NotEnoughClassesError,
    NotEnoughImagesError,
    TaskSampler,
)
from engine.seeding import make_rngs


def make_dataset(classes: int = 12, per_class: int = 20, size: int = 8, channels: int = 1) -> FewShotDataset:
    """Every image is filled with a unique id (image index % 251) so tests can trace pixels back."""
    labels = np.repeat(np.arange(classes), per_class)
    rng = np.random.default_rng(0)
    order = rng.permutation(labels.size)  # images of a class are not contiguous
    labels = labels[order]
    images = rng.integers(0, 256, size=(labels.size, size, size, channels), dtype=np.uint8)
    return FewShotDataset(
        images=images, labels=labels, class_names=tuple(f"c{i}" for i in range(classes)), name="toy"
    )


def test_dataset_groups_images_by_class():
    dataset = make_dataset(classes=5, per_class=7)
    assert dataset.num_classes == 5 and dataset.num_images == 35
    for c in range(5):
        indices = dataset.image_indices_of(c)
        assert indices.size == 7 and np.all(dataset.labels[indices] == c)
    subset = dataset.select_classes([3, 1])
    assert subset.class_names == ("c3", "c1")
    assert np.array_equal(subset.images[:7], dataset.images[dataset.image_indices_of(3)])


def test_dataset_rejects_bad_arrays():
    with pytest.raises(DatasetError, match="uint8"):
        FewShotDataset(images=np.zeros((2, 4, 4, 1), np.float32), labels=np.zeros(2), class_names=("a",))
    with pytest.raises(DatasetError, match="labels"):
        FewShotDataset(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.zeros(3), class_names=("a",))
    with pytest.raises(EmptyClassError, match="'b'"):
        FewShotDataset(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.zeros(2), class_names=("a", "b"))


@pytest.mark.parametrize(("ways", "shots", "queries"), [(5, 1, 15), (5, 5, 5), (12, 2, 3)])
def test_batch_shapes_and_labels(ways, shots, queries):
    dataset = make_dataset()
    batch = TaskSampler(dataset, ways, shots, queries, make_rngs(1)).sample(4)
    assert batch.support_x.shape == (4, ways * shots, 1, 8, 8) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (4, ways * queries, 1, 8, 8)
    assert batch.support_y.shape == (4, ways * shots) and batch.support_y.dtype == torch.int64
    expected = torch.arange(ways).repeat_interleave(shots)
    assert torch.equal(batch.support_y[2], expected)
    assert torch.equal(batch.query_y[0], torch.arange(ways).repeat_interleave(queries))
    # Every label's images really belong to the class the plan says.
    support_classes = dataset.labels[batch.support_image_ids]
    assert np.array_equal(
        support_classes, np.take_along_axis(batch.class_ids, batch.support_y.numpy(), axis=1)
    )
    query_classes = dataset.labels[batch.query_image_ids]
    assert np.array_equal(query_classes, np.take_along_axis(batch.class_ids, batch.query_y.numpy(), axis=1))


def test_pixels_match_the_dataset_and_are_normalised():
    dataset = make_dataset(channels=3)
    normalization = Normalization(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    batch = TaskSampler(dataset, 3, 2, 1, 0, normalization=normalization).sample(2)
    raw = dataset.images[batch.support_image_ids[1, 4]].astype(np.float32) / 255.0  # H, W, C
    expected = (raw - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.25, 2.0])
    assert np.allclose(batch.support_x[1, 4].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    default = TaskSampler(dataset, 3, 2, 1, 0).sample(1)
    assert float(default.support_x.min()) >= 0.0 and float(default.support_x.max()) <= 1.0


def test_support_and_query_never_share_an_image_and_classes_are_distinct():
    dataset = make_dataset(classes=6, per_class=6)
    batch = TaskSampler(dataset, 6, 2, 4, 3).sample(200)  # every class, every image used per task
    for t in range(200):
        support, query = set(batch.support_image_ids[t]), set(batch.query_image_ids[t])
        assert not support & query
        assert len(support) == 12 and len(query) == 24
        assert len(set(batch.class_ids[t])) == 6


def test_tasks_are_deterministic_per_seed_and_differ_across_seeds():
    dataset = make_dataset()
    first = TaskSampler(dataset, 5, 1, 2, make_rngs(7)).sample(3)
    again = TaskSampler(dataset, 5, 1, 2, 7).sample(3)
    other = TaskSampler(dataset, 5, 1, 2, 8).sample(3)
    assert torch.equal(first.support_x, again.support_x) and torch.equal(first.query_x, again.query_x)
    assert np.array_equal(first.class_ids, again.class_ids)
    assert not np.array_equal(first.support_image_ids, other.support_image_ids)
    sampler = TaskSampler(dataset, 5, 1, 2, 7)
    assert not np.array_equal(sampler.sample(3).support_image_ids, sampler.sample(3).support_image_ids)


def test_labels_are_permuted_per_task():
    dataset = make_dataset(classes=12)
    batch = TaskSampler(dataset, 5, 1, 1, 0).sample(300)
    # Class c shows up under several different labels across tasks, and orders vary.
    labels_of_class0 = {int(np.flatnonzero(row == 0)[0]) for row in batch.class_ids if 0 in row}
    assert len(labels_of_class0) == 5
    assert not np.all(np.diff(batch.class_ids, axis=1) > 0)


def test_sampling_is_roughly_uniform_over_classes_and_images():
    dataset = make_dataset(classes=10, per_class=20)
    batch = TaskSampler(dataset, 5, 2, 2, 0).sample(2000)
    class_counts = np.bincount(batch.class_ids.ravel(), minlength=10)
    assert class_counts.min() > 0.9 * 1000 and class_counts.max() < 1.1 * 1000
    image_counts = np.bincount(
        np.concatenate([batch.support_image_ids.ravel(), batch.query_image_ids.ravel()])
    )
    assert image_counts.min() > 0.7 * 200 and image_counts.max() < 1.3 * 200


def test_fixed_tasks_are_reproducible_and_independent_of_training_draws():
    dataset = make_dataset()
    sampler = TaskSampler(dataset, 5, 1, 3, 0)
    fixed = sampler.fixed_tasks(600, seed=11)
    sampler.sample(5)
    fixed_again = TaskSampler(dataset, 5, 1, 3, 99).fixed_tasks(600, seed=11)
    assert len(fixed) == 600
    assert np.array_equal(fixed.plan.image_ids, fixed_again.plan.image_ids)
    batches = list(fixed.batches(256))
    assert [b.num_tasks for b in batches] == [256, 256, 88]
    assert torch.equal(batches[1].support_x, fixed_again.batch(256, 512).support_x)
    assert not np.array_equal(fixed.plan.image_ids, sampler.fixed_tasks(600, seed=12).plan.image_ids)
    # Drawing the fixed set did not advance the training stream.
    fresh = TaskSampler(dataset, 5, 1, 3, 0)
    fresh.fixed_tasks(10, seed=1)
    assert np.array_equal(fresh.sample(2).class_ids, TaskSampler(dataset, 5, 1, 3, 0).sample(2).class_ids)


def test_rotation_augmentation_rotates_whole_classes():
    dataset = make_dataset(classes=8, per_class=10)
    batch = TaskSampler(dataset, 4, 2, 3, 5, augment_rotations=True).sample(50)
    assert set(np.unique(batch.rotations)) == {0, 1, 2, 3}
    for t in (0, 17, 49):
        for label in range(4):
            turns = int(batch.rotations[t, label])
            for position in range(label * 2, label * 2 + 2):
                original = dataset.images[batch.support_image_ids[t, position]][..., 0] / 255.0
                shown = batch.support_x[t, position, 0].numpy()
                assert np.allclose(shown, np.rot90(original, k=turns), atol=1e-6)
            for position in range(label * 3, label * 3 + 3):
                original = dataset.images[batch.query_image_ids[t, position]][..., 0] / 255.0
                assert np.allclose(
                    batch.query_x[t, position, 0].numpy(), np.rot90(original, k=turns), atol=1e-6
                )
    plain = TaskSampler(dataset, 4, 2, 3, 5).sample(5)
    assert not plain.rotations.any()


def test_not_enough_classes_or_images_name_the_problem():
    dataset = make_dataset(classes=4, per_class=5)
    with pytest.raises(NotEnoughClassesError, match="5-way.*has 4"):
        TaskSampler(dataset, 5, 1, 1)
    with pytest.raises(NotEnoughImagesError, match="'c0' \\(5\\)"):
        TaskSampler(dataset, 2, 3, 3)
    uneven = FewShotDataset(
        images=np.zeros((7, 4, 4, 1), np.uint8),
        labels=np.array([0, 0, 0, 0, 1, 1, 2]),
        class_names=("a", "b", "z"),
    )
    with pytest.raises(NotEnoughImagesError, match="'b' \\(2\\), 'z' \\(1\\)"):
        TaskSampler(uneven, 2, 2, 1)
    with pytest.raises(ValueError, match="shots"):
        TaskSampler(dataset, 2, 0, 1)
    with pytest.raises(DatasetError, match="square"):
        TaskSampler(
            FewShotDataset(
                images=np.zeros((4, 4, 6, 1), np.uint8), labels=np.array([0, 0, 1, 1]), class_names=("a", "b")
            ),
            2,
            1,
            1,
            augment_rotations=True,
        )


def test_uneven_classes_sample_only_real_images():
    labels = np.array([0] * 3 + [1] * 9 + [2] * 4)
    images = np.arange(labels.size, dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    dataset = FewShotDataset(images=images, labels=labels, class_names=("a", "b", "c"))
    batch = TaskSampler(dataset, 3, 1, 2, 0).sample(100)
    ids = np.concatenate([batch.support_image_ids, batch.query_image_ids], axis=1)
    assert ids.min() >= 0 and ids.max() < labels.size
    assert np.array_equal(
        dataset.labels[batch.support_image_ids],
        np.take_along_axis(batch.class_ids, batch.support_y.numpy(), 1),
    )
