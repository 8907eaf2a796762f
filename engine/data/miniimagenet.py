"""Mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

Expected files under ``<data_dir>/mini-imagenet/``:

- ``splits/ravi/{train,val,test}.csv``: header ``filename,label``, one row per image
  (shipped in the shared data folder);
- ``images/<filename>`` (the flat folder of the original release), or
  ``images/<label>/<filename>`` (one folder per synset). The images themselves are
  not redistributable (ImageNet terms); the user supplies them.

Images are decoded to RGB, resized to ``image_size`` (default 84) with LANCZOS when
they are not already that size, and cached per split.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from engine.data.cache import load_or_build
from engine.data.dataset import IMAGENET_NORMALIZATION, FewShotDataset
from engine.data.errors import DatasetError, DatasetNotFoundError, SplitError
from engine.data.imaging import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, decode_images
from engine.paths import data_dir as default_data_dir
from engine.progress import ProgressCallback, null_progress

MINI_IMAGENET_SPLITS = ("train", "val", "test")


def read_ravi_split(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(filenames, labels)`` of a Ravi & Larochelle csv file, validated."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Mini-ImageNet split file {path} not found")
    filenames: list[str] = []
    labels: list[str] = []
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header != ["filename", "label"]:
            raise SplitError(f"{path}: expected the header 'filename,label', got {header!r}")
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0] or not row[1]:
                raise SplitError(f"{path}:{number}: expected 'filename,label', got {row!r}")
            if "/" in row[0] or "\\" in row[0] or row[0].startswith("."):
                raise SplitError(f"{path}:{number}: file name {row[0]!r} must be a plain file name")
            filenames.append(row[0])
            labels.append(row[1])
    if not filenames:
        raise SplitError(f"{path}: no rows")
    return filenames, labels


def load_mini_imagenet(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    progress: ProgressCallback = null_progress,
    cache_root: str | os.PathLike | None = None,
    workers: int | None = None,
) -> FewShotDataset:
    """One Ravi split of Mini-ImageNet as uint8 ``[n, S, S, 3]`` (S = ``image_size``, default 84)."""
    if split not in MINI_IMAGENET_SPLITS:
        raise SplitError(f"Mini-ImageNet has splits {', '.join(MINI_IMAGENET_SPLITS)}; got {split!r}")
    size = 84 if image_size is None else image_size
    if not isinstance(size, int) or not 4 <= size <= 512:
        raise ValueError(f"Mini-ImageNet image_size must be an integer in [4, 512], got {image_size!r}")
    root = Path(data_dir if data_dir is not None else default_data_dir()) / "mini-imagenet"
    split_file = root / "splits" / "ravi" / f"{split}.csv"
    filenames, label_names = read_ravi_split(split_file)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DatasetNotFoundError(
            f"Mini-ImageNet images not found: expected the folder {images_dir} holding the files listed in "
            f"{split_file} (see docs/DATASETS.md)"
        )
    paths = []
    missing = []
    for filename, label in zip(filenames, label_names, strict=True):
        flat, per_class = images_dir / filename, images_dir / label / filename
        if flat.is_file():
            paths.append(flat)
        elif per_class.is_file():
            paths.append(per_class)
        else:
            missing.append(filename)
    if missing:
        raise DatasetNotFoundError(
            f"Mini-ImageNet/{split}: {len(missing)} of {len(filenames)} images missing from {images_dir}, "
            f"e.g. {missing[0]!r} (looked for images/<filename> and images/<label>/<filename>)"
        )
    class_names = tuple(dict.fromkeys(label_names))
    class_index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([class_index[name] for name in label_names], dtype=np.int64)

    def build() -> tuple[np.ndarray, np.ndarray, dict]:
        images = decode_images(
            [ImageSource(str(p)) for p in paths],
            size=(size, size),
            channels=3,
            max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
            workers=workers,
            progress=progress,
            progress_info={"dataset": "mini-imagenet", "split": split},
        )
        return images, labels, {"class_names": list(class_names)}

    params = {"image_size": size, "channels": 3, "resample": "lanczos", "split": split, "layout": "ravi-v1"}
    entry = load_or_build("mini-imagenet", [split_file, *paths], params, build, root=cache_root)
    if entry.hit:
        count = int(entry.images.shape[0])
        progress(
            {
                "kind": "dataset",
                "stage": "cached",
                "current": count,
                "total": count,
                "dataset": "mini-imagenet",
            }
        )
    if list(entry.meta["class_names"]) != list(class_names):
        raise DatasetError(f"the decoded cache {entry.path} does not match {split_file}; delete it")
    return FewShotDataset(
        images=entry.images,
        labels=entry.labels,
        class_names=class_names,
        name=f"mini-imagenet/{split}",
        normalization=IMAGENET_NORMALIZATION,
    )
