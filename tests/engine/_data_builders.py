"""Writers of small synthetic datasets in the exact on-disk formats the loaders read.

Shared by the tests/engine/test_data_*.py files (not a conftest: plain helpers).
"""

from __future__ import annotations

import csv
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def omniglot_drawing(rng: np.random.Generator, size: int = 105) -> np.ndarray:
    """A 1-bit-looking drawing: white background, a few black strokes."""
    canvas = np.full((size, size), 255, dtype=np.uint8)
    for _ in range(3):
        row, col = rng.integers(10, size - 30, size=2)
        canvas[row : row + 20, col : col + 4] = 0
        canvas[row : row + 4, col : col + 20] = 0
    return canvas


def write_omniglot_zip(
    path: Path, set_name: str, alphabets: dict[str, int], drawings: int = 20, seed: int = 0
) -> dict[str, bytes]:
    """``images_<set>/<Alphabet>/characterNN/XXXX_YY.png`` like the official zips; returns members."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    number = 1
    for alphabet, characters in alphabets.items():
        for character in range(1, characters + 1):
            for drawing in range(1, drawings + 1):
                name = f"{set_name}/{alphabet}/character{character:02d}/{number:04d}_{drawing:02d}.png"
                members[name] = png_bytes(omniglot_drawing(rng), mode="1")
            number += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return members


def write_class_folders(root: Path, classes: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` RGB images, each class with a distinct colour."""
    rng = np.random.default_rng(seed)
    for index, (class_name, count) in enumerate(classes.items()):
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
            image[..., index % 3] += np.uint8(150)
            (folder / f"{i:03d}.png").write_bytes(png_bytes(image))
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(folder).as_posix()
            if file.is_dir():
                handle.writestr(prefix + relative + "/", b"")
            else:
                handle.write(file, prefix + relative)
    return archive


def write_cifar100(
    folder: Path, per_class: tuple[int, int] = (3, 1), seed: int = 0, learnable: bool = False
) -> dict:
    """``cifar-100-python/{train,test,meta}`` pickles (bytes keys) for the real 100 classes.

    ``fine_label_names``/``coarse_label_names`` follow CIFAR-100; fine class f belongs to the
    superclass given by ``FINE_TO_COARSE``. Image pixel [0,0,0] of every image encodes its fine
    label so tests can check the regrouping. Pixels are noise, or with ``learnable`` a blocky
    prototype per fine class plus noise (a few-shot learner can tell those classes apart).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    fine_names, coarse_names, fine_to_coarse = cifar100_names()
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    # Per fine class: 3 planes of 8 x 8 blocks of 4 x 4 pixels, flattened the way CIFAR stores them.
    blocks = np.random.default_rng(seed + 2).random((100, 3, 8, 8)) * 255
    prototypes = np.kron(blocks, np.ones((1, 1, 4, 4))).reshape(100, 3072)
    for part, count in zip(("train", "test"), per_class, strict=True):
        fine = np.repeat(np.arange(100), count)
        rng.shuffle(fine)
        data = rng.integers(0, 256, size=(fine.size, 3072), dtype=np.uint8)
        if learnable:
            noise = 25 * np.random.default_rng(seed + 1).standard_normal((fine.size, 3072))
            data = np.clip(prototypes[fine] + noise, 0, 255).astype(np.uint8)
        data[:, 0] = fine  # red plane, pixel (0, 0)
        content = {
            b"filenames": [f"img{i}.png".encode() for i in range(fine.size)],
            b"batch_label": f"{part} batch".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": [fine_to_coarse[f] for f in fine.tolist()],
            b"data": data,
        }
        (folder / part).write_bytes(pickle.dumps(content, protocol=2))
    return {"fine_names": fine_names, "coarse_names": coarse_names, "fine_to_coarse": fine_to_coarse}


def cifar100_names() -> tuple[list[str], list[str], list[int]]:
    """The real CIFAR-100 fine and coarse names and the fine -> coarse map."""
    superclasses = {
        "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
        "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
        "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
        "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
        "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
        "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
        "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
        "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
        "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
        "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
        "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
        "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
        "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
        "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
        "people": ["baby", "boy", "girl", "man", "woman"],
        "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
        "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
        "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
        "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
        "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
    }
    coarse_names = sorted(superclasses)
    fine_names = sorted(name for names in superclasses.values() for name in names)
    owner = {name: coarse_names.index(sc) for sc, names in superclasses.items() for name in names}
    return fine_names, coarse_names, [owner[name] for name in fine_names]


def write_mini_imagenet(
    data: Path,
    classes_per_split: dict[str, int],
    per_class: int,
    per_class_folders: bool,
    learnable: bool = False,
) -> None:
    """images/ + splits/ravi/<split>.csv (header filename,label) with Ravi-style names. Pixels are
    noise, or with ``learnable`` a blocky colour prototype per class plus noise, so that a few-shot
    learner can tell the classes apart."""
    rng = np.random.default_rng(0)
    root = data / "mini-imagenet"
    (root / "splits" / "ravi").mkdir(parents=True)
    synset = 1000000
    for split, classes in classes_per_split.items():
        rows = []
        for _ in range(classes):
            synset += 1
            label = f"n{synset:08d}"
            if learnable:  # 84 x 84 x 3 in [0, 1]
                prototype = np.kron(rng.random((6, 6, 3)), np.ones((14, 14, 1)))
            for i in range(per_class):
                filename = f"{label}{i + 1:08d}.jpg"
                folder = root / "images" / (label if per_class_folders else "")
                folder.mkdir(parents=True, exist_ok=True)
                if learnable:
                    noisy = np.clip(prototype + 0.1 * rng.standard_normal(prototype.shape), 0, 1)
                    pixels = (255 * noisy).astype(np.uint8)
                else:
                    size = 84 if i % 2 == 0 else 100  # some need resizing
                    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                (folder / filename).write_bytes(jpeg_bytes(pixels))
                rows.append((filename, label))
        with open(root / "splits" / "ravi" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
