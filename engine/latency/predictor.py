"""An OFA-style MLP latency predictor: the baseline of the paper's Table 3.

Once-for-all encodes an architecture as the concatenation of one-hot vectors, one per
architectural choice, and regresses the target with a small MLP (3 hidden layers of 400 units,
ReLU). H-Meta-NAS compares such a predictor, trained on end-to-end measurements of sampled
sub-networks, against the layer-wise lookup table, on estimation error and on the total time to
collect the samples and build the estimator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from engine.seeding import Rngs
    from engine.space import Arch, SearchSpace


class PredictorError(ValueError):
    """Unusable training data or settings for the latency predictor."""


def _choice_value(arch: Arch, where: int | str, field: str):
    if where == "depth":
        return arch.depth
    return getattr(arch.layers[where], field)


def encode_arch(space: SearchSpace, arch: Arch) -> np.ndarray:
    """One-hot per architectural choice of ``space`` (``space.choices()``), concatenated.

    The canonical form is encoded, so two archs describing the same network get the same vector.
    """
    arch = arch.canonical()
    parts = []
    for where, field, options in space.choices():
        value = _choice_value(arch, where, field)
        one_hot = np.zeros(len(options), dtype=np.float32)
        try:
            one_hot[list(options).index(value)] = 1.0
        except ValueError:
            raise PredictorError(
                f"arch value {value!r} of choice {where}/{field} is not in {options}"
            ) from None
        parts.append(one_hot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def mlp(in_features: int, hidden: int = 400, layers: int = 3) -> nn.Sequential:
    blocks: list[nn.Module] = []
    width = in_features
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    blocks.append(nn.Linear(width, 1))
    return nn.Sequential(*blocks)


@dataclass
class LatencyPredictor:
    """A trained MLP; targets are standardised latencies (ms)."""

    space: SearchSpace
    network: nn.Sequential
    target_mean: float
    target_std: float
    train_mse: float
    val_mse: float | None
    train_s: float
    epochs: int

    def predict_many(self, archs: Sequence[Arch]) -> np.ndarray:
        features = torch.from_numpy(np.stack([encode_arch(self.space, arch) for arch in archs]))
        with torch.inference_mode():
            out = self.network.eval()(features).squeeze(1).numpy()
        return out * self.target_std + self.target_mean

    def predict(self, arch: Arch) -> float:
        return float(self.predict_many([arch])[0])


def train_predictor(
    space: SearchSpace,
    archs: Sequence[Arch],
    latencies_ms: Sequence[float],
    *,
    rngs: Rngs,
    hidden: int = 400,
    layers: int = 3,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    val_fraction: float = 0.2,
) -> LatencyPredictor:
    """Fit the MLP on (arch, measured ms) pairs with Adam + MSE; keeps the best-validation weights."""
    if len(archs) != len(latencies_ms) or len(archs) < 2:
        raise PredictorError("need at least two (arch, latency) pairs of equal count")
    if not 0.0 <= val_fraction < 1.0:
        raise PredictorError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    started = time.perf_counter()
    features = torch.from_numpy(np.stack([encode_arch(space, arch) for arch in archs]))
    targets_ms = torch.tensor([float(v) for v in latencies_ms], dtype=torch.float32)
    if not torch.isfinite(targets_ms).all():
        raise PredictorError("latencies must be finite")
    order = torch.from_numpy(rngs.numpy.permutation(len(archs)))
    n_val = int(round(val_fraction * len(archs))) if val_fraction > 0 else 0
    n_val = min(n_val, len(archs) - 1)
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean = float(targets_ms[train_idx].mean())
    std = float(targets_ms[train_idx].std()) if len(train_idx) > 1 else 1.0
    std = std if std > 0 else 1.0
    targets = (targets_ms - mean) / std

    network = mlp(features.shape[1], hidden, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rngs.torch.initial_seed()) % (2**63))
        for module in network.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    optimiser = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.MSELoss()
    best_state, best_val = None, float("inf")

    def mse_ms(idx: torch.Tensor) -> float:
        with torch.no_grad():
            predicted = network(features[idx]).squeeze(1) * std + mean
            return float(((predicted - targets_ms[idx]) ** 2).mean())

    for _ in range(epochs):
        network.train()
        permutation = train_idx[torch.randperm(len(train_idx), generator=rngs.torch)]
        for start in range(0, len(permutation), batch_size):
            batch = permutation[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(network(features[batch]).squeeze(1), targets[batch])
            loss.backward()
            optimiser.step()
        if n_val:
            network.eval()
            val = mse_ms(val_idx)
            if val < best_val:
                best_val = val
                best_state = {k: v.clone() for k, v in network.state_dict().items()}
    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    return LatencyPredictor(
        space=space,
        network=network,
        target_mean=mean,
        target_std=std,
        train_mse=mse_ms(train_idx),
        val_mse=best_val if n_val else None,
        train_s=time.perf_counter() - started,
        epochs=epochs,
    )
