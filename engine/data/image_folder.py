"""User datasets: a folder or zip of class folders (the ImageFolder layout).

Layout::

    <root>/<class name>/<image file>

A zip may hold that layout directly or inside one top-level folder (what zipping
a folder produces). macOS/Windows clutter is ignored: ``__MACOSX/`` folders and
files whose name starts with ``.`` or is ``Thumbs.db``/``desktop.ini``. Anything
else is an error naming the file or class: files outside a class folder, nested
folders, non-image or empty files, images over the pixel limit, class folders
without images.

Zips are checked before anything is read or written (``inspect_zip``): no
absolute or ``..`` paths, no links or special files, no encryption, and limits on
member count and total uncompressed size (``ArchiveLimits``).
``safe_extract_zip`` extracts into a temporary folder next to the target and
renames it into place, so nothing is ever written outside the target folder and a
failed extraction leaves nothing behind.

The same data serves as a meta-training dataset (``load_image_folder``) and as the
support set of a single task (``load_support_set``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from engine.data.cache import load_or_build
from engine.data.dataset import UNIT_RANGE, FewShotDataset, Normalization
from engine.data.errors import (
    CorruptImageError,
    DatasetError,
    DatasetNotFoundError,
    EmptyClassError,
    NotEnoughClassesError,
    NotEnoughImagesError,
    UnsafeArchiveError,
)
from engine.data.imaging import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_SUFFIXES, ImageSource, decode_images
from engine.progress import ProgressCallback, null_progress

_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """What an uploaded archive may contain. The defaults suit few-shot datasets of a few
    thousand photos; raise them for bigger ones."""

    max_total_bytes: int = 2 * 1024**3
    max_members: int = 100_000
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def _is_ignored(parts: tuple[str, ...]) -> bool:
    return (
        parts[0] == "__MACOSX"
        or any(part.startswith(".") for part in parts)
        or parts[-1].lower() in _IGNORED_NAMES
    )


def _check_member_name(name: str, archive: str) -> tuple[str, ...]:
    """The path components of a zip member, refusing anything that could escape the target."""
    if "\\" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains a backslash; refusing the archive")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing the archive")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refusing the archive")
    if not parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an empty path; refusing the archive")
    return parts


def inspect_zip(path: str | os.PathLike, limits: ArchiveLimits = ArchiveLimits()) -> list[zipfile.ZipInfo]:
    """Validate every member of a zip (names, types, sizes) without extracting; return the members.

    Raises ``UnsafeArchiveError`` naming the archive and the offending member.
    """
    archive = str(path)
    try:
        with zipfile.ZipFile(path) as handle:
            members = handle.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsafeArchiveError(f"{archive}: not a readable zip archive ({error})") from error
    if len(members) > limits.max_members:
        raise UnsafeArchiveError(
            f"{archive}: {len(members):,} members exceed the limit of {limits.max_members:,}"
        )
    total = 0
    seen: set[tuple[str, ...]] = set()
    for info in members:
        parts = _check_member_name(info.filename, archive)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a symbolic link; refusing the archive"
            )
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is not a regular file or folder")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is encrypted")
        if parts in seen:
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} appears twice")
        seen.add(parts)
        total += info.file_size
        if total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{archive}: uncompressed size exceeds the limit of {limits.max_total_bytes:,} bytes "
                f"(reached at member {info.filename!r})"
            )
    return members


def safe_extract_zip(
    path: str | os.PathLike, target: str | os.PathLike, limits: ArchiveLimits = ArchiveLimits()
) -> Path:
    """Extract a zip into the new folder ``target`` (which must not exist) after ``inspect_zip``.

    Members are written into a temporary folder beside ``target``, each path checked to stay
    inside it, with the written bytes counted against ``limits.max_total_bytes``; the folder is
    renamed to ``target`` only when everything succeeded.
    """
    members = inspect_zip(path, limits)
    target = Path(target)
    if target.exists():
        raise DatasetError(f"{target} already exists; refusing to extract over it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent)).resolve()
    written = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in members:
                destination = staging.joinpath(*_check_member_name(info.filename, str(path))).resolve()
                if not destination.is_relative_to(staging) or destination == staging:
                    raise UnsafeArchiveError(
                        f"{path}: member {info.filename!r} would be written outside {target}"
                    )
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(destination, "xb") as sink:
                    while block := source.read(1 << 20):
                        written += len(block)
                        if written > limits.max_total_bytes:
                            raise UnsafeArchiveError(
                                f"{path}: uncompressed size exceeds the limit of {limits.max_total_bytes:,} bytes"
                            )
                        sink.write(block)
        os.rename(staging, target)
    except zipfile.BadZipFile as error:
        raise UnsafeArchiveError(f"{path}: damaged zip archive ({error})") from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _classes_from_paths(
    files: list[tuple[tuple[str, ...], ImageSource, int]], folders: set[tuple[str, ...]], where: str
) -> dict[str, list[ImageSource]]:
    """Group (path parts, source, size) into classes, enforcing the ImageFolder layout."""
    files = [entry for entry in files if not _is_ignored(entry[0])]
    folders = {folder for folder in folders if not _is_ignored(folder)}
    if not files:
        raise EmptyClassError(f"{where}: no images found (expected <class>/<image> files)")
    tops = {parts[0] for parts, _, _ in files} | {folder[0] for folder in folders}
    if len(tops) == 1 and all(len(parts) >= 3 for parts, _, _ in files):
        # Everything sits in one wrapping folder (a zipped folder): look inside it.
        files = [(parts[1:], source, size) for parts, source, size in files]
        folders = {folder[1:] for folder in folders if len(folder) > 1}
    classes: dict[str, list[ImageSource]] = {folder[0]: [] for folder in folders if len(folder) == 1}
    for parts, source, size in sorted(files, key=lambda entry: entry[0]):
        shown = "/".join(parts)
        if len(parts) == 1:
            raise DatasetError(
                f"{where}: file {shown!r} is not inside a class folder (expected <class>/<image>)"
            )
        if len(parts) > 2:
            raise DatasetError(f"{where}: {shown!r} is in a nested folder; expected <class>/<image> only")
        if PurePosixPath(parts[1]).suffix.lower() not in IMAGE_SUFFIXES:
            raise CorruptImageError(
                f"{where}: {shown!r} is not an image file (suffix not one of the image types)"
            )
        if size == 0:
            raise CorruptImageError(f"{where}: {shown!r} is empty (0 bytes)")
        classes.setdefault(parts[0], []).append(source)
    for folder in sorted(folders):
        if len(folder) > 1:
            raise DatasetError(
                f"{where}: folder {'/'.join(folder)!r} is nested; expected <class>/<image> only"
            )
    for class_name, sources in sorted(classes.items()):
        if not sources:
            raise EmptyClassError(f"{where}: class folder {class_name!r} holds no images")
    return dict(sorted(classes.items()))


def _folder_layout(root: Path) -> dict[str, list[ImageSource]]:
    files: list[tuple[tuple[str, ...], ImageSource, int]] = []
    folders: set[tuple[str, ...]] = set()
    for current, dirnames, filenames in os.walk(root):
        relative = Path(current).relative_to(root).parts
        for dirname in dirnames:
            if (Path(current) / dirname).is_symlink():
                raise DatasetError(
                    f"{root}: {'/'.join((*relative, dirname))!r} is a symbolic link; refusing it"
                )
            folders.add((*relative, dirname))
        for filename in filenames:
            full = Path(current) / filename
            parts = (*relative, filename)
            if _is_ignored(parts):
                continue
            if full.is_symlink() or not full.is_file():
                raise DatasetError(f"{root}: {'/'.join(parts)!r} is not a regular file; refusing it")
            files.append((parts, ImageSource(str(full)), full.stat().st_size))
    return _classes_from_paths(files, folders, str(root))


def _zip_layout(path: Path, limits: ArchiveLimits) -> dict[str, list[ImageSource]]:
    files: list[tuple[tuple[str, ...], ImageSource, int]] = []
    folders: set[tuple[str, ...]] = set()
    for info in inspect_zip(path, limits):
        parts = _check_member_name(info.filename, str(path))
        if info.is_dir():
            folders.add(parts)
        else:
            files.append((parts, ImageSource(str(path), info.filename), info.file_size))
            folders.update(parts[:i] for i in range(1, len(parts) - 1))
    return _classes_from_paths(files, folders, str(path))


def read_image_folder_layout(
    path: str | os.PathLike, limits: ArchiveLimits = ArchiveLimits()
) -> dict[str, list[ImageSource]]:
    """``{class name: [image sources]}`` of a folder or zip, validated (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _folder_layout(path)
    if path.is_file():
        return _zip_layout(path, limits)
    raise DatasetNotFoundError(f"{path}: no such folder or zip file")


def load_image_folder(
    path: str | os.PathLike,
    *,
    image_size: int = 84,
    channels: int = 3,
    name: str | None = None,
    normalization: Normalization = UNIT_RANGE,
    limits: ArchiveLimits = ArchiveLimits(),
    progress: ProgressCallback = null_progress,
    cache_root: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
) -> FewShotDataset:
    """A folder or zip of class folders as a ``FewShotDataset`` of ``image_size`` squares.

    Images are converted to ``channels`` (1: greyscale, 3: RGB) and resized to
    ``image_size`` x ``image_size`` with LANCZOS, without cropping (like the
    Mini-ImageNet generator). Decoded arrays go to the cache unless ``use_cache=False``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(image_size, int) or not 4 <= image_size <= 1024:
        raise ValueError(f"image_size must be an integer in [4, 1024], got {image_size!r}")
    root = Path(path)
    layout = read_image_folder_layout(root, limits)
    class_names = tuple(layout)
    sources = [source for class_sources in layout.values() for source in class_sources]
    labels = np.repeat(np.arange(len(class_names)), [len(layout[c]) for c in class_names])
    dataset_name = name or root.stem

    def build() -> tuple[np.ndarray, np.ndarray, dict]:
        images = decode_images(
            sources,
            size=(image_size, image_size),
            channels=channels,
            max_pixels=limits.max_image_pixels,
            workers=workers,
            progress=progress,
            progress_info={"dataset": dataset_name},
        )
        return images, labels, {"class_names": list(class_names)}

    if use_cache:
        identities = [root] if root.is_file() else [Path(source.path) for source in sources]
        params = {
            "image_size": image_size,
            "channels": channels,
            "resample": "lanczos",
            "layout": "image-folder-v1",
            "class_names": list(class_names),
            "max_image_pixels": limits.max_image_pixels,
        }
        entry = load_or_build("image-folder", identities, params, build, root=cache_root)
        images, stored_labels = entry.images, entry.labels
    else:
        images, stored_labels, _ = build()
    return FewShotDataset(
        images=images,
        labels=stored_labels,
        class_names=class_names,
        name=dataset_name,
        normalization=normalization,
    )


@dataclass(frozen=True)
class SupportSet:
    """The labelled examples of one task: ``x`` float32 ``[M, C, H, W]``, ``y`` int64 ``[M]``
    (label ``i`` is ``class_names[i]``)."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def ways(self) -> int:
        return len(self.class_names)


def load_support_set(
    path: str | os.PathLike,
    *,
    image_size: int = 84,
    channels: int = 3,
    ways: int | None = None,
    shots: int | None = None,
    normalization: Normalization = UNIT_RANGE,
    limits: ArchiveLimits = ArchiveLimits(),
    progress: ProgressCallback = null_progress,
    workers: int | None = None,
) -> SupportSet:
    """A folder or zip of class folders as the support set of one task (every image used).

    ``ways``: the exact number of classes required (default: any number >= 2). ``shots``:
    the minimum images per class. Not cached (an uploaded support set is used once).
    """
    dataset = load_image_folder(
        path,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
        limits=limits,
        progress=progress,
        use_cache=False,
        workers=workers,
    )
    needed = 2 if ways is None else ways
    if dataset.num_classes < needed or (ways is not None and dataset.num_classes != ways):
        raise NotEnoughClassesError(
            f"{path}: a support set needs {'exactly ' if ways is not None else 'at least '}{needed} classes, "
            f"found {dataset.num_classes} ({', '.join(dataset.class_names)})"
        )
    if shots is not None:
        short = [
            name
            for name, count in zip(dataset.class_names, dataset.class_counts, strict=True)
            if count < shots
        ]
        if short:
            raise NotEnoughImagesError(
                f"{path}: {shots} shots need {shots} images per class; too few in {short}"
            )
    scale, shift = normalization.per_channel(channels)
    pixels = torch.from_numpy(np.ascontiguousarray(dataset.images)).permute(0, 3, 1, 2)
    x = (
        pixels.float()
        .mul_(torch.from_numpy(scale).view(1, -1, 1, 1))
        .add_(torch.from_numpy(shift).view(1, -1, 1, 1))
    )
    return SupportSet(
        x=x.contiguous(), y=torch.from_numpy(dataset.labels.copy()), class_names=dataset.class_names
    )
