"""The decoded-image cache: uint8 arrays saved as ``.npy`` and memory-mapped on load.

An entry lives in ``<cache_dir>/datasets/<kind>-<key>/`` with ``images.npy``
(uint8 ``[n, H, W, C]``), ``labels.npy`` (int64 ``[n]``) and ``meta.json``. The key
hashes the identity of every source file (resolved path, size, modification time)
and the decoding parameters (image size, channels, resampling filter, cache
format version), so a changed source or setting simply misses the cache.

Entries are built in a temporary folder beside the final one and renamed into
place, so a reader never sees half an entry; a crashed build leaves only a
``.tmp-*`` folder, which the next build of the same key removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.paths import cache_dir

#: Bump when the decoding or the entry layout changes, to invalidate old entries.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CachedImages:
    """A cache entry: ``images`` is a read-only memory map."""

    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]
    path: Path
    hit: bool


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a source file's content cheaply: resolved path, size and mtime (ns)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(kind: str, sources: Sequence[str | os.PathLike], params: Mapping[str, Any]) -> str:
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "kind": kind,
        "sources": [file_identity(source) for source in sources],
        "params": dict(params),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:24]


def _open_entry(entry: Path) -> CachedImages | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
    except (OSError, ValueError):
        return None  # damaged entry: rebuild it
    if meta.get("version") != CACHE_FORMAT_VERSION or images.shape[0] != labels.shape[0]:
        return None
    return CachedImages(images=images, labels=labels, meta=meta, path=entry, hit=True)


def _remove_stale_staging(folder: Path, entry_name: str, older_than_s: float = 3600.0) -> None:
    """Remove staging folders of crashed builds (old enough not to belong to a running build)."""
    now = time.time()
    for stale in folder.glob(f".tmp-{entry_name}-*"):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def load_or_build(
    kind: str,
    sources: Sequence[str | os.PathLike],
    params: Mapping[str, Any],
    build: Callable[[], tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    *,
    root: str | os.PathLike | None = None,
) -> CachedImages:
    """Return the cached entry for (kind, sources, params), calling ``build`` on a miss.

    ``build`` returns ``(images uint8 [n,H,W,C], labels int64 [n], meta)``; ``meta``
    must be JSON-serialisable (class names etc.). ``root`` defaults to
    ``engine.paths.cache_dir()``.
    """
    base = Path(root) if root is not None else cache_dir()
    folder = base / "datasets"
    entry = folder / f"{kind}-{cache_key(kind, sources, params)}"
    cached = _open_entry(entry)
    if cached is not None:
        return cached
    images, labels, meta = build()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=folder))
    try:
        np.save(staging / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
        np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
        full_meta = {**meta, "version": CACHE_FORMAT_VERSION, "kind": kind, "params": dict(params)}
        (staging / "meta.json").write_text(json.dumps(full_meta))
        if entry.exists():  # damaged or concurrent entry: replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(staging, entry)
        except OSError:
            if _open_entry(entry) is None:  # another process won the race with a good entry otherwise
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_staging(folder, entry.name)
    reopened = _open_entry(entry)
    if reopened is None:
        raise OSError(f"the decoded cache entry {entry} could not be read back after writing it")
    return CachedImages(reopened.images, reopened.labels, reopened.meta, entry, hit=False)
