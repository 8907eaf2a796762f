"""``load_dataset(name, split)``: one entry point for the built-in datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.data.cifar import CIFAR_SPLITS, find_cifar100, load_cifar_fewshot, read_split_entries
from engine.data.dataset import FewShotDataset
from engine.data.errors import DatasetError, DatasetNotFoundError, NotEnoughClassesError
from engine.data.miniimagenet import MINI_IMAGENET_SPLITS, load_mini_imagenet, read_ravi_split
from engine.data.omniglot import load_omniglot
from engine.paths import data_dir as default_data_dir
from engine.progress import ProgressCallback, null_progress

DATASET_NAMES = ("omniglot", "mini-imagenet", "cifar-fs", "fc100")


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    progress: ProgressCallback = null_progress,
    **options: Any,
) -> FewShotDataset:
    """Load ``split`` of dataset ``name`` (one of ``DATASET_NAMES``) from ``data_dir``
    (default ``engine.paths.data_dir()``).

    ``options`` go to the dataset's loader: for Omniglot ``protocol`` ("vinyals",
    "lake", "mamlpp"), ``rotations_as_classes``, ``invert``, ``split_seed``,
    ``download``, ``cache_root``, ``workers``; for Mini-ImageNet ``cache_root``,
    ``workers``. ``image_size`` defaults to 28 (Omniglot), 84 (Mini-ImageNet) and
    32 (CIFAR-FS, FC100).
    """
    if name == "omniglot":
        return load_omniglot(split, data_dir=data_dir, image_size=image_size, progress=progress, **options)
    if name == "mini-imagenet":
        return load_mini_imagenet(
            split, data_dir=data_dir, image_size=image_size, progress=progress, **options
        )
    if name in ("cifar-fs", "fc100"):
        if options:
            raise TypeError(f"{name} takes no options besides data_dir and image_size, got {sorted(options)}")
        dataset = load_cifar_fewshot(name, split, data_dir=data_dir, image_size=image_size)
        count = dataset.num_images
        progress({"kind": "dataset", "stage": "loaded", "current": count, "total": count, "dataset": name})
        return dataset
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


#: Fine classes per CIFAR-100 superclass (FC100's splits list superclasses).
CIFAR100_CLASSES_PER_SUPERCLASS = 5


def split_class_counts(name: str, *, data_dir: str | os.PathLike | None = None) -> dict[str, int] | None:
    """Classes in each split of dataset ``name``, from its split files alone (no image is read),
    so that a run can refuse, before it starts, tasks with more ways than a split has classes.

    Raises DatasetNotFoundError when a split file or the image source is missing. ``None`` for
    Omniglot, whose splits hold hundreds of characters (and which may still be downloaded).
    """
    base = Path(data_dir if data_dir is not None else default_data_dir())
    if name == "omniglot":
        return None
    if name == "mini-imagenet":
        root = base / "mini-imagenet"
        counts = {
            split: len(set(read_ravi_split(root / "splits" / "ravi" / f"{split}.csv")[1]))
            for split in MINI_IMAGENET_SPLITS
        }
        if not (root / "images").is_dir():
            raise DatasetNotFoundError(
                f"Mini-ImageNet images not found: expected the folder {root / 'images'} (see docs/DATASETS.md)"
            )
        return counts
    if name in ("cifar-fs", "fc100"):
        per_entry = 1 if name == "cifar-fs" else CIFAR100_CLASSES_PER_SUPERCLASS
        counts = {
            split: per_entry * len(read_split_entries(base / name / "splits" / f"{split}.json"))
            for split in CIFAR_SPLITS
        }
        find_cifar100(name, base)
        return counts
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def check_split_classes(name: str, ways: int, *, data_dir: str | os.PathLike | None = None) -> None:
    """Raise NotEnoughClassesError when a split of ``name`` has fewer classes than ``ways``-way
    tasks need (and DatasetNotFoundError when its files are missing): what a run checks before
    it starts, since it would otherwise fail only on reaching that split (evaluation, adaption)."""
    for split, classes in (split_class_counts(name, data_dir=data_dir) or {}).items():
        if classes < ways:
            raise NotEnoughClassesError(
                f"{name}'s {split} split has {classes} classes; {ways}-way tasks need {ways}"
            )
