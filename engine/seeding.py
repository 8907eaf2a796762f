"""The one place every random number generator is seeded from.

Engine code never touches the global ``random``/``numpy.random`` state directly
for its own decisions: it takes a ``numpy.random.Generator`` or a
``torch.Generator`` made here, so a run is reproducible from one integer seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Rngs:
    """Independent, reproducible generators derived from one seed."""

    seed: int
    numpy: np.random.Generator
    torch: torch.Generator

    def child(self, stream: int) -> Rngs:
        """A new, independent set of generators for sub-stream ``stream``.

        Used where two parts of a run must not perturb each other's random
        streams (e.g. task sampling and architecture sampling).
        """
        return make_rngs(derive_seed(self.seed, stream))


def derive_seed(seed: int, stream: int) -> int:
    """A deterministic 63-bit seed for sub-stream ``stream`` of ``seed``."""
    sequence = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(stream)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


def make_rngs(seed: int) -> Rngs:
    """Generators for one run; does not change any global state."""
    torch_generator = torch.Generator()
    torch_generator.manual_seed(int(seed))
    return Rngs(seed=int(seed), numpy=np.random.default_rng(int(seed)), torch=torch_generator)


def seed_everything(seed: int) -> Rngs:
    """Seed the global RNGs too (for library code we do not control) and return run generators.

    Called once at the start of a job (CLI command, Celery task, benchmark).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return make_rngs(seed)
