"""Decoding image files into uint8 arrays, safely and in parallel.

Resizing is antialiased: images are first converted to 8-bit ("L" or "RGB") and
then resized with PIL's LANCZOS filter. (Resizing a 1-bit Omniglot PNG directly
would make PIL fall back to nearest-neighbour, which aliases badly.)

Sources are described by ``ImageSource`` (a file path, or a member of a zip),
so that worker processes can open them themselves and only small arrays travel
between processes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.data.errors import CorruptImageError
from engine.progress import ProgressCallback, null_progress

#: Refuse images above this many pixels before decoding them (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
RESAMPLE = Image.Resampling.LANCZOS
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageSource:
    """Where one image's bytes are: ``path`` alone (a file), or ``member`` inside the zip at ``path``."""

    path: str
    member: str | None = None

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member is not None else self.path


def decode_image(
    data: bytes,
    name: str,
    *,
    size: tuple[int, int] | None,
    channels: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode one image into uint8 ``[H, W, channels]``, resized to ``size`` = (H, W) when given.

    Raises ``CorruptImageError`` naming ``name`` for empty, undecodable or oversized files.
    The pixel limit is checked from the header, before any pixel data is decoded.
    """
    if not data:
        raise CorruptImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and at 2x raises) above its own global limit; ours is stricter and local.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise CorruptImageError(
                        f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
                    )
                image = image.convert("L" if channels == 1 else "RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), RESAMPLE)
                array = np.asarray(image, dtype=np.uint8)
    except CorruptImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise CorruptImageError(f"{name}: image too large to decode safely ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{name}: not a readable image ({error})") from error
        raise CorruptImageError(f"{name}: image too large to decode safely ({error})") from error
    return array.reshape(array.shape[0], array.shape[1], channels)


def read_image_header(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header only; ``CorruptImageError`` if unreadable or too large."""
    if not data:
        raise CorruptImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise CorruptImageError(f"{name}: image too large to decode safely ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"{name}: not a readable image ({error})") from error
    if width * height > max_pixels:
        raise CorruptImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    return width, height


@dataclass(frozen=True)
class _DecodeJob:
    sources: tuple[ImageSource, ...]
    size: tuple[int, int]
    channels: int
    max_pixels: int


def _decode_chunk(job: _DecodeJob) -> np.ndarray:
    out = np.empty((len(job.sources), job.size[0], job.size[1], job.channels), dtype=np.uint8)
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for position, source in enumerate(job.sources):
            if source.member is None:
                with open(source.path, "rb") as handle:
                    data = handle.read()
            else:
                archive = archives.get(source.path)
                if archive is None:
                    archive = archives[source.path] = zipfile.ZipFile(source.path)
                try:
                    data = archive.read(source.member)
                except (zipfile.BadZipFile, OSError, EOFError) as error:
                    raise CorruptImageError(f"{source.describe()}: damaged zip member ({error})") from error
            out[position] = decode_image(
                data, source.describe(), size=job.size, channels=job.channels, max_pixels=job.max_pixels
            )
    finally:
        for archive in archives.values():
            archive.close()
    return out


def default_workers() -> int:
    """Worker processes for decoding: the usable CPUs, at most 4, and 1 inside a daemon process.

    Celery's prefork workers are daemonic and may not start children, so decoding runs
    in-process there.
    """
    if multiprocessing.current_process().daemon:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def decode_images(
    sources: Sequence[ImageSource],
    *,
    size: tuple[int, int],
    channels: int,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int | None = None,
    progress: ProgressCallback = null_progress,
    progress_info: dict | None = None,
    chunk_size: int = 512,
) -> np.ndarray:
    """Decode many images into one uint8 ``[n, H, W, channels]`` array, in order.

    Uses ``workers`` processes (default ``default_workers()``); reports
    ``{"kind": "dataset", "stage": "decode", "current", "total", **progress_info}``
    after every chunk. A ``JobCancelled`` raised by ``progress`` stops the work.
    """
    total = len(sources)
    out = np.empty((total, size[0], size[1], channels), dtype=np.uint8)
    info = dict(progress_info or {})
    jobs = [
        _DecodeJob(tuple(sources[start : start + chunk_size]), size, channels, max_pixels)
        for start in range(0, total, chunk_size)
    ]
    workers = default_workers() if workers is None else max(1, int(workers))
    progress({"kind": "dataset", "stage": "decode", "current": 0, "total": total, **info})
    done = 0
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            out[done : done + len(job.sources)] = _decode_chunk(job)
            done += len(job.sources)
            progress({"kind": "dataset", "stage": "decode", "current": done, "total": total, **info})
        return out
    # Not "fork": the caller (a web worker, a test run) often has threads - Redis, Channels, torch's
    # pools - and forking a threaded process can deadlock the child on a lock some thread held. A
    # forkserver starts from a clean single-threaded process; the workers only use PIL and numpy.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        try:
            for job, chunk in zip(jobs, pool.map(_decode_chunk, jobs), strict=True):
                out[done : done + len(job.sources)] = chunk
                done += len(job.sources)
                progress({"kind": "dataset", "stage": "decode", "current": done, "total": total, **info})
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out
