"""Meta-training, evaluation and adaption on Mini-ImageNet and CIFAR-FS: small learnable synthetic
data in their real on-disk formats (the images themselves are not redistributable)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.adaption import AdaptionRequest, run_adaption
from engine.data import CIFAR100_NORMALIZATION, IMAGENET_NORMALIZATION
from engine.data.registry import split_class_counts
from engine.meta.runs import RunSpec, RunSpecError, check_dataset
from engine.meta.service import RUN_FILE, execute_meta_training
from engine.meta.train import CHECKPOINT_NAME
from engine.metanas.service import MetaNasRunError, MetaNasRunSpec, execute_metanas_training
from engine.search.package import read_model_card
from tests.engine._data_builders import cifar100_names, write_cifar100, write_mini_imagenet

WAYS = 3


def write_cifar_fs_splits(data: Path, classes_per_split: dict[str, int]) -> None:
    """CIFAR-FS split files ([superclass, fine class] pairs) over the first fine classes."""
    fine_names, coarse_names, fine_to_coarse = cifar100_names()
    pairs = [[coarse_names[fine_to_coarse[i]], fine_names[i]] for i in range(len(fine_names))]
    (data / "cifar-fs" / "splits").mkdir(parents=True)
    start = 0
    for split, count in classes_per_split.items():
        (data / "cifar-fs" / "splits" / f"{split}.json").write_text(json.dumps(pairs[start : start + count]))
        start += count


@pytest.fixture()
def data_dir(tmp_path, monkeypatch) -> Path:
    data = tmp_path / "data"
    write_mini_imagenet(
        data, {"train": 5, "val": 3, "test": 3}, per_class=6, per_class_folders=True, learnable=True
    )
    write_cifar100(data / "cifar-100-python", per_class=(5, 1), learnable=True)
    write_cifar_fs_splits(data, {"train": 6, "val": 3, "test": 3})
    monkeypatch.setenv("NASWEB_DATA_DIR", str(data))
    monkeypatch.setenv("NASWEB_CACHE_DIR", str(tmp_path / "cache"))
    return data


@pytest.mark.parametrize(
    ("dataset", "shape", "normalization"),
    [
        ("mini-imagenet", [1, 3, 84, 84], IMAGENET_NORMALIZATION),
        ("cifar-fs", [1, 3, 32, 32], CIFAR100_NORMALIZATION),
    ],
)
def test_meta_training_evaluation_and_adaption_on_natural_image_datasets(
    data_dir, tmp_path, dataset, shape, normalization
):
    previous = torch.get_num_threads()
    spec = RunSpec(
        dataset=dataset, ways=WAYS, shots=1, backbone="vgg9", preset="tiny", iterations=48, threads=1
    )
    out = tmp_path / "run"
    summary = execute_meta_training(spec, out, eval_tasks=60)
    assert torch.get_num_threads() == previous
    assert json.loads((out / RUN_FILE).read_text())["spec"]["dataset"] == dataset
    # Chance is 1/3. The classes are distinct colour patterns: well above chance only if every image
    # reaches the net with its own class's label, in the right layout and normalisation.
    assert summary["test"]["tasks"] == 60 and summary["test"]["mean"] > 0.6, summary["test"]

    request = AdaptionRequest(
        supernet=str(out / CHECKPOINT_NAME),
        constraint="params",
        budgets=(1e9,),
        preset="tiny",
        test_tasks=10,
        random_baseline=False,
        export_onnx=False,
    )
    result = run_adaption(request, out_dir=tmp_path / "adapted")
    (outcome,) = result.outcomes
    card = read_model_card(Path(outcome.package))
    pre = card["preprocessing"]
    assert pre["input_shape"] == shape and pre["invert"] is False
    assert pre["mean"] == pytest.approx(list(normalization.mean))
    assert pre["std"] == pytest.approx(list(normalization.std))
    assert card["accuracy"]["tasks"] == 10 and card["accuracy"]["dataset"] == dataset


def test_split_class_counts_read_the_split_files_only(data_dir):
    assert split_class_counts("mini-imagenet") == {"train": 5, "val": 3, "test": 3}
    assert split_class_counts("cifar-fs") == {"train": 6, "val": 3, "test": 3}
    assert split_class_counts("omniglot") is None
    (data_dir / "fc100" / "splits").mkdir(parents=True)
    _, coarse_names, _ = cifar100_names()
    for split, names in {
        "train": coarse_names[:12],
        "val": coarse_names[12:16],
        "test": coarse_names[16:],
    }.items():
        (data_dir / "fc100" / "splits" / f"{split}.json").write_text(json.dumps(names))
    assert split_class_counts("fc100") == {"train": 60, "val": 20, "test": 20}  # 5 fine classes each


def test_runs_needing_more_classes_or_missing_files_are_refused_before_anything_is_written(
    data_dir, tmp_path
):
    out = tmp_path / "run"
    too_wide = RunSpec(dataset="mini-imagenet", ways=4, shots=1, backbone="vgg9", preset="tiny")
    with pytest.raises(RunSpecError, match="mini-imagenet's val split has 3 classes; 4-way tasks need 4"):
        execute_meta_training(too_wide, out)
    assert not out.exists()
    check_dataset("mini-imagenet", 3)
    for victim in (data_dir / "mini-imagenet" / "images", data_dir / "cifar-100-python" / "meta"):
        if victim.is_dir():
            victim.rename(victim.with_name("elsewhere"))
        else:
            victim.unlink()
    with pytest.raises(RunSpecError, match="Mini-ImageNet images not found"):
        execute_meta_training(too_wide.with_(ways=3), out)
    with pytest.raises(RunSpecError, match="CIFAR-100 not found for cifar-fs"):
        check_dataset("cifar-fs", 3)
    assert not out.exists()


def test_metanas_meta_trains_and_evaluates_on_cifar_fs(data_dir, tmp_path):
    spec = MetaNasRunSpec(dataset="cifar-fs", ways=WAYS, shots=1, preset="tiny", meta_epochs=4)
    summary = execute_metanas_training(spec, tmp_path / "metanas", eval_tasks=12, measure_device=None)
    accuracy = summary["test"]
    assert accuracy["tasks"] == 12 and accuracy["dataset"] == "cifar-fs" and accuracy["mean"] > 0.6, accuracy
    with pytest.raises(MetaNasRunError, match="cifar-fs's val split has 3 classes; 4-way tasks need 4"):
        execute_metanas_training(replace(spec, ways=4), tmp_path / "x")
    assert not (tmp_path / "x").exists()
