"""The OFA-style MLP latency predictor."""

from __future__ import annotations

import numpy as np
import pytest

from engine.latency.lut import build_lut
from engine.latency.predictor import PredictorError, encode_arch, train_predictor
from engine.seeding import make_rngs
from engine.space import SearchSpace


def test_encoding_is_one_hot_per_choice_and_canonical():
    space = SearchSpace.vgg9()
    arch = space.sample(make_rngs(0).numpy)
    code = encode_arch(space, arch)
    choices = space.choices()
    assert code.shape == (sum(len(options) for _, _, options in choices),)
    assert code.sum() == len(choices)
    shallow = arch.with_depth(1)
    changed_unused = shallow.with_layer(3, kernel=1 if shallow.layers[3].kernel != 1 else 5)
    assert np.array_equal(encode_arch(space, shallow), encode_arch(space, changed_unused))


def test_predictor_learns_a_lut_defined_latency():
    space = SearchSpace.vgg9(image_size=16, num_classes=5)
    table = build_lut(space, lambda spec: 0.01 + spec.macs() * 1e-6)
    rngs = make_rngs(7)
    archs = [space.sample(rngs.numpy) for _ in range(200)]
    latencies = [table.predict(space, arch) for arch in archs]
    predictor = train_predictor(
        space, archs[:160], latencies[:160], rngs=rngs, hidden=64, epochs=120, batch_size=32
    )
    test = np.array(latencies[160:])
    mse = float(np.mean((predictor.predict_many(archs[160:]) - test) ** 2))
    assert mse < 0.25 * float(np.var(test))  # far better than predicting the mean
    assert predictor.val_mse is not None and predictor.train_s > 0
    assert isinstance(predictor.predict(archs[0]), float)


def test_predictor_training_is_reproducible_and_validates():
    space = SearchSpace.vgg9(image_size=16, num_classes=5)
    rngs = make_rngs(1)
    archs = [space.sample(rngs.numpy) for _ in range(20)]
    latencies = [float(i) for i in range(20)]
    a = train_predictor(space, archs, latencies, rngs=make_rngs(5), hidden=16, epochs=5)
    b = train_predictor(space, archs, latencies, rngs=make_rngs(5), hidden=16, epochs=5)
    assert np.allclose(a.predict_many(archs), b.predict_many(archs))
    with pytest.raises(PredictorError, match="at least two"):
        train_predictor(space, archs[:1], latencies[:1], rngs=rngs)
