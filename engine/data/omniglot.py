"""Omniglot (Lake et al. 2015): 1623 characters x 20 drawings, with the standard splits.

Source files under ``<data_dir>/omniglot/``: ``images_background`` and
``images_evaluation``, each either an extracted folder or a ``.zip`` of
``images_<set>/<Alphabet>/characterNN/*.png``. With ``download=True`` missing zips
are fetched from the official repository and checked against their MD5.

All 32,460 images are decoded once (converted to 8-bit, LANCZOS-resized to
``image_size``) into the decoded cache; a split is then a selection of characters
from that cached array, so every split and protocol shares one cache entry.

Splits (``protocol``):

- ``"vinyals"`` (default): the Vinyals et al. 2016 split used by Matching and
  Prototypical Networks, 1028/172/423 characters (train/val/test; ``trainval`` =
  1200). Read from ``omniglot/splits/vinyals/<split>.txt`` when present, else from
  the identical copy in ``engine/data/splits/omniglot_vinyals.json``. Rotations by
  0/90/180/270 degrees are separate classes by default (the standard protocol),
  so train has 4112 classes.
- ``"lake"``: train = the 30 background alphabets (964 characters), test = the 20
  evaluation alphabets (659). There is no validation split.
- ``"mamlpp"``: MAML++'s ratio split: the 1623 characters, in name order, are
  shuffled with ``numpy.random.default_rng(split_seed)`` and cut at
  ``int(0.70918052988 * 1623) = 1150`` and ``int((0.70918052988 + 0.03080714725) *
  1623) = 1200``, truncating exactly as MAML++'s ``data.py`` does: 1150/50/423
  characters (rounding to nearest would give 1151/50/422; the ratios sum to 1.0006).
  ``trainval`` = the first 1200, the "1200 characters for training" of H-Meta-NAS.

Pixels: by default images are inverted so strokes are 255 and the background 0
(as in Finn et al.'s MAML), which suits zero padding; ``invert=False`` keeps the
PNG convention (white background).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from engine.data.cache import load_or_build
from engine.data.dataset import UNIT_RANGE, FewShotDataset
from engine.data.download import OMNIGLOT_BASE_URL, OMNIGLOT_MD5, download_omniglot
from engine.data.errors import DatasetError, DatasetNotFoundError, SplitError
from engine.data.imaging import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, decode_images
from engine.paths import data_dir as default_data_dir
from engine.progress import ProgressCallback, null_progress

OMNIGLOT_SETS = ("images_background", "images_evaluation")
OMNIGLOT_PROTOCOLS = ("vinyals", "lake", "mamlpp")
MAMLPP_SPLIT_RATIOS = (0.70918052988, 0.03080714725, 0.2606284658)
ROTATION_NAMES = ("rot000", "rot090", "rot180", "rot270")
_VENDORED_VINYALS = Path(__file__).with_name("splits") / "omniglot_vinyals.json"


def _zip_sources(path: Path, set_name: str) -> dict[str, list[ImageSource]]:
    classes: dict[str, list[ImageSource]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"{path}: not a readable zip archive ({error})") from error
    for member in sorted(names):
        parts = member.split("/")
        if len(parts) != 4 or not parts[3].lower().endswith(".png") or parts[0] != set_name:
            continue
        classes.setdefault(f"{parts[1]}/{parts[2]}", []).append(ImageSource(str(path), member))
    return classes


def _folder_sources(path: Path) -> dict[str, list[ImageSource]]:
    classes: dict[str, list[ImageSource]] = {}
    for alphabet in sorted(p for p in path.iterdir() if p.is_dir()):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(f for f in character.iterdir() if f.suffix.lower() == ".png")
            classes[f"{alphabet.name}/{character.name}"] = [ImageSource(str(f)) for f in files]
    return classes


def _locate_sets(
    root: Path, download: bool, base_url: str, checksums: Mapping[str, str], progress: ProgressCallback
) -> dict[str, Path]:
    """The folder or zip for each set, downloading the missing zips when allowed."""
    found: dict[str, Path] = {}
    for set_name in OMNIGLOT_SETS:
        folder, archive = root / set_name, root / f"{set_name}.zip"
        if folder.is_dir():
            found[set_name] = folder
        elif archive.is_file():
            found[set_name] = archive
    missing = [name for name in OMNIGLOT_SETS if name not in found]
    if missing and download:
        wanted = {f"{name}.zip": checksums[f"{name}.zip"] for name in missing}
        download_omniglot(root, base_url=base_url, checksums=wanted, progress=progress)
        found.update({name: root / f"{name}.zip" for name in missing})
        missing = []
    if missing:
        raise DatasetNotFoundError(
            f"Omniglot not found: expected {', '.join(str(root / (m + '.zip')) for m in missing)} "
            f"(or the extracted folders); pass download=True (NASWEB_DATA_DOWNLOAD=1 in nasweb) to fetch "
            "the official zips"
        )
    return found


def _file_identities(location: Path) -> list[Path]:
    if location.is_dir():
        return sorted(location.rglob("*.png"))
    return [location]


def load_omniglot_characters(
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    download: bool = False,
    base_url: str = OMNIGLOT_BASE_URL,
    checksums: Mapping[str, str] = OMNIGLOT_MD5,
    progress: ProgressCallback = null_progress,
    cache_root: str | os.PathLike | None = None,
    workers: int | None = None,
) -> tuple[FewShotDataset, np.ndarray]:
    """All 1623 characters as one dataset (PNG pixel convention, not inverted) and a
    boolean array telling which characters are from the background set.

    Decodes into the cache on the first call (progress events ``kind="dataset"``,
    ``stage="decode"``), memory-maps it afterwards (``stage="cached"``).
    """
    if not isinstance(image_size, int) or not 4 <= image_size <= 105:
        raise ValueError(f"Omniglot image_size must be an integer in [4, 105], got {image_size!r}")
    root = Path(data_dir if data_dir is not None else default_data_dir()) / "omniglot"
    locations = _locate_sets(root, download, base_url, checksums, progress)
    sources = [path for set_name in OMNIGLOT_SETS for path in _file_identities(locations[set_name])]
    params = {"image_size": image_size, "channels": 1, "resample": "lanczos", "layout": "omniglot-v1"}

    def build() -> tuple[np.ndarray, np.ndarray, dict]:
        class_names: list[str] = []
        background: list[bool] = []
        image_sources: list[ImageSource] = []
        labels: list[int] = []
        for set_name in OMNIGLOT_SETS:
            location = locations[set_name]
            classes = _folder_sources(location) if location.is_dir() else _zip_sources(location, set_name)
            if not classes:
                raise DatasetError(f"{location}: no {set_name}/<Alphabet>/<character>/*.png images found")
            for class_name, files in classes.items():
                labels.extend([len(class_names)] * len(files))
                class_names.append(class_name)
                background.append(set_name == "images_background")
                image_sources.extend(files)
        images = decode_images(
            image_sources,
            size=(image_size, image_size),
            channels=1,
            max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
            workers=workers,
            progress=progress,
            progress_info={"dataset": "omniglot"},
        )
        return (
            images,
            np.asarray(labels, dtype=np.int64),
            {"class_names": class_names, "background": background},
        )

    entry = load_or_build("omniglot", sources, params, build, root=cache_root)
    if entry.hit:
        count = int(entry.images.shape[0])
        progress(
            {"kind": "dataset", "stage": "cached", "current": count, "total": count, "dataset": "omniglot"}
        )
    dataset = FewShotDataset(
        images=entry.images,
        labels=entry.labels,
        class_names=tuple(entry.meta["class_names"]),
        name="omniglot",
        normalization=UNIT_RANGE,
    )
    return dataset, np.asarray(entry.meta["background"], dtype=bool)


def vinyals_characters(split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Characters (``Alphabet/characterNN``) of a Vinyals split, in file order."""
    if split not in ("train", "val", "test", "trainval"):
        raise SplitError(f"Omniglot/vinyals has splits train, val, test, trainval; got {split!r}")
    root = Path(data_dir if data_dir is not None else default_data_dir()) / "omniglot" / "splits" / "vinyals"
    path = root / f"{split}.txt"
    if path.is_file():
        characters: list[str] = []
        seen: set[str] = set()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("/")
            if len(parts) != 3 or parts[2] not in ROTATION_NAMES:
                raise SplitError(f"{path}:{number}: expected Alphabet/characterNN/rotXXX, got {line!r}")
            character = f"{parts[0]}/{parts[1]}"
            if character not in seen:
                seen.add(character)
                characters.append(character)
        return characters
    vendored = json.loads(_VENDORED_VINYALS.read_text())
    if split == "trainval":
        return vendored["train"] + vendored["val"]
    return list(vendored[split])


