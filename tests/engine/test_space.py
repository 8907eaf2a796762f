"""Search spaces, architectures as data, LayerSpecs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.cost import count_macs, count_params
from engine.seeding import make_rngs
from engine.space import (
    ACTIVATIONS,
    KERNELS,
    RESNET12_WIDTHS,
    VGG9_WIDTHS,
    Arch,
    ArchError,
    LayerChoice,
    LayerSpec,
    SearchSpace,
)

# One intra-op thread: the CI box has 2 cores shared with other jobs, where extra threads only contend.
torch.set_num_threads(1)

SPACES = {
    "vgg9": SearchSpace.vgg9(),
    "vgg9_mini": SearchSpace.vgg9(in_channels=3, image_size=84, num_classes=5),
    "vgg9_no_ge_anl": SearchSpace.vgg9(global_expansion=False, adaptive_layers=False, pool_size=1),
    "resnet12": SearchSpace.resnet12(),
    "resnet12_mini": SearchSpace.resnet12(in_channels=3, image_size=84, num_classes=5),
    "resnet12_no_ge": SearchSpace.resnet12(global_expansion=False),
}


def sampled(space: SearchSpace, count: int, seed: int = 0) -> list[Arch]:
    rng = make_rngs(seed).numpy
    return [space.sample(rng) for _ in range(count)]


def test_vgg9_matches_table_7_and_the_paper_size():
    space = SearchSpace.vgg9()
    assert space.base_channels == (64, 64, 64, 64)
    assert space.strides == (2, 2, 2, 2)
    assert space.options_per_layer(0) == 3 * 7 * 6 == 126
    assert space.size() == 126**4 * 4
    assert 1.0e9 < space.size() < 1.01e9
    assert space.distinct_size() == 126 + 126**2 + 126**3 + 126**4
    assert [space.in_size(i) for i in range(5)] == [28, 14, 7, 4, 2]


def test_resnet12_matches_table_8_and_counts():
    space = SearchSpace.resnet12()
    assert space.base_channels == (32,) * 3 + (64,) * 3 + (128,) * 3 + (256,) * 3
    assert space.strides == (2, 1, 1) * 4
    assert space.widths == RESNET12_WIDTHS
    assert space.options_per_layer(5) == 3 * 6 * 6 == 108
    assert space.size() == 108**12 * 4
    # The paper's "about 2x10^24" is the distinct count, dominated by 108^12 = 2.5e24.
    assert space.distinct_size() == sum(108 ** (3 * d) for d in range(1, 5))
    assert 2.5e24 < space.distinct_size() < 2.6e24
    assert space.layer_name(4) == "block1_layer1"


def test_global_expansion_off_fixes_edge_widths_and_anl_off_fixes_depth():
    vgg = SearchSpace.vgg9(global_expansion=False, adaptive_layers=False)
    assert vgg.allowed_widths(0) == (1.0,) and vgg.allowed_widths(3) == (1.0,)
    assert vgg.allowed_widths(1) == VGG9_WIDTHS
    assert vgg.depths == (4,)
    assert vgg.size() == 18 * 126 * 126 * 18
    resnet = SearchSpace.resnet12(global_expansion=False)
    assert {i for i in range(12) if resnet.allowed_widths(i) == (1.0,)} == {0, 2, 5, 8, 11}
    for arch in sampled(vgg, 20):
        assert arch.depth == 4
        assert arch.layers[0].width == 1.0 and arch.layers[3].width == 1.0


@pytest.mark.parametrize("name", sorted(SPACES))
def test_samples_are_valid_deterministic_and_json_round_trip(name):
    space = SPACES[name]
    archs = sampled(space, 60, seed=7)
    assert archs == sampled(space, 60, seed=7)
    assert archs != sampled(space, 60, seed=8)
    for arch in archs:
        space.validate(arch)
        assert Arch.from_json(arch.to_json()) == arch
        assert Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
        assert hash(Arch.from_json(arch.to_json())) == hash(arch)
        space.validate(arch.canonical())


@pytest.mark.parametrize("name", ["vgg9", "resnet12"])
def test_sampling_reaches_every_option(name):
    space = SPACES[name]
    archs = sampled(space, 400, seed=3)
    assert {a.depth for a in archs} == set(space.depths)
    assert {layer.kernel for a in archs for layer in a.layers} == set(space.kernels)
    assert {layer.width for a in archs for layer in a.layers} == set(space.widths)
    assert {layer.activation for a in archs for layer in a.layers} == set(space.activations)


def test_canonical_identifies_networks_that_differ_only_in_unused_layers():
    space = SearchSpace.vgg9()
    arch = space.largest().with_depth(2)
    other = arch.with_layer(3, kernel=1, activation="elu")
    assert arch != other
    assert arch.canonical() == other.canonical()
    assert arch.canonical().layers[:2] == arch.layers[:2]
    assert arch.with_layer(1, kernel=1).canonical() != arch.canonical()
    assert space.layer_specs(arch) == space.layer_specs(other)


def test_largest_and_smallest():
    for space in (SearchSpace.vgg9(), SearchSpace.resnet12()):
        largest, smallest = space.largest(), space.smallest()
        space.validate(largest)
        space.validate(smallest)
        assert largest.depth == space.max_depth and smallest.depth == 1
        assert all(layer.kernel == 5 and layer.width == max(space.widths) for layer in largest.layers)
        assert smallest.layers[0].kernel == 1 and smallest.layers[0].width == min(space.widths)


def test_choices_list_every_mutable_choice():
    space = SearchSpace.vgg9()
    choices = space.choices()
    assert len(choices) == 4 * 3 + 1
    assert (0, "kernel", KERNELS) in choices
    assert (3, "width", VGG9_WIDTHS) in choices
    assert (2, "activation", ACTIVATIONS) in choices
    assert ("depth", "depth", (1, 2, 3, 4)) in choices
    fixed = SearchSpace.vgg9(global_expansion=False, adaptive_layers=False).choices()
    assert len(fixed) == 4 * 3 - 2
    assert all(not (index in (0, 3) and field == "width") for index, field, _ in fixed)
    assert len(SearchSpace.resnet12().choices()) == 12 * 3 + 1


def _arch_with(space: SearchSpace, **changes) -> Arch:
    return space.largest().with_layer(2, **changes)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"kernel": 7}, "layer 2 (layer2): kernel 7 is not one of (1, 3, 5)"),
        ({"width": 3.0}, "layer 2 (layer2): width 3.0 is not one of"),
        ({"activation": "tanh"}, "layer 2 (layer2): activation 'tanh' is not one of"),
    ],
)
def test_invalid_layer_choices_are_rejected_naming_layer_and_choice(changes, fragment):
    space = SearchSpace.vgg9()
    with pytest.raises(ArchError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        space.validate(_arch_with(space, **changes))


def test_invalid_archs_are_rejected_with_clear_messages():
    vgg, resnet = SearchSpace.vgg9(), SearchSpace.resnet12()
    with pytest.raises(ArchError, match="depth 5 is not one of"):
        vgg.validate(vgg.largest().with_depth(5))
    with pytest.raises(ArchError, match="needs 4 layers, got 3"):
        vgg.validate(Arch("vgg9", vgg.largest().layers[:3], 3))
    with pytest.raises(ArchError, match="does not match search space backbone 'resnet12'"):
        resnet.validate(vgg.largest())
    with pytest.raises(ArchError, match=r"layer 5 \(block1_layer2\): width 2.25"):
        resnet.validate(resnet.largest().with_layer(5, width=2.25))
    with pytest.raises(ArchError, match="Global Expansion is off"):
        SearchSpace.vgg9(global_expansion=False).validate(vgg.largest())
    with pytest.raises(ArchError, match="depth 3 is not one of"):
        SearchSpace.vgg9(adaptive_layers=False).validate(vgg.largest().with_depth(3))
    with pytest.raises(ArchError, match="layer 7 does not exist"):
        vgg.largest().with_layer(7, kernel=3)
    with pytest.raises(ArchError, match="unknown backbone"):
        Arch("mobilenet", (), 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "malformed"),
        ('{"backbone": "vgg9", "depth": 1}', "missing keys"),
        ('{"backbone": "vgg9", "depth": 1, "layers": [{"kernel": 3, "width": 1.0}]}', "layer 0: layer keys"),
        (
            '{"backbone": "vgg9", "depth": 1, "layers": [{"kernel": "3", "width": 1.0, "activation": "relu"}]}',
            "kernel",
        ),
        ('{"backbone": "vgg9", "depth": "2", "layers": []}', "depth must be an int"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_malformed_serialized_archs_are_rejected(text, fragment):
    with pytest.raises(ArchError, match=fragment):
        Arch.from_json(text)


def test_arch_error_is_a_value_error_and_layer_choice_normalises_width():
    assert issubclass(ArchError, ValueError)
    assert LayerChoice(3, 1, "relu") == LayerChoice(3, 1.0, "relu")
    assert LayerChoice(3, 1, "relu").to_dict()["width"] == 1.0


@pytest.mark.parametrize("name", sorted(SPACES))
def test_search_space_dict_round_trip(name):
    space = SPACES[name]
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_search_space_rejects_bad_configuration():
    with pytest.raises(ValueError, match="kernels must be odd"):
        SearchSpace(backbone="vgg9", in_channels=1, image_size=28, num_classes=5, kernels=(2, 3))
    with pytest.raises(ValueError, match="unknown backbone"):
        SearchSpace(backbone="vgg16", in_channels=1, image_size=28, num_classes=5)
    with pytest.raises(ValueError, match="unknown search space keys"):
        SearchSpace.from_dict({"backbone": "vgg9", "colour": 1})


@pytest.mark.parametrize("name", sorted(SPACES))
def test_all_layer_specs_cover_every_sampled_arch(name):
    space = SPACES[name]
    lut = space.all_layer_specs()
    keys = [spec.key for spec in lut]
    assert len(keys) == len(set(keys)), "all_layer_specs must be deduplicated"
    key_set = set(keys)
    archs = sampled(space, 150, seed=11) + [space.largest(), space.smallest()]
    used = set()
    for arch in archs:
        for spec in space.layer_specs(arch):
            assert spec.key in key_set, spec
            used.add(spec.key)
    assert len(used) > 100


def test_layer_specs_of_a_known_vgg9_arch():
    space = SearchSpace.vgg9()
    arch = Arch(
        "vgg9",
        (
            LayerChoice(3, 0.25, "relu"),
            LayerChoice(5, 2.25, "elu"),
            LayerChoice(1, 1.0, "selu"),
            LayerChoice(3, 1.0, "relu"),
        ),
        depth=3,
    )
    specs = space.layer_specs(arch)
    assert [spec.key for spec in specs] == [
        "conv|28|1|16|3|2|relu",
        "conv|14|16|144|5|2|elu",
        "conv|7|144|64|1|2|selu",
        "head|4|64|20|pool5",
    ]
    assert specs[0].params() == 1 * 16 * 9 + 2 * 16
    assert specs[1].macs() == 7 * 7 * 144 * 16 * 25
    assert specs[3].params() == 64 * 25 * 20 + 20
    assert specs[3].macs() == 64 * 25 * 20


def test_resnet12_layer_specs_include_shortcuts():
    space = SearchSpace.resnet12(in_channels=3, image_size=84, num_classes=5)
    arch = space.largest().with_depth(2)
    ops = [spec.op for spec in space.layer_specs(arch)]
    assert ops == ["conv"] * 3 + ["shortcut"] + ["conv"] * 3 + ["shortcut", "head"]
    shortcut = space.layer_specs(arch)[3]
    assert shortcut.key == "shortcut|84|3|64|1|2|"
    assert shortcut.out_size == 42


def _random_specs(count: int) -> list[LayerSpec]:
    specs = []
    for name in ("vgg9", "resnet12"):
        lut = SPACES[name].all_layer_specs()
        rng = np.random.default_rng(5)
        specs += [lut[int(i)] for i in rng.choice(len(lut), size=count, replace=False)]
    return specs


@pytest.mark.parametrize("spec", _random_specs(12), ids=lambda spec: spec.key)
def test_layer_spec_module_shape_and_cost(spec):
    module = spec.build_module()
    assert not module.training
    x = spec.example_input(batch=2)
    assert torch.equal(x, spec.example_input(batch=2))
    with torch.no_grad():
        y = module(x)
    if spec.op == "head":
        assert y.shape == (2, spec.num_classes)
    else:
        assert y.shape == (2, spec.out_channels, spec.out_size, spec.out_size)
    assert count_params(module) == spec.params()
    assert count_macs(module, spec.in_shape) == spec.macs()
    assert LayerSpec.from_dict(spec.to_dict()) == spec


def test_layer_spec_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="op must be one of"):
        LayerSpec("pool", 4, 8, 8, 1, 1)
    with pytest.raises(ValueError, match="needs an activation"):
        LayerSpec("conv", 4, 8, 8, 3, 1)
    with pytest.raises(ValueError, match="head LayerSpec"):
        LayerSpec("head", 4, 8, 10, 0, 0, pool_size=5, num_classes=20)
    with pytest.raises(ValueError, match="bad LayerSpec dict"):
        LayerSpec.from_dict({"op": "conv"})


def test_size_is_the_product_formula():
    for space in SPACES.values():
        per_layer = [space.options_per_layer(i) for i in range(space.n_layers)]
        assert space.size() == math.prod(per_layer) * len(space.depths)
        assert space.distinct_size() <= space.size()


def test_a_width_that_leaves_no_channel_is_refused():
    with pytest.raises(ValueError, match="leaves no channel"):
        SearchSpace(
            backbone="vgg9", in_channels=1, image_size=12, num_classes=3, pool_size=1,
            kernels=(3,), widths=(0.125, 0.25), activations=("relu",), base_channels=(4,) * 4, strides=(2,) * 4,
        )  # fmt: skip


def test_describe_tells_the_spaces_a_device_may_be_profiled_for_apart():
    assert SearchSpace.vgg9().describe() == "VGG9, 1×28×28 input, 20-way, 64 base channels, 5×5 pool"
    assert SearchSpace.resnet12(in_channels=3, image_size=84, num_classes=5, pool_size=1).describe() == (
        "RESNET12, 3×84×84 input, 5-way, 32/64/128/256 base channels, 1×1 pool"
    )
    plain = SearchSpace.vgg9(global_expansion=False, adaptive_layers=False)
    assert plain.describe().endswith("no global expansion, fixed depth")
    spaces = [
        SearchSpace.vgg9(num_classes=5),
        SearchSpace.vgg9(image_size=32, in_channels=3),
        SearchSpace.vgg9(),
    ]
    assert len({space.describe() for space in spaces}) == 3
