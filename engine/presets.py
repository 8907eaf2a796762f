"""Search spaces of the job presets, so every job kind of one preset agrees on the space.

A device profiled for the ``tiny`` preset gets a lookup table for exactly the space that the
``tiny`` meta-training preset builds (engine.meta.runs.build_space), which is what lets a full
browser journey (profile a board, meta-train, adapt, download) finish in minutes on two cores.
"""

from __future__ import annotations

from engine.meta.runs import PRESETS, RunSpec, build_space
from engine.space import SearchSpace

#: N-way of each preset's default task (Omniglot): the classifier head, and so its LUT key, depends on it.
PRESET_WAYS = {"tiny": 5, "cpu": 20, "paper": 20}


def search_space(
    preset: str, *, dataset: str = "omniglot", num_classes: int | None = None, backbone: str = "vgg9"
) -> SearchSpace:
    """The super-net search space that meta-training with ``preset`` builds."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    ways = PRESET_WAYS[preset] if num_classes is None else num_classes
    return build_space(RunSpec(dataset=dataset, ways=ways, backbone=backbone, preset=preset))
