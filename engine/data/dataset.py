"""The in-memory form every few-shot dataset takes: uint8 images plus class indices.

A ``FewShotDataset`` is one split (e.g. Omniglot/Vinyals/train): all of its images
as one ``uint8`` array ``[n_images, H, W, C]`` (possibly a read-only memory map of
the decoded cache), the class of every image, and the class names. Task sampling
only ever indexes into these arrays, so it needs no per-image Python work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.data.errors import DatasetError, EmptyClassError


@dataclass(frozen=True)
class Normalization:
    """``x = (pixel / 255 - mean) / std`` per channel; one value applies to every channel."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(
                f"Normalization mean {self.mean} and std {self.std} must be non-empty and equally long"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalization std must be positive, got {self.std}")

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) float32 arrays of length ``channels`` with ``x = pixel * scale + shift``."""
        if len(self.mean) not in (1, channels):
            raise ValueError(
                f"Normalization has {len(self.mean)} channel values; the images have {channels} channels"
            )
        mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float64), (channels,))
        std = np.broadcast_to(np.asarray(self.std, dtype=np.float64), (channels,))
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (-mean / std).astype(np.float32)
        return scale, shift


#: Pixels scaled to [0, 1], nothing else (Omniglot, user datasets).
UNIT_RANGE = Normalization()
#: ImageNet statistics, as MAML++ uses for Mini-ImageNet.
IMAGENET_NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: CIFAR-100 training-set statistics (CIFAR-FS, FC100).
CIFAR100_NORMALIZATION = Normalization(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))


@dataclass(frozen=True, eq=False)
class FewShotDataset:
    """Images of one split, grouped into classes.

    ``images``: uint8 ``[n_images, H, W, C]``. ``labels``: int64 ``[n_images]``, the
    class index (into ``class_names``) of every image. ``normalization`` is the
    default a ``TaskSampler`` applies when it is given none.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = "dataset"
    normalization: Normalization = UNIT_RANGE
    #: ``[n_classes, max_images_per_class]`` image indices per class, padded with -1.
    class_image_table: np.ndarray = field(init=False, repr=False)
    #: ``[n_classes]`` number of images per class.
    class_counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        images, labels = self.images, np.asarray(self.labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(
                f"{self.name}: images must be uint8 [n, H, W, C], got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[3] not in (1, 3):
            raise DatasetError(f"{self.name}: images must have 1 or 3 channels, got {images.shape[3]}")
        if labels.shape != (images.shape[0],):
            raise DatasetError(f"{self.name}: {labels.shape[0]} labels for {images.shape[0]} images")
        labels = labels.astype(np.int64, copy=False)
        n_classes = len(self.class_names)
        if len(set(self.class_names)) != n_classes:
            raise DatasetError(f"{self.name}: class names are not unique")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise DatasetError(
                f"{self.name}: labels must lie in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
            )
        counts = np.bincount(labels, minlength=n_classes)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise EmptyClassError(f"{self.name}: class {self.class_names[empty[0]]!r} has no images")
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        table = np.full((n_classes, int(counts.max()) if n_classes else 0), -1, dtype=np.int64)
        # Row c, column j holds the j-th image of class c (in dataset order).
        columns = np.arange(labels.size) - np.repeat(starts, counts)
        table[labels[order], columns] = order
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "class_image_table", table)
        object.__setattr__(self, "class_counts", counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def image_indices_of(self, class_index: int) -> np.ndarray:
        """Indices into ``images`` of every image of class ``class_index``."""
        return self.class_image_table[class_index, : self.class_counts[class_index]]

    def select_classes(
        self, class_indices: Sequence[int] | np.ndarray, name: str | None = None
    ) -> FewShotDataset:
        """A new dataset with only these classes (in this order), images copied into memory."""
        class_indices = np.asarray(class_indices, dtype=np.int64)
        rows = self.class_image_table[class_indices]
        keep = rows[rows >= 0]
        new_labels = np.repeat(np.arange(class_indices.size), self.class_counts[class_indices])
        return FewShotDataset(
            images=np.ascontiguousarray(self.images[keep]),
            labels=new_labels,
            class_names=tuple(self.class_names[i] for i in class_indices),
            name=name or self.name,
            normalization=self.normalization,
        )
