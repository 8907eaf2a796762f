"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018) from CIFAR-100.

Both regroup the 60,000 CIFAR-100 images (train and test merged, 600 per fine
class) by a class split:

- CIFAR-FS: ``splits/{train,val,test}.json`` are lists of ``[coarse, fine]`` name
  pairs (64/16/20 fine classes);
- FC100: ``splits/{train,val,test}.json`` are lists of coarse (superclass) names
  (12/4/4 superclasses = 60/20/20 fine classes); tasks are over fine classes.

Expected files, for ``name`` in ``cifar-fs``/``fc100``: the split JSONs in
``<data_dir>/<name>/splits/`` and the CIFAR-100 python release
(``cifar-100-python/{train,test,meta}``, from ``cifar-100-python.tar.gz``)
extracted into ``<data_dir>/<name>/`` or, shared by both, into ``<data_dir>/``.

The pickles are read with a restricted unpickler that only accepts the builtin
containers and numpy arrays, so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.dataset import CIFAR100_NORMALIZATION, FewShotDataset
from engine.data.errors import DatasetError, DatasetNotFoundError, SplitError
from engine.paths import data_dir as default_data_dir

CIFAR_SPLITS = ("train", "val", "test")
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_cifar_pickle(path: str | os.PathLike) -> dict:
    """Load one CIFAR python pickle (bytes keys, latin-1 decoding of Python 2 strings)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = _ArrayUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"CIFAR-100 file {path} not found") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise DatasetError(f"{path}: not a CIFAR-100 python pickle ({error})") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(content).__name__}")
    return content


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _field(content: dict, key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise DatasetError(f"{path}: missing the {key!r} entry")


def find_cifar100(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The ``cifar-100-python`` folder for dataset ``name`` (see the module docstring)."""
    base = Path(data_dir if data_dir is not None else default_data_dir())
    candidates = [base / name / "cifar-100-python", base / "cifar-100-python"]
    for candidate in candidates:
        if (candidate / "meta").is_file():
            return candidate
    raise DatasetNotFoundError(
        f"CIFAR-100 not found for {name}: expected cifar-100-python/{{train,test,meta}} in "
        f"{' or '.join(str(c.parent) for c in candidates)} (see docs/DATASETS.md)"
    )


def load_cifar100(
    folder: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """All 60,000 images (train then test) as uint8 ``[n, 32, 32, 3]``, fine and coarse labels,
    fine and coarse names."""
    folder = Path(folder)
    meta = load_cifar_pickle(folder / "meta")
    fine_names = [_text(n) for n in _field(meta, "fine_label_names", folder / "meta")]
    coarse_names = [_text(n) for n in _field(meta, "coarse_label_names", folder / "meta")]
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = folder / part
        content = load_cifar_pickle(path)
        data = np.asarray(_field(content, "data", path))
        fine_labels = np.asarray(_field(content, "fine_labels", path), dtype=np.int64)
        coarse_labels = np.asarray(_field(content, "coarse_labels", path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}")
        if not (data.shape[0] == fine_labels.size == coarse_labels.size):
            raise DatasetError(
                f"{path}: {data.shape[0]} images but {fine_labels.size}/{coarse_labels.size} labels"
            )
        if fine_labels.size and (fine_labels.min() < 0 or fine_labels.max() >= len(fine_names)):
            raise DatasetError(f"{path}: fine labels outside [0, {len(fine_names)})")
        if coarse_labels.size and (coarse_labels.min() < 0 or coarse_labels.max() >= len(coarse_names)):
            raise DatasetError(f"{path}: coarse labels outside [0, {len(coarse_names)})")
        # Rows hold the red, green and blue 32x32 planes one after the other.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(fine_labels)
        coarse.append(coarse_labels)
    return (
        np.ascontiguousarray(np.concatenate(images)),
        np.concatenate(fine),
        np.concatenate(coarse),
        fine_names,
        coarse_names,
    )


def read_split_entries(path: Path) -> list:
    """The JSON list of a CIFAR-FS (fine class pairs) or FC100 (superclasses) split file."""
    if not path.is_file():
        raise DatasetNotFoundError(f"split file {path} not found")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SplitError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, list) or not content:
        raise SplitError(f"{path}: expected a non-empty JSON list")
    return content


def _resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
    if image_size is None or image_size == images.shape[1]:
        return images
    from PIL import Image  # only needed for the rare resized CIFAR

    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.LANCZOS))
            for im in images
        ]
    )


def load_cifar_fewshot(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> FewShotDataset:
    """CIFAR-FS (``name="cifar-fs"``) or FC100 (``name="fc100"``): one split, uint8 ``[n, 32, 32, 3]``."""
    if name not in ("cifar-fs", "fc100"):
        raise SplitError(f"unknown CIFAR few-shot dataset {name!r}; choose cifar-fs or fc100")
    if split not in CIFAR_SPLITS:
        raise SplitError(f"{name} has splits {', '.join(CIFAR_SPLITS)}; got {split!r}")
    base = Path(data_dir if data_dir is not None else default_data_dir())
    split_path = base / name / "splits" / f"{split}.json"
    entries = read_split_entries(split_path)
    images, fine, coarse, fine_names, coarse_names = load_cifar100(find_cifar100(name, data_dir))
    fine_index = {n: i for i, n in enumerate(fine_names)}
    coarse_index = {n: i for i, n in enumerate(coarse_names)}
    if name == "cifar-fs":
        chosen = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
                raise SplitError(f"{split_path}: expected [coarse, fine] name pairs, got {entry!r}")
            superclass, fine_name = entry
            if fine_name not in fine_index or superclass not in coarse_index:
                raise SplitError(f"{split_path}: {entry!r} names a class CIFAR-100 does not have")
            members = fine == fine_index[fine_name]
            if members.any() and not np.all(coarse[members] == coarse_index[superclass]):
                raise SplitError(
                    f"{split_path}: {fine_name!r} is not in superclass {superclass!r} in CIFAR-100"
                )
            chosen.append(fine_index[fine_name])
    else:
        for entry in entries:
            if not isinstance(entry, str) or entry not in coarse_index:
                raise SplitError(f"{split_path}: {entry!r} is not a CIFAR-100 superclass")
        wanted = [coarse_index[entry] for entry in entries]
        # Fine classes of the chosen superclasses, ordered by superclass (as listed) then fine index.
        chosen = [int(f) for c in wanted for f in np.unique(fine[coarse == c])]
    class_names = tuple(fine_names[i] for i in chosen)
    new_label = np.full(len(fine_names), -1, dtype=np.int64)
    new_label[chosen] = np.arange(len(chosen))
    keep = np.flatnonzero(new_label[fine] >= 0)
    return FewShotDataset(
        images=_resize(images[keep], image_size),
        labels=new_label[fine[keep]],
        class_names=class_names,
        name=f"{name}/{split}",
        normalization=CIFAR100_NORMALIZATION,
    )
