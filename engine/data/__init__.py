"""The few-shot data layer (in place of torchmeta): datasets, decoded cache, episodic sampling.

Typical use::

    from engine.data import load_dataset, TaskSampler
    train = load_dataset("omniglot", "train")            # Vinyals split, 28x28, cached
    sampler = TaskSampler(train, ways=20, shots=1, queries=1, rngs=rngs.child(1))
    batch = sampler.sample(8)                            # TaskBatch of tensors
    evaluation = TaskSampler(test, 20, 1, 1).fixed_tasks(600, seed=0)

See docs/DATASETS.md for the on-disk layouts.
"""

from engine.data.cifar import load_cifar_fewshot
from engine.data.dataset import (
    CIFAR100_NORMALIZATION,
    IMAGENET_NORMALIZATION,
    UNIT_RANGE,
    FewShotDataset,
    Normalization,
)
from engine.data.download import OMNIGLOT_BASE_URL, OMNIGLOT_MD5, download_file, download_omniglot
from engine.data.errors import (
    ChecksumMismatchError,
    CorruptImageError,
    DatasetError,
    DatasetNotFoundError,
    EmptyClassError,
    NotEnoughClassesError,
    NotEnoughImagesError,
    SplitError,
    UnsafeArchiveError,
)
from engine.data.image_folder import (
    ArchiveLimits,
    SupportSet,
    inspect_zip,
    load_image_folder,
    load_support_set,
    safe_extract_zip,
)
from engine.data.miniimagenet import load_mini_imagenet
from engine.data.omniglot import load_omniglot, load_omniglot_characters
from engine.data.registry import DATASET_NAMES, load_dataset
from engine.data.sampling import FixedTaskSet, TaskBatch, TaskPlan, TaskSampler

__all__ = [
    "ArchiveLimits",
    "CIFAR100_NORMALIZATION",
    "ChecksumMismatchError",
    "CorruptImageError",
    "DATASET_NAMES",
    "DatasetError",
    "DatasetNotFoundError",
    "EmptyClassError",
    "FewShotDataset",
    "FixedTaskSet",
    "IMAGENET_NORMALIZATION",
    "Normalization",
    "NotEnoughClassesError",
    "NotEnoughImagesError",
    "OMNIGLOT_BASE_URL",
    "OMNIGLOT_MD5",
    "SplitError",
    "SupportSet",
    "TaskBatch",
    "TaskPlan",
    "TaskSampler",
    "UNIT_RANGE",
    "UnsafeArchiveError",
    "download_file",
    "download_omniglot",
    "inspect_zip",
    "load_cifar_fewshot",
    "load_dataset",
    "load_image_folder",
    "load_mini_imagenet",
    "load_omniglot",
    "load_omniglot_characters",
    "load_support_set",
    "safe_extract_zip",
]
