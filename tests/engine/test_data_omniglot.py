"""Omniglot on small synthetic zips: layouts, splits, rotations, the decoded cache, progress."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.data import (
    DatasetNotFoundError,
    SplitError,
    load_dataset,
    load_omniglot,
    load_omniglot_characters,
)
from engine.data.omniglot import (
    MAMLPP_SPLIT_RATIOS,
    omniglot_split_characters,
    vinyals_characters,
    with_rotated_classes,
)
from engine.progress import ListProgress
from tests.engine._data_builders import write_omniglot_zip

BACKGROUND = {"Alpha": 3, "Beta": 2}
EVALUATION = {"Gamma": 2}
# The workplace's shared data: beside the checkout, or wherever NASWEB_DATA_DIR points (CI runs in
# a clone elsewhere and sets it), so the vendored split is compared wherever the files exist.
SHARED = Path(os.environ.get("NASWEB_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")


@pytest.fixture()
def omniglot_root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_omniglot_zip(
        data / "omniglot" / "images_background.zip", "images_background", BACKGROUND, drawings=4
    )
    write_omniglot_zip(
        data / "omniglot" / "images_evaluation.zip", "images_evaluation", EVALUATION, drawings=4, seed=1
    )
    return data


def write_vinyals(data: Path, splits: dict[str, list[str]]) -> None:
    folder = data / "omniglot" / "splits" / "vinyals"
    folder.mkdir(parents=True, exist_ok=True)
    for split, characters in splits.items():
        lines = [f"{c}/{r}" for c in characters for r in ("rot000", "rot090", "rot180", "rot270")]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_characters_decode_from_zips_and_cache(omniglot_root: Path, tmp_path: Path):
    progress = ListProgress()
    dataset, background = load_omniglot_characters(
        data_dir=omniglot_root, cache_root=tmp_path / "cache", progress=progress, workers=1
    )
    assert dataset.num_classes == 7 and dataset.num_images == 28
    assert dataset.image_shape == (28, 28, 1)
    assert dataset.class_names[:3] == ("Alpha/character01", "Alpha/character02", "Alpha/character03")
    assert background.tolist() == [True] * 5 + [False] * 2
    decode = progress.of_kind("dataset")
    assert decode[0]["stage"] == "decode" and decode[-1]["current"] == decode[-1]["total"] == 28
    # Antialiased resize of black strokes on white gives intermediate grey levels.
    assert len(np.unique(dataset.images)) > 10

    second = ListProgress()
    again, _ = load_omniglot_characters(
        data_dir=omniglot_root, cache_root=tmp_path / "cache", progress=second
    )
    assert [e["stage"] for e in second.events] == ["cached"]
    assert isinstance(again.images, np.memmap)
    assert np.array_equal(np.asarray(again.images), dataset.images)
    entries = list((tmp_path / "cache" / "datasets").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {
        "images.npy",
        "labels.npy",
        "meta.json",
    }


def test_cache_misses_when_the_source_or_size_changes(omniglot_root: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    load_omniglot_characters(data_dir=omniglot_root, cache_root=cache, workers=1)
    progress = ListProgress()
    small, _ = load_omniglot_characters(
        data_dir=omniglot_root, cache_root=cache, image_size=14, progress=progress
    )
    assert small.image_shape == (14, 14, 1) and progress.events[-1]["stage"] == "decode"
    archive = omniglot_root / "omniglot" / "images_evaluation.zip"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    progress = ListProgress()
    load_omniglot_characters(data_dir=omniglot_root, cache_root=cache, progress=progress)
    assert progress.events[-1]["stage"] == "decode"
    assert len(list((cache / "datasets").iterdir())) == 3


def test_a_damaged_cache_entry_is_rebuilt(omniglot_root: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first, _ = load_omniglot_characters(data_dir=omniglot_root, cache_root=cache, workers=1)
    expected = np.array(first.images)  # copy: the memory map's file is damaged in place below
    del first
    entry = next((cache / "datasets").iterdir())
    (entry / "images.npy").write_bytes(b"garbage")
    progress = ListProgress()
    rebuilt, _ = load_omniglot_characters(data_dir=omniglot_root, cache_root=cache, progress=progress)
    assert progress.events[-1]["stage"] == "decode"
    assert np.array_equal(np.asarray(rebuilt.images), expected)


def test_extracted_folders_give_the_same_images_as_zips(omniglot_root: Path, tmp_path: Path):
    from_zips, _ = load_omniglot_characters(data_dir=omniglot_root, cache_root=tmp_path / "c1", workers=1)
    extracted = tmp_path / "extracted"
    for set_name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(omniglot_root / "omniglot" / f"{set_name}.zip") as archive:
            archive.extractall(extracted / "omniglot")
    from_folders, _ = load_omniglot_characters(data_dir=extracted, cache_root=tmp_path / "c2", workers=2)
    assert from_folders.class_names == from_zips.class_names
    assert np.array_equal(np.asarray(from_folders.images), np.asarray(from_zips.images))


def test_missing_omniglot_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="images_background.zip.*download=True"):
        load_omniglot_characters(data_dir=tmp_path, cache_root=tmp_path / "cache")


def test_vinyals_split_rotations_as_classes(omniglot_root: Path, tmp_path: Path):
    write_vinyals(
        omniglot_root,
        {
            "train": ["Alpha/character01", "Beta/character02", "Gamma/character01"],
            "val": ["Alpha/character03"],
        },
    )
    train = load_omniglot("train", data_dir=omniglot_root, cache_root=tmp_path / "cache", workers=1)
    assert train.num_classes == 12 and train.num_images == 48
    assert train.class_names[:2] == ("Alpha/character01/rot000", "Alpha/character01/rot090")
    base, _ = load_omniglot_characters(data_dir=omniglot_root, cache_root=tmp_path / "cache")
    original = 255 - np.asarray(base.images[base.image_indices_of(0)])  # inverted by default
    for quarter_turns in range(4):
        rotated = train.images[train.image_indices_of(quarter_turns)]
        assert np.array_equal(rotated, np.rot90(original, k=quarter_turns, axes=(1, 2)))
    flat = load_omniglot(
        "train", data_dir=omniglot_root, cache_root=tmp_path / "cache", rotations_as_classes=False
    )
    assert flat.num_classes == 3
    plain = load_omniglot("val", data_dir=omniglot_root, cache_root=tmp_path / "cache", invert=False)
    assert np.array_equal(plain.images[:4], np.asarray(base.images[base.image_indices_of(2)]))


def test_lake_and_mamlpp_protocols(omniglot_root: Path, tmp_path: Path):
    kwargs = {"data_dir": omniglot_root, "cache_root": tmp_path / "cache", "workers": 1}
    lake_train = load_dataset("omniglot", "train", protocol="lake", **kwargs)
    lake_test = load_dataset("omniglot", "test", protocol="lake", **kwargs)
    assert lake_train.num_classes == 5 and lake_test.num_classes == 2
    assert all(name.startswith("Gamma/") for name in lake_test.class_names)
    with pytest.raises(SplitError, match="train \\(background\\)"):
        load_omniglot("val", protocol="lake", **kwargs)
    with pytest.raises(SplitError, match="protocol"):
        load_omniglot("train", protocol="snell", **kwargs)
    splits = {s: load_omniglot(s, protocol="mamlpp", **kwargs).class_names for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 7
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])


def test_published_split_sizes():
    names = [f"A{i // 20}/character{i % 20:02d}" for i in range(1623)]
    background = np.arange(1623) < 964
    sizes = {
        split: len(omniglot_split_characters(names, background, "mamlpp", split))
        for split in ("train", "val", "test")
    }
    # MAML++ truncates int(ratio * 1623): 1150 / 50 / 423 (H-Meta-NAS: 1200 train+val, 423 test).
    assert sizes == {"train": 1150, "val": 50, "test": 423}
    assert int(MAMLPP_SPLIT_RATIOS[0] * 1623) == 1150
    trainval = omniglot_split_characters(names, background, "mamlpp", "trainval")
    assert len(trainval) == 1200
    test = omniglot_split_characters(names, background, "mamlpp", "test")
    assert set(trainval).isdisjoint(test) and len(set(trainval) | set(test)) == 1623
    assert omniglot_split_characters(names, background, "mamlpp", "test", split_seed=1) != test
    assert len(omniglot_split_characters(names, background, "lake", "train")) == 964
    assert len(omniglot_split_characters(names, background, "lake", "test")) == 659
    # Vinyals (vendored copy): 1028 / 172 / 423 characters, disjoint, 1623 in all.
    vinyals = {
        s: vinyals_characters(s, data_dir="/nonexistent") for s in ("train", "val", "test", "trainval")
    }
    assert {s: len(v) for s, v in vinyals.items()} == {
        "train": 1028,
        "val": 172,
        "test": 423,
        "trainval": 1200,
    }
    assert len(set(vinyals["train"]) | set(vinyals["val"]) | set(vinyals["test"])) == 1623
    assert vinyals["trainval"] == vinyals["train"] + vinyals["val"]


@pytest.mark.skipif(
    not (SHARED / "omniglot" / "splits" / "vinyals").is_dir(), reason="shared Vinyals split absent"
)
def test_vendored_vinyals_copy_equals_the_shared_files():
    vendored = json.loads(
        (Path(__file__).resolve().parents[2] / "engine/data/splits/omniglot_vinyals.json").read_text()
    )
    for split in ("train", "val", "test"):
        lines = (SHARED / "omniglot/splits/vinyals" / f"{split}.txt").read_text().split()
        expected = [f"{c}/{r}" for c in vendored[split] for r in vendored["rotations"]]
        assert lines == expected
        assert vinyals_characters(split, data_dir=SHARED) == vendored[split]


def test_bad_vinyals_file_is_reported(omniglot_root: Path, tmp_path: Path):
    folder = omniglot_root / "omniglot" / "splits" / "vinyals"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("Alpha/character01/rot000\nAlpha/character02\n")
    with pytest.raises(SplitError, match="train.txt:2"):
        load_omniglot("train", data_dir=omniglot_root, cache_root=tmp_path / "cache", workers=1)
    (folder / "train.txt").write_text("Zeta/character01/rot000\n")
    with pytest.raises(SplitError, match="Zeta/character01"):
        load_omniglot("train", data_dir=omniglot_root, cache_root=tmp_path / "cache", workers=1)


def test_rotated_classes_helper_orders_class_major(omniglot_root: Path, tmp_path: Path):
    base, _ = load_omniglot_characters(data_dir=omniglot_root, cache_root=tmp_path / "cache", workers=1)
    rotated = with_rotated_classes(base, [4, 0], rotations=(0, 2), name="r")
    assert rotated.class_names == (
        "Beta/character02/rot000",
        "Beta/character02/rot180",
        "Alpha/character01/rot000",
        "Alpha/character01/rot180",
    )
