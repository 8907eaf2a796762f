"""Mini-ImageNet, CIFAR-FS and FC100 loaders on small synthetic data in the real on-disk formats."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.data import (
    CIFAR100_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    DatasetError,
    DatasetNotFoundError,
    SplitError,
    TaskSampler,
    load_dataset,
)
from engine.data.cifar import load_cifar_pickle
from engine.progress import ListProgress
from tests.engine._data_builders import write_cifar100, write_mini_imagenet

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize("per_class_folders", [False, True])
def test_mini_imagenet_splits(tmp_path: Path, per_class_folders: bool):
    data = tmp_path / "data"
    write_mini_imagenet(
        data, {"train": 4, "val": 2, "test": 3}, per_class=5, per_class_folders=per_class_folders
    )
    progress = ListProgress()
    train = load_dataset(
        "mini-imagenet", "train", data_dir=data, cache_root=tmp_path / "cache", progress=progress, workers=1
    )
    assert train.num_classes == 4 and train.num_images == 20 and train.image_shape == (84, 84, 3)
    assert train.normalization == IMAGENET_NORMALIZATION
    assert progress.events[-1]["stage"] == "decode"
    splits = {
        s: load_dataset("mini-imagenet", s, data_dir=data, cache_root=tmp_path / "cache")
        for s in ("val", "test")
    }
    names = [set(train.class_names), set(splits["val"].class_names), set(splits["test"].class_names)]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    again = ListProgress()
    load_dataset("mini-imagenet", "train", data_dir=data, cache_root=tmp_path / "cache", progress=again)
    assert [e["stage"] for e in again.events] == ["cached"]
    batch = TaskSampler(splits["test"], 3, 1, 2, 0).sample(2)
    assert batch.support_x.shape == (2, 3, 3, 84, 84)
    small = load_dataset("mini-imagenet", "val", data_dir=data, image_size=32, cache_root=tmp_path / "cache")
    assert small.image_shape == (32, 32, 3)


def test_mini_imagenet_missing_images_and_bad_csv(tmp_path: Path):
    data = tmp_path / "data"
    write_mini_imagenet(data, {"train": 2}, per_class=3, per_class_folders=False)
    victim = next((data / "mini-imagenet" / "images").iterdir())
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=f"1 of 6 images missing.*{victim.name}"):
        load_dataset("mini-imagenet", "train", data_dir=data, cache_root=tmp_path / "cache")
    shutil.rmtree(data / "mini-imagenet" / "images")
    with pytest.raises(DatasetNotFoundError, match="images"):
        load_dataset("mini-imagenet", "train", data_dir=data, cache_root=tmp_path / "cache")
    (data / "mini-imagenet" / "splits" / "ravi" / "val.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(SplitError, match="filename,label"):
        load_dataset("mini-imagenet", "val", data_dir=data)
    (data / "mini-imagenet" / "splits" / "ravi" / "val.csv").write_text(
        "filename,label\n../../etc/passwd,n1\n"
    )
    with pytest.raises(SplitError, match="plain file name"):
        load_dataset("mini-imagenet", "val", data_dir=data)
    with pytest.raises(DatasetNotFoundError, match="test.csv"):
        load_dataset("mini-imagenet", "test", data_dir=data)
    with pytest.raises(SplitError, match="trainval"):
        load_dataset("mini-imagenet", "trainval", data_dir=data)


@pytest.fixture()
def cifar_data(tmp_path: Path) -> Path:
    """CIFAR-100 pickles in <data>/cifar-100-python plus the split JSONs (the shared ones when present)."""
    data = tmp_path / "data"
    write_cifar100(data / "cifar-100-python", per_class=(3, 1))
    for name in ("cifar-fs", "fc100"):
        shared = SHARED / name / "splits"
        target = data / name / "splits"
        if shared.is_dir():
            shutil.copytree(shared, target)
        else:
            pytest.skip(f"shared split files {shared} absent")
    return data


def test_cifar_fs_published_split_sizes(cifar_data: Path):
    splits = {s: load_dataset("cifar-fs", s, data_dir=cifar_data) for s in ("train", "val", "test")}
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 64, "val": 16, "test": 20}
    names = [set(d.class_names) for d in splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert len(names[0] | names[1] | names[2]) == 100
    train = splits["train"]
    assert train.num_images == 64 * 4 and train.image_shape == (32, 32, 3)  # train+test merged
    assert train.normalization == CIFAR100_NORMALIZATION
    # The red pixel (0, 0) encodes the fine label: check the regrouping kept images with their class.
    from tests.engine._data_builders import cifar100_names

    fine_names = cifar100_names()[0]
    for image, label in zip(np.asarray(train.images), train.labels, strict=True):
        assert fine_names[image[0, 0, 0]] == train.class_names[label]
    batch = TaskSampler(splits["test"], 5, 1, 3, 0).sample(2)
    assert batch.support_x.shape == (2, 5, 3, 32, 32)


def test_fc100_published_split_sizes(cifar_data: Path):
    splits = {s: load_dataset("fc100", s, data_dir=cifar_data) for s in ("train", "val", "test")}
    assert {s: d.num_classes for s, d in splits.items()} == {"train": 60, "val": 20, "test": 20}
    names = [set(d.class_names) for d in splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    from tests.engine._data_builders import cifar100_names

    fine_names, coarse_names, fine_to_coarse = cifar100_names()
    train_superclasses = set(json.loads((cifar_data / "fc100" / "splits" / "train.json").read_text()))
    for name in splits["train"].class_names:
        assert coarse_names[fine_to_coarse[fine_names.index(name)]] in train_superclasses
    resized = load_dataset("fc100", "val", data_dir=cifar_data, image_size=16)
    assert resized.image_shape == (16, 16, 3)


def test_cifar_bad_inputs(cifar_data: Path, tmp_path: Path):
    (cifar_data / "cifar-fs" / "splits" / "val.json").write_text('[["fish", "unicorn"]]')
    with pytest.raises(SplitError, match="unicorn"):
        load_dataset("cifar-fs", "val", data_dir=cifar_data)
    (cifar_data / "cifar-fs" / "splits" / "val.json").write_text('[["fish", "dolphin"]]')
    with pytest.raises(SplitError, match="'dolphin' is not in superclass 'fish'"):
        load_dataset("cifar-fs", "val", data_dir=cifar_data)
    (cifar_data / "fc100" / "splits" / "val.json").write_text('["dragons"]')
    with pytest.raises(SplitError, match="dragons"):
        load_dataset("fc100", "val", data_dir=cifar_data)
    with pytest.raises(DatasetNotFoundError, match="split file .*fc100/splits/train.json"):
        load_dataset("fc100", "train", data_dir=tmp_path / "empty")
    shutil.copytree(cifar_data / "fc100", tmp_path / "no-images" / "fc100")
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python/\\{train,test,meta\\}"):
        load_dataset("fc100", "train", data_dir=tmp_path / "no-images")
    # A pickle that would run code on load is refused, not executed.
    evil = tmp_path / "evil"

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil.write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_cifar_pickle(evil)
    (cifar_data / "cifar-100-python" / "test").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8)})
    )
    with pytest.raises(DatasetError, match="fine_labels"):
        load_dataset("cifar-fs", "train", data_dir=cifar_data)
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train", data_dir=cifar_data)
