"""Exact cost model: architecture-only params/MACs equal counts over the real modules."""

from __future__ import annotations

import pytest
import torch

from engine.baselines import maml_miniimagenet, maml_omniglot
from engine.cost import arch_macs, arch_params, count_macs, count_params
from engine.seeding import make_rngs
from engine.space import SearchSpace
from engine.supernet import SuperNet, extract_subnet

# One intra-op thread: the CI box has 2 cores shared with other jobs, where extra threads only contend.
torch.set_num_threads(1)

SPACES = {
    "vgg9": SearchSpace.vgg9(),
    "vgg9_mini_pool1": SearchSpace.vgg9(in_channels=3, image_size=84, num_classes=5, pool_size=1),
    "resnet12": SearchSpace.resnet12(),
    "resnet12_no_ge": SearchSpace.resnet12(image_size=32, num_classes=5, global_expansion=False),
}
N_ARCHS = 10


@pytest.fixture(scope="module")
def supernets() -> dict[str, SuperNet]:
    torch.manual_seed(0)
    return {name: SuperNet(space).eval() for name, space in SPACES.items()}


def _archs(name: str):
    space = SPACES[name]
    rng = make_rngs(123).numpy
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(N_ARCHS - 2)]


@pytest.mark.parametrize(("name", "index"), [(name, index) for name in SPACES for index in range(N_ARCHS)])
def test_cost_model_equals_counted_module(supernets, name, index):
    space, net = SPACES[name], supernets[name]
    arch = _archs(name)[index]
    sub = extract_subnet(net, arch)
    shape = (space.in_channels, space.image_size, space.image_size)
    assert arch_params(space, arch) == count_params(sub)
    macs = arch_macs(space, arch)
    assert macs == count_macs(sub, shape)
    # The hooks also understand the elastic ops, so the super-net itself agrees.
    assert macs == count_macs(net, shape, forward_kwargs={"arch": arch})


def test_largest_vgg9_by_hand():
    space = SearchSpace.vgg9()
    arch = space.largest()  # kernel 5, width 2.25 (144 channels) everywhere, 4 layers
    convs = 1 * 144 * 25 + 3 * 144 * 144 * 25
    bn = 4 * 2 * 144
    head = 144 * 25 * 20 + 20
    assert arch_params(space, arch) == convs + bn + head
    macs = 14 * 14 * 144 * 1 * 25 + (7 * 7 + 4 * 4 + 2 * 2) * 144 * 144 * 25 + 144 * 25 * 20
    assert arch_macs(space, arch) == macs


def test_baseline_macs_count_conv_and_linear_only():
    def conv(size, cin, cout):
        return size * size * cout * cin * 9

    omniglot = conv(28, 1, 64) + conv(14, 64, 64) + conv(7, 64, 64) + conv(3, 64, 64) + 64 * 20
    mini = conv(84, 3, 48) + conv(42, 48, 48) + conv(21, 48, 48) + conv(10, 48, 48) + 48 * 25 * 5
    assert count_macs(maml_omniglot(), (1, 28, 28)) == omniglot == 9_816_320
    assert count_macs(maml_miniimagenet(), (1, 3, 84, 84)) == mini == 56_947_056


def test_count_macs_leaves_the_module_untouched():
    net = maml_omniglot(bn_steps=2).train()
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    count_macs(net, (1, 28, 28))
    assert net.training
    for name, buffer in net.named_buffers():
        assert torch.equal(buffer, before[name])
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(net, (2, 1, 28, 28))


def test_count_params_counts_shared_tensors_once():
    net = maml_omniglot()
    assert count_params(torch.nn.Sequential(net, net)) == count_params(net)
