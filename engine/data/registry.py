"""``load_dataset(name, split)``: one entry point for the built-in datasets."""

from __future__ import annotations

import os
from typing import Any

from engine.data.cifar import load_cifar_fewshot
from engine.data.dataset import FewShotDataset
from engine.data.errors import DatasetError
from engine.data.miniimagenet import load_mini_imagenet
from engine.data.omniglot import load_omniglot
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
