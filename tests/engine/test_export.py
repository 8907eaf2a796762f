"""TorchScript and ONNX export of extracted sub-nets and baselines, with round trips."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine.baselines import maml_omniglot
from engine.export import (
    export_onnx,
    export_torchscript,
    onnx_roundtrip_error,
    run_onnx,
    torchscript_roundtrip_error,
)
from engine.seeding import make_rngs
from engine.space import SearchSpace
from engine.supernet import SuperNet, extract_subnet

# One intra-op thread: the CI box has 2 cores shared with other jobs, where extra threads only contend.
torch.set_num_threads(1)

SPACES = {
    "vgg9": SearchSpace.vgg9(),
    "resnet12": SearchSpace.resnet12(image_size=28),
    "vgg9_pool1": SearchSpace.vgg9(in_channels=3, image_size=32, num_classes=5, pool_size=1),
}
N_ARCHS = 3


@pytest.fixture(scope="module")
def supernets() -> dict[str, SuperNet]:
    torch.manual_seed(0)
    nets = {}
    for name, space in SPACES.items():
        net = SuperNet(space, bn_steps=2).train()
        with torch.no_grad():  # non-trivial running statistics for step 1
            net(
                torch.randn(8, space.in_channels, space.image_size, space.image_size) + 1.0,
                space.largest(),
                step=1,
            )
        nets[name] = net.eval()
    return nets


def _input(space: SearchSpace, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, space.in_channels, space.image_size, space.image_size, generator=generator)


@pytest.mark.parametrize(("name", "index"), [(n, i) for n in SPACES for i in range(N_ARCHS)])
def test_subnet_round_trips_through_torchscript_and_onnx(supernets, tmp_path, name, index):
    space = SPACES[name]
    rng = make_rngs(1000 + index).numpy
    arch = space.largest().with_depth(space.max_depth - 1) if index == 0 else space.sample(rng)
    sub = extract_subnet(supernets[name], arch, step=1)
    example = _input(space, 2, index)
    ts_path = export_torchscript(sub, tmp_path / "model.pt", example)
    onnx_path = export_onnx(sub, tmp_path / "model.onnx", example)
    # A different batch size than the example: the batch axis is dynamic in both formats.
    x = _input(space, 5, 100 + index)
    assert torchscript_roundtrip_error(sub, ts_path, x) <= 1e-5
    assert onnx_roundtrip_error(sub, onnx_path, x) <= 1e-4
    assert run_onnx(onnx_path, x).shape == (5, space.num_classes)


def test_torchscript_loads_in_a_process_that_never_imports_engine(supernets, tmp_path):
    space = SPACES["resnet12"]
    arch = space.sample(make_rngs(7).numpy)
    sub = extract_subnet(supernets["resnet12"], arch)
    x = _input(space, 3, 0)
    path = export_torchscript(sub, tmp_path / "resnet.pt", x)
    with torch.no_grad():
        expected = sub(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        model = torch.jit.load({str(path)!r})
        out = model(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))).detach().numpy()
        np.save({str(tmp_path / "out.npy")!r}, out)
        assert not any(name == "engine" or name.startswith("engine.") for name in sys.modules), "engine imported"
        """
    )
    # cwd=tmp_path and a clean PYTHONPATH: the engine package is not even importable there.
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_baseline_exports(tmp_path):
    net = maml_omniglot(bn_steps=2).eval()
    plain = net.extract(step=1)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    export_torchscript(plain, tmp_path / "maml.pt", x)
    export_onnx(plain, tmp_path / "maml.onnx", x)
    assert torchscript_roundtrip_error(plain, tmp_path / "maml.pt", x) <= 1e-5
    assert onnx_roundtrip_error(plain, tmp_path / "maml.onnx", x) <= 1e-4
    with torch.no_grad():
        np.testing.assert_allclose(
            run_onnx(tmp_path / "maml.onnx", x), net(x, step=1).numpy(), rtol=1e-4, atol=1e-5
        )
