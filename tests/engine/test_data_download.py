"""Checked downloads against a local HTTP server (127.0.0.1 only) serving zips built here."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.data import ChecksumMismatchError, DatasetError, download_file, load_omniglot
from engine.progress import ListProgress
from tests.engine._data_builders import write_omniglot_zip


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """A server on 127.0.0.1 serving official-layout Omniglot zips; yields (base URL, folder, md5s)."""
    folder = tmp_path / "served"
    write_omniglot_zip(
        folder / "images_background.zip", "images_background", {"Alpha": 2, "Beta": 1}, drawings=3
    )
    write_omniglot_zip(
        folder / "images_evaluation.zip", "images_evaluation", {"Gamma": 2}, drawings=3, seed=1
    )
    md5s = {
        name: hashlib.md5((folder / name).read_bytes(), usedforsecurity=False).hexdigest()
        for name in ("images_background.zip", "images_evaluation.zip")
    }
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder, md5s
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_file_verifies_and_reports_progress(served, tmp_path: Path):
    base_url, folder, md5s = served
    progress = ListProgress()
    target = download_file(
        base_url + "images_background.zip",
        tmp_path / "out" / "bg.zip",
        md5=md5s["images_background.zip"],
        progress=progress,
    )
    assert target.read_bytes() == (folder / "images_background.zip").read_bytes()
    events = progress.of_kind("dataset")
    assert (
        events[0]["stage"] == "download"
        and events[-1]["current"] == events[-1]["total"] == target.stat().st_size
    )
    assert [p.name for p in target.parent.iterdir()] == ["bg.zip"]  # no temp file left


def test_checksum_mismatch_leaves_nothing(served, tmp_path: Path):
    base_url, _, _ = served
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match="expected 0{32}"):
        download_file(base_url + "images_background.zip", out / "bg.zip", md5="0" * 32)
    assert list(out.iterdir()) == []


def test_http_errors_and_bad_schemes_are_clear(served, tmp_path: Path):
    base_url, _, _ = served
    with pytest.raises(DatasetError, match="could not download .*missing.zip"):
        download_file(base_url + "missing.zip", tmp_path / "m.zip", md5="0" * 32)
    with pytest.raises(DatasetError, match="only http and https"):
        download_file("file:///etc/passwd", tmp_path / "p", md5="0" * 32)
    assert not (tmp_path / "m.zip").exists()


def test_omniglot_downloads_when_absent_then_loads(served, tmp_path: Path):
    base_url, _, md5s = served
    data = tmp_path / "data"
    progress = ListProgress()
    dataset = load_omniglot(
        "train",
        protocol="lake",
        data_dir=data,
        download=True,
        base_url=base_url,
        checksums=md5s,
        cache_root=tmp_path / "cache",
        progress=progress,
        workers=1,
    )
    assert dataset.num_classes == 3 and dataset.num_images == 9
    assert sorted(p.name for p in (data / "omniglot").iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    stages = [e["stage"] for e in progress.events]
    assert stages.index("download") < stages.index("decode")
    # A second call finds the files and does not download again.
    again = ListProgress()
    test = load_omniglot(
        "test",
        protocol="lake",
        data_dir=data,
        download=True,
        base_url=base_url + "gone/",
        checksums=md5s,
        cache_root=tmp_path / "cache",
        progress=again,
    )
    assert test.num_classes == 2 and "download" not in [e["stage"] for e in again.events]
    assert np.asarray(test.images).dtype == np.uint8


def test_omniglot_download_with_wrong_checksum_fails_cleanly(served, tmp_path: Path):
    base_url, _, md5s = served
    wrong = dict(md5s, **{"images_evaluation.zip": "f" * 32})
    data = tmp_path / "data"
    with pytest.raises(ChecksumMismatchError, match="images_evaluation.zip"):
        load_omniglot(
            "train",
            protocol="lake",
            data_dir=data,
            download=True,
            base_url=base_url,
            checksums=wrong,
            cache_root=tmp_path / "cache",
        )
    assert sorted(p.name for p in (data / "omniglot").iterdir()) == ["images_background.zip"]


@pytest.mark.parametrize(("value", "allowed"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_runs_download_missing_omniglot_unless_told_not_to(monkeypatch, value, allowed):
    from engine.paths import download_allowed

    if value is None:
        monkeypatch.delenv("NASWEB_DATA_DOWNLOAD", raising=False)
    else:
        monkeypatch.setenv("NASWEB_DATA_DOWNLOAD", value)
    assert download_allowed() is allowed
