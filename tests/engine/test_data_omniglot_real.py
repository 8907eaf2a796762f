"""The real Omniglot from the shared data folder: complete, published split sizes, cached reload.

The decoded cache is built once per module in a temporary folder (tens of seconds on 2 shared cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import TaskSampler, load_dataset, load_omniglot_characters
from engine.paths import data_dir
from engine.progress import ListProgress

OMNIGLOT = data_dir() / "omniglot"
pytestmark = pytest.mark.skipif(
    not ((OMNIGLOT / "images_background.zip").is_file() or (OMNIGLOT / "images_background").is_dir()),
    reason=f"the real Omniglot is not in {OMNIGLOT} (set NASWEB_DATA_DIR to a folder holding omniglot/)",
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot-cache")
    progress = ListProgress()
    load_omniglot_characters(cache_root=root, progress=progress)
    events = progress.of_kind("dataset")
    assert events[0]["stage"] == "decode" and events[-1]["current"] == events[-1]["total"] == 32460
    return root


def test_all_characters_and_drawings_load(cache_root: Path):
    started = time.perf_counter()
    progress = ListProgress()
    characters, background = load_omniglot_characters(cache_root=cache_root, progress=progress)
    cached_seconds = time.perf_counter() - started
    assert [e["stage"] for e in progress.events] == ["cached"]
    assert cached_seconds < 2.0, f"cached load took {cached_seconds:.2f} s"
    assert characters.num_classes == 1623 and characters.num_images == 32460
    assert np.all(characters.class_counts == 20)
    assert int(background.sum()) == 964
    assert characters.image_shape == (28, 28, 1)
    alphabets = {name.split("/")[0] for name in characters.class_names}
    assert len(alphabets) == 50
    images = np.asarray(characters.images)
    # White background, dark strokes, antialiased grey levels in between.
    assert images.mean() > 200 and len(np.unique(images)) > 100


def test_published_split_sizes_and_disjointness(cache_root: Path):
    started = time.perf_counter()
    vinyals = {s: load_dataset("omniglot", s, cache_root=cache_root) for s in ("train", "val", "test")}
    assert time.perf_counter() - started < 10.0
    assert {s: d.num_classes for s, d in vinyals.items()} == {"train": 4112, "val": 688, "test": 1692}
    characters = {s: {n.rsplit("/", 1)[0] for n in d.class_names} for s, d in vinyals.items()}
    assert {s: len(c) for s, c in characters.items()} == {"train": 1028, "val": 172, "test": 423}
    assert not characters["train"] & characters["val"] and not characters["train"] & characters["test"]
    assert not characters["val"] & characters["test"]
    assert len(characters["train"] | characters["val"] | characters["test"]) == 1623
    assert vinyals["train"].num_images == 4112 * 20

    lake = {s: load_dataset("omniglot", s, protocol="lake", cache_root=cache_root) for s in ("train", "test")}
    assert {s: d.num_classes for s, d in lake.items()} == {"train": 964, "test": 659}
    mamlpp = {
        s: load_dataset("omniglot", s, protocol="mamlpp", cache_root=cache_root)
        for s in ("train", "val", "test")
    }
    assert {s: d.num_classes for s, d in mamlpp.items()} == {"train": 1150, "val": 50, "test": 423}
    names = [set(d.class_names) for d in mamlpp.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]


def test_tasks_from_the_real_test_split(cache_root: Path):
    test = load_dataset("omniglot", "test", cache_root=cache_root)
    evaluation = TaskSampler(test, 20, 1, 5, 0).fixed_tasks(600, seed=0)
    batch = evaluation.batch(0, 8)
    assert batch.support_x.shape == (8, 20, 1, 28, 28) and batch.query_x.shape == (8, 100, 1, 28, 28)
    # Inverted: background 0, strokes towards 1.
    assert float(batch.support_x.mean()) < 0.25 and float(batch.support_x.max()) == 1.0
    again = TaskSampler(test, 20, 1, 5, 123).fixed_tasks(600, seed=0).batch(0, 8)
    assert torch.equal(batch.query_x, again.query_x)