def omniglot_split_characters(
    characters: Sequence[str],
    background: np.ndarray,
    protocol: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
) -> list[int]:
    """Indices into ``characters`` of the characters in ``split`` of ``protocol``."""
    index = {name: position for position, name in enumerate(characters)}
    if protocol == "vinyals":
        names = vinyals_characters(split, data_dir)
        unknown = [name for name in names if name not in index]
        if unknown:
            raise SplitError(f"Omniglot/vinyals/{split}: characters missing from the images: {unknown[:5]}")
        return [index[name] for name in names]
    if protocol == "lake":
        if split not in ("train", "test"):
            raise SplitError(
                f"Omniglot/lake has splits train (background) and test (evaluation); got {split!r}"
            )
        wanted = background if split == "train" else ~background
        return [int(i) for i in np.flatnonzero(wanted)]
    if protocol == "mamlpp":
        if split not in ("train", "val", "test", "trainval"):
            raise SplitError(f"Omniglot/mamlpp has splits train, val, test, trainval; got {split!r}")
        total = len(characters)
        in_name_order = sorted(range(total), key=lambda i: characters[i])
        shuffled = [in_name_order[i] for i in np.random.default_rng(split_seed).permutation(total)]
        train_end = int(MAMLPP_SPLIT_RATIOS[0] * total)
        val_end = int((MAMLPP_SPLIT_RATIOS[0] + MAMLPP_SPLIT_RATIOS[1]) * total)
        bounds = {
            "train": (0, train_end),
            "val": (train_end, val_end),
            "test": (val_end, total),
            "trainval": (0, val_end),
        }
        start, stop = bounds[split]
        return shuffled[start:stop]
    raise SplitError(f"unknown Omniglot protocol {protocol!r}; choose one of {', '.join(OMNIGLOT_PROTOCOLS)}")


