"""Downloading dataset files with checksum checks.

A file is streamed into a temporary file beside its destination, its MD5 is
checked, and only then is it renamed into place; a failed or mismatching
download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from engine.atomic import atomic_write
from engine.data.errors import ChecksumMismatchError, DatasetError
from engine.progress import ProgressCallback, null_progress

#: Where the official Omniglot zips live (Lake et al.).
OMNIGLOT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
#: MD5 of the official zips (datasets-mila/datasets--omniglot checksum list; see PROVENANCE.md).
OMNIGLOT_MD5: Mapping[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}


def md5_of_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: str | os.PathLike,
    *,
    md5: str,
    progress: ProgressCallback = null_progress,
    timeout_s: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``destination`` if its MD5 equals ``md5``; return the destination.

    Raises ``ChecksumMismatchError`` (nothing is written) on a mismatch and
    ``DatasetError`` for non-HTTP(S) URLs or network failures. Reports
    ``{"kind": "dataset", "stage": "download", "file", "current", "total"}`` in bytes.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DatasetError(f"refusing to download {url!r}: only http and https URLs are allowed")
    target = Path(destination)

    def fetch(handle) -> None:
        """Stream into the temp file; a checksum mismatch raises before it replaces anything."""
        digest = hashlib.md5(usedforsecurity=False)
        try:
            response = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - scheme checked above
        except OSError as error:
            raise DatasetError(f"could not download {url}: {error}") from error
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            progress(
                {"kind": "dataset", "stage": "download", "file": target.name, "current": 0, "total": total}
            )
            while block := response.read(chunk_size):
                handle.write(block)
                digest.update(block)
                done += len(block)
                progress(
                    {
                        "kind": "dataset",
                        "stage": "download",
                        "file": target.name,
                        "current": done,
                        "total": total,
                    }
                )
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise ChecksumMismatchError(
                f"{url}: downloaded file has MD5 {actual}, expected {md5.lower()}; it was discarded"
            )

    return atomic_write(target, fetch)


def download_omniglot(
    folder: str | os.PathLike,
    *,
    base_url: str = OMNIGLOT_BASE_URL,
    checksums: Mapping[str, str] = OMNIGLOT_MD5,
    progress: ProgressCallback = null_progress,
    timeout_s: float = 60.0,
) -> list[Path]:
    """Fetch the Omniglot zips named in ``checksums`` from ``base_url`` into ``folder``.

    Files already present are kept as they are (local copies may be re-packed, as the
    shared ones are, so their MD5 is not the official one).
    """
    folder = Path(folder)
    fetched = []
    for filename, md5 in checksums.items():
        target = folder / filename
        if not target.is_file():
            url = urllib.parse.urljoin(base_url if base_url.endswith("/") else base_url + "/", filename)
            download_file(url, target, md5=md5, progress=progress, timeout_s=timeout_s)
        fetched.append(target)
    return fetched
