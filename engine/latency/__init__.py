"""Latency of sub-networks on target devices: layer-wise lookup tables (H-Meta-NAS Section 3).

- ``measure``: time one layer or one whole network with TorchScript on this machine.
- ``eyeriss``: cycle counts of a simulated Eyeriss array through scalesim's compute model.
- ``lut``: the per-device lookup table, ``predict(arch) = overhead + sum(entries)``.
- ``predictor``: an OFA-style MLP latency predictor, the baseline of the paper's Table 3.
"""