def with_rotated_classes(
    dataset: FewShotDataset,
    class_indices: Sequence[int],
    *,
    rotations: Sequence[int] = (0, 1, 2, 3),
    name: str,
) -> FewShotDataset:
    """Every selected class once per rotation (quarter turns, counter-clockwise) as its own class.

    Classes are ordered class-major (``c/rot000, c/rot090, ...``), like the Vinyals files.
    """
    class_indices = np.asarray(class_indices, dtype=np.int64)
    quarter_turns = np.asarray(rotations, dtype=np.int64)
    pair_classes = np.repeat(class_indices, quarter_turns.size)
    pair_turns = np.tile(quarter_turns, class_indices.size)
    rows = dataset.class_image_table[pair_classes]
    counts = dataset.class_counts[pair_classes]
    images = np.array(dataset.images[rows[rows >= 0]])
    turns_per_image = np.repeat(pair_turns, counts)
    for turns in (1, 2, 3):
        selected = turns_per_image == turns
        if selected.any():
            images[selected] = np.rot90(images[selected], k=turns, axes=(1, 2))
    class_names = tuple(
        f"{dataset.class_names[c]}/{ROTATION_NAMES[t]}" for c, t in zip(pair_classes, pair_turns, strict=True)
    )
    return FewShotDataset(
        images=images,
        labels=np.repeat(np.arange(pair_classes.size), counts),
        class_names=class_names,
        name=name,
        normalization=dataset.normalization,
    )


def load_omniglot(
    split: str = "train",
    *,
    protocol: str = "vinyals",
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    rotations_as_classes: bool | None = None,
    invert: bool = True,
    split_seed: int = 0,
    download: bool = False,
    base_url: str = OMNIGLOT_BASE_URL,
    checksums: Mapping[str, str] = OMNIGLOT_MD5,
    progress: ProgressCallback = null_progress,
    cache_root: str | os.PathLike | None = None,
    workers: int | None = None,
) -> FewShotDataset:
    """One Omniglot split as a ``FewShotDataset`` (uint8 ``[n, S, S, 1]``, S = ``image_size``, default 28).

    ``rotations_as_classes`` defaults to True for ``vinyals`` and False otherwise
    (MAML++ / H-Meta-NAS rotate as augmentation instead: ``TaskSampler(augment_rotations=True)``).
    """
    if protocol not in OMNIGLOT_PROTOCOLS:
        raise SplitError(
            f"unknown Omniglot protocol {protocol!r}; choose one of {', '.join(OMNIGLOT_PROTOCOLS)}"
        )
    characters, background = load_omniglot_characters(
        data_dir=data_dir,
        image_size=28 if image_size is None else image_size,
        download=download,
        base_url=base_url,
        checksums=checksums,
        progress=progress,
        cache_root=cache_root,
        workers=workers,
    )
    chosen = omniglot_split_characters(
        characters.class_names, background, protocol, split, data_dir=data_dir, split_seed=split_seed
    )
    if rotations_as_classes is None:
        rotations_as_classes = protocol == "vinyals"
    name = f"omniglot/{protocol}/{split}"
    if rotations_as_classes:
        dataset = with_rotated_classes(characters, chosen, name=name)
    else:
        dataset = characters.select_classes(chosen, name=name)
    if invert:
        np.subtract(255, dataset.images, out=dataset.images)
    return dataset
