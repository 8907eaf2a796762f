"""User datasets (class folders, as a folder or zip) and every kind of bad upload."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import (
    ArchiveLimits,
    CorruptImageError,
    DatasetError,
    EmptyClassError,
    NotEnoughClassesError,
    NotEnoughImagesError,
    TaskSampler,
    UnsafeArchiveError,
    inspect_zip,
    load_image_folder,
    load_support_set,
    safe_extract_zip,
)
from engine.progress import ListProgress
from tests.engine._data_builders import png_bytes, write_class_folders, zip_folder

CLASSES = {"cat": 6, "dog": 5, "emu": 7}


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def good_png(seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8))


def test_folder_loads_as_a_dataset_and_is_cached(tmp_path: Path):
    root = write_class_folders(tmp_path / "pets", CLASSES)
    (root / ".DS_Store").write_bytes(b"junk")  # clutter is ignored
    progress = ListProgress()
    dataset = load_image_folder(
        root, image_size=16, cache_root=tmp_path / "cache", progress=progress, workers=1
    )
    assert dataset.class_names == ("cat", "dog", "emu")
    assert dataset.class_counts.tolist() == [6, 5, 7]
    assert dataset.image_shape == (16, 16, 3) and dataset.name == "pets"
    assert progress.events[-1]["stage"] == "decode"
    # Each class was drawn with a dominant channel: check it survived decoding.
    dominant = [
        int(np.asarray(dataset.images[dataset.image_indices_of(c)]).mean(axis=(0, 1, 2)).argmax())
        for c in range(3)
    ]
    assert dominant == [0, 1, 2]
    again = ListProgress()
    cached = load_image_folder(root, image_size=16, cache_root=tmp_path / "cache", progress=again)
    assert again.events == [] and np.array_equal(np.asarray(cached.images), np.asarray(dataset.images))
    batch = TaskSampler(dataset, 3, 2, 3, 0).sample(4)
    assert batch.support_x.shape == (4, 6, 3, 16, 16)
    grey = load_image_folder(root, image_size=10, channels=1, use_cache=False)
    assert grey.image_shape == (10, 10, 1)


def test_zip_with_or_without_a_wrapping_folder(tmp_path: Path):
    root = write_class_folders(tmp_path / "pets", CLASSES)
    flat = zip_folder(root, tmp_path / "flat.zip")
    wrapped = zip_folder(root, tmp_path / "wrapped.zip", prefix="pets/")
    with zipfile.ZipFile(wrapped, "a") as archive:
        archive.writestr("__MACOSX/pets/._cat", b"resource fork")
    a = load_image_folder(flat, image_size=16, use_cache=False)
    b = load_image_folder(wrapped, image_size=16, cache_root=tmp_path / "cache")
    assert a.class_names == b.class_names == ("cat", "dog", "emu")
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))


def test_support_set_from_a_zip(tmp_path: Path):
    root = write_class_folders(tmp_path / "pets", {"cat": 2, "dog": 3})
    archive = zip_folder(root, tmp_path / "support.zip")
    support = load_support_set(archive, image_size=20, shots=2)
    assert support.x.shape == (5, 3, 20, 20) and support.x.dtype == torch.float32
    assert (
        support.y.tolist() == [0, 0, 1, 1, 1] and support.class_names == ("cat", "dog") and support.ways == 2
    )
    assert 0.0 <= float(support.x.min()) and float(support.x.max()) <= 1.0
    with pytest.raises(NotEnoughClassesError, match="exactly 3 classes, found 2"):
        load_support_set(archive, image_size=20, ways=3)
    with pytest.raises(NotEnoughImagesError, match="'cat'"):
        load_support_set(archive, image_size=20, shots=3)
    single = write_class_folders(tmp_path / "one", {"cat": 3})
    with pytest.raises(NotEnoughClassesError, match="at least 2"):
        load_support_set(single, image_size=20)


def test_fewer_images_than_shots_plus_queries_names_the_class(tmp_path: Path):
    dataset = load_image_folder(write_class_folders(tmp_path / "p", CLASSES), image_size=8, use_cache=False)
    with pytest.raises(NotEnoughImagesError, match="'dog' \\(5\\)"):
        TaskSampler(dataset, 2, 1, 5)
    with pytest.raises(NotEnoughClassesError, match="4-way"):
        TaskSampler(dataset, 4, 1, 1)


@pytest.mark.parametrize(
    ("members", "error", "message"),
    [
        ({"cat/a.png": b"this is not a png"}, CorruptImageError, "cat/a.png.*not a readable image"),
        ({"cat/notes.txt": b"hello"}, CorruptImageError, "cat/notes.txt.*not an image"),
        ({"cat/a.png": b""}, CorruptImageError, "cat/a.png.*empty"),
        ({"cat/": b"", "dog/a.png": None}, EmptyClassError, "'cat' holds no images"),
        ({"a.png": None, "dog/b.png": None}, DatasetError, "'a.png' is not inside a class folder"),
        ({"dog/x/b.png": None, "cat/a.png": None}, DatasetError, "dog/x/b.png.*nested"),
    ],
)
def test_bad_contents_name_the_file_or_class(tmp_path: Path, members, error, message):
    filled = {name: (good_png() if data is None else data) for name, data in members.items()}
    archive = zip_with(tmp_path / "bad.zip", {**filled, "emu/ok.png": good_png(1)})
    with pytest.raises(error, match=message):
        load_image_folder(archive, image_size=8, use_cache=False)
    # The same problems in a plain folder.
    folder = tmp_path / "folder"
    for name, data in filled.items():
        target = folder / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    (folder / "emu").mkdir(exist_ok=True)
    (folder / "emu" / "ok.png").write_bytes(good_png(1))
    with pytest.raises(error, match=message):
        load_image_folder(folder, image_size=8, use_cache=False)


def test_empty_class_folder_on_disk(tmp_path: Path):
    root = write_class_folders(tmp_path / "pets", {"cat": 2, "dog": 2})
    (root / "yak").mkdir()
    (root / "yak" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(EmptyClassError, match="'yak'"):
        load_image_folder(root, image_size=8, use_cache=False)


def test_oversized_image_refused_before_decoding(tmp_path: Path):
    buffer = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buffer, format="PNG")  # 6 MP, compresses to a few kB
    archive = zip_with(tmp_path / "big.zip", {"cat/huge.png": buffer.getvalue(), "dog/ok.png": good_png()})
    limits = ArchiveLimits(max_image_pixels=5_000_000)
    with pytest.raises(CorruptImageError, match="cat/huge.png.*3000x2000.*exceeds the limit of 5,000,000"):
        load_image_folder(archive, image_size=8, limits=limits, use_cache=False)


def _zip_member(name: str, data: bytes, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.external_attr = mode << 16
    return info


@pytest.mark.parametrize(
    ("name", "mode", "message"),
    [
        ("../evil.png", None, "contains '..'"),
        ("cat/../../evil.png", None, "contains '..'"),
        ("/etc/evil.png", None, "absolute path"),
        ("C:/evil.png", None, "absolute path"),
        ("cat\\..\\evil.png", None, "backslash"),
        ("cat/link.png", stat.S_IFLNK | 0o777, "symbolic link"),
        ("cat/fifo", stat.S_IFIFO | 0o644, "not a regular file"),
    ],
)
def test_unsafe_zip_members_are_refused_and_nothing_is_written(tmp_path: Path, name, mode, message):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("dog/ok.png", good_png())
        handle.writestr(_zip_member(name, b"", mode), b"/etc/passwd" if mode else good_png())
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract_zip(archive, tmp_path / "out" / "target")
    with pytest.raises(UnsafeArchiveError, match=message):
        load_image_folder(archive, image_size=8, use_cache=False)
    assert snapshot(tmp_path) - before <= {"out"}
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "target").exists()


def test_absurd_sizes_and_member_counts_are_refused(tmp_path: Path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("cat/a.png", b"\0" * 5_000_000)  # compresses to a few kB
    with pytest.raises(UnsafeArchiveError, match="uncompressed size exceeds the limit of 1,000,000"):
        inspect_zip(bomb, ArchiveLimits(max_total_bytes=1_000_000))
    with pytest.raises(UnsafeArchiveError, match="uncompressed size"):
        safe_extract_zip(bomb, tmp_path / "t", ArchiveLimits(max_total_bytes=1_000_000))
    assert not (tmp_path / "t").exists()
    many = zip_with(tmp_path / "many.zip", {f"cat/{i}.png": b"x" for i in range(30)})
    with pytest.raises(UnsafeArchiveError, match="30 members exceed the limit of 20"):
        load_image_folder(many, limits=ArchiveLimits(max_members=20), use_cache=False)
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        inspect_zip(tmp_path / "many.zip.missing")
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    with pytest.raises(UnsafeArchiveError, match="not a readable zip"):
        load_image_folder(tmp_path / "fake.zip", use_cache=False)


def test_lying_header_sizes_are_caught_while_extracting(tmp_path: Path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as handle:
        handle.writestr("cat/a.png", b"A" * 4000)
    raw = bytearray(archive.read_bytes())
    # Shrink the declared uncompressed size in the central directory to 10 bytes.
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchiveError, match="damaged zip"):
        safe_extract_zip(archive, tmp_path / "t")
    with pytest.raises(CorruptImageError, match="cat/a.png: damaged zip member"):
        load_image_folder(archive, image_size=8, use_cache=False)
    assert not (tmp_path / "t").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t.")]


def test_safe_extract_zip_extracts_into_a_new_folder_only(tmp_path: Path):
    root = write_class_folders(tmp_path / "pets", {"cat": 2, "dog": 2})
    archive = zip_folder(root, tmp_path / "pets.zip")
    target = safe_extract_zip(archive, tmp_path / "uploads" / "42")
    assert snapshot(target) == snapshot(root)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["42"]
    with pytest.raises(DatasetError, match="already exists"):
        safe_extract_zip(archive, target)
    dataset = load_image_folder(target, image_size=8, use_cache=False)
    assert dataset.class_names == ("cat", "dog")


def test_parallel_decoding_matches_serial_and_reports_errors(tmp_path: Path):
    from engine.data.imaging import ImageSource, decode_images
    from engine.progress import JobCancelled

    root = write_class_folders(tmp_path / "pets", {"cat": 9, "dog": 8})
    sources = [ImageSource(str(p)) for p in sorted(root.rglob("*.png"))]
    serial = decode_images(sources, size=(12, 12), channels=3, workers=1)
    progress = ListProgress()
    parallel = decode_images(sources, size=(12, 12), channels=3, workers=2, chunk_size=4, progress=progress)
    assert np.array_equal(serial, parallel)
    assert [e["current"] for e in progress.events] == [0, 4, 8, 12, 16, 17]
    (root / "dog" / "003.png").write_bytes(b"broken")
    with pytest.raises(CorruptImageError, match="dog/003.png"):
        decode_images(sources, size=(12, 12), channels=3, workers=2, chunk_size=4)

    def cancel_after_first_chunk(event):
        if event["current"] >= 4:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        decode_images(
            sources[:8], size=(12, 12), channels=3, workers=2, chunk_size=4, progress=cancel_after_first_chunk
        )
