"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

PyTorch's CPU tensors come from ``malloc``. glibc serves a large request (above its mmap
threshold, 128 KiB at first) with a fresh ``mmap`` and returns it with ``munmap`` when freed, and
it trims the top of the heap back to the kernel once enough of it is free. A worker that runs the
same small convolutions thousands of times (a GA fitness evaluation: 16 tasks, 3 inner steps)
then pays a page fault and a zeroed page for every 4 KiB of every activation, on every step. On
the 2-core AMD EPYC, one process scoring GA sub-nets took 469,000 minor page faults and 110-119
ms per evaluation with glibc's defaults, 90,000 faults and 76-82 ms with this setting, at the same
peak RSS (docs/BENCHMARKS.md, "allocator").

:func:`retain_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and
the trim threshold to 512 MiB, so freed blocks below 32 MiB stay in the heap for the next
allocation, and it stops glibc from serving any request with its own ``mmap`` (``M_MMAP_MAX``
0), so blocks above 32 MiB come from the heap and stay there too. The Mini-ImageNet shape needs
that: one 84x84 layer output of 80 images and 48 channels is 108 MB. A one-thread MAML++
meta-iteration there (second order, 5 steps, meta-batch 2) took 2.1 million minor faults and 8 of
its 16.6 s in the kernel with glibc's defaults, 1.3 million and 13.3 s with the thresholds alone,
50,000 and 10.1 s with mmap off too (ad hoc, docs/BENCHMARKS.md, "MAML++ iteration speed").
It is process-wide and cannot be undone (an explicit threshold also turns off glibc's
own adjustment of it), so only processes that exist to compute call it: the workers of
:mod:`engine.forked` (GA fitness, the ``processes`` meta-training strategy). A process that runs
many different jobs keeps up to the trim threshold of free heap for later ones.
"""

from __future__ import annotations

import ctypes
import sys

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 512 << 20

_retained = False


def retain_freed_memory() -> bool:
    """Apply the thresholds above to this process; True where glibc took them (idempotent).
    Elsewhere (macOS, musl, Windows) nothing changes and it returns False."""
    global _retained
    if _retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt as a no-op)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _retained = (
        bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        and bool(mallopt(_M_MMAP_MAX, 0))
    )
    return _retained
