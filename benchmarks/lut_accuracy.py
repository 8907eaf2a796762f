"""Layer-wise latency LUT on the local CPU vs an OFA-style MLP predictor (H-Meta-NAS Table 3).

1. Build the LUT of the whole VGG9 Omniglot search space (28x28x1, 20-way, 5x5 pool; ``--backbone
   resnet12`` and ``--shape miniimagenet`` (84x84x3, 5-way) choose another): every
   distinct layer timed as TorchScript; on the CPU, then every layer timed again inside chains of
   layers (``engine.latency.context``, ``--context-reps``, 0: off); then fit the per-network
   overhead on a few sub-nets. The isolated entries, fitted on the same sub-nets, are scored on
   the same test timings as the in-run baseline (``isolated_*`` keys).
2. Measure N random sub-networks end to end (extracted from a SuperNet, scripted, median of
   repeated timings) and compare with the LUT: share within ±10 %, MAPE, MSE.
3. Train the MLP predictor on end-to-end measurements of other random sub-networks and evaluate it
   on the same N test sub-networks; its build time = collecting its samples + training.

End-to-end timings on a shared machine are noisy; every figure is a median of repeated calls.
On the CPU every timed call follows a call of a fixed reference convolution
(``engine.latency.measure.SpeedReference``), and the headline figures compare table and sub-nets
at one reference speed; the same timings' raw medians are scored too (``raw_*`` keys), so the
effect of the correction is measured in the same run. ``--no-speed-reference`` times without it.
The last stdout line is one JSON object.

    python benchmarks/lut_accuracy.py [--quick] [--threads 1] [--subnets 1000] [--device cuda]

``--device cuda`` does all of it on this machine's GPU (the built-in GPU device's LUT).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.latency.context import ChainTimer, refine_in_context  # noqa: E402
from engine.latency.context import supports as supports_context  # noqa: E402
from engine.latency.lut import LatencyTable, accuracy_report, build_lut, error_metrics, fit_overhead  # noqa: E402
from engine.latency.measure import ArchTimer, LayerTimer, SpeedReference  # noqa: E402
from engine.latency.predictor import train_predictor  # noqa: E402
from engine.seeding import seed_everything  # noqa: E402
from engine.space import BACKBONES, Arch, SearchSpace  # noqa: E402
from engine.supernet import SuperNet, extract_subnet  # noqa: E402

SHAPES = {
    "omniglot": {"in_channels": 1, "image_size": 28, "num_classes": 20},
    "miniimagenet": {"in_channels": 3, "image_size": 84, "num_classes": 5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sub-nets and repeats (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every timing")
    parser.add_argument("--subnets", type=int, default=None, help="test sub-nets (default 1000, quick 60)")
    parser.add_argument(
        "--train-subnets", type=int, default=None, help="predictor samples (default 2000, quick 150)"
    )
    parser.add_argument(
        "--layer-repeats", type=int, default=None, help="timed calls per layer (default 10, quick 10)"
    )
    parser.add_argument(
        "--net-repeats", type=int, default=None, help="timed calls per sub-net (default 30, quick 15)"
    )
    parser.add_argument(
        "--fit-subnets", type=int, default=10, help="sub-nets timed whole to fit the overhead terms"
    )
    parser.add_argument(
        "--context-reps",
        type=int,
        default=2,
        help="CPU: chains each layer is timed in after its isolated timing (0: isolated entries only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="vgg9",
        help="search space (resnet12: no in-context phase, its blocks are not chains of table layers)",
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="omniglot",
        help="input and classes: omniglot 28x28x1 20-way, miniimagenet 84x84x3 5-way",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where layers and sub-nets run"
    )
    parser.add_argument(
        "--no-speed-reference",
        action="store_true",
        help="time without the interleaved reference call (always off on cuda)",
    )
    parser.add_argument(
        "--reference-channels",
        type=int,
        default=32,
        help="channels of the reference convolution (cost vs tracking)",
    )
    args = parser.parse_args()
    use_reference = args.device == "cpu" and not args.no_speed_reference
    subnets = args.subnets or (60 if args.quick else 1000)
    train_subnets = args.train_subnets or (150 if args.quick else 2000)
    layer_repeats = args.layer_repeats or 10
    net_repeats = args.net_repeats or (15 if args.quick else 30)

    rngs = seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    space = getattr(SearchSpace, args.backbone)(**SHAPES[args.shape], pool_size=5)
    supernet = SuperNet(space).eval()
    reference = SpeedReference(args.reference_channels) if use_reference else None
    layer_timer = LayerTimer(
        repeats=layer_repeats, warmup=3, threads=args.threads, device=args.device, speed_reference=reference
    )
    arch_timer = ArchTimer(
        space,
        network_fn=lambda arch: extract_subnet(supernet, arch),
        repeats=net_repeats,
        warmup=5,
        threads=args.threads,
        device=args.device,
        speed_reference=reference,
        reference_base_ms=layer_timer.base_ms() if reference is not None else None,
    )
    # The raw medians of the same timings, keyed like the table and by sub-net, for the raw_* figures.
    raw_entries: dict[str, float] = {}
    raw_networks: dict[str, list[float]] = {}

    def measure_layer(spec) -> float:
        stats = layer_timer.stats(spec)
        raw_entries[spec.key] = max(stats.median_ms, layer_timer.min_ms)
        return layer_timer.entry_ms(stats)

    def measure_network(arch: Arch) -> float:
        stats = arch_timer.stats(arch)
        raw_networks.setdefault(arch.to_json(), []).append(stats.median_ms)
        return arch_timer.figure_ms(stats)

    print(
        f"{args.backbone} {args.shape} space: {space.size():.3g} archs, "
        f"{len(space.all_layer_specs())} distinct layers"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}"
        + (f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    )

    # 1. LUT build (layers + overhead fit).
    started = time.perf_counter()
    table = build_lut(space, measure_layer, device=args.device, metadata=layer_timer.metadata())
    layers_s = time.perf_counter() - started
    isolated = table.copy()
    context = None
    if args.context_reps > 0 and args.device == "cpu" and supports_context(space):
        chain_timer = ChainTimer(
            threads=args.threads,
            speed_reference=reference,
            reference_base_ms=layer_timer.base_ms() if reference is not None else None,
        )
        context = refine_in_context(
            space, table, chain_timer, rngs.child(5).numpy, repeats_per_key=args.context_reps
        )
    fit_rngs = rngs.child(1)
    fit_archs = [space.sample(fit_rngs.numpy) for _ in range(args.fit_subnets)]
    fit_measured = [(arch, measure_network(arch)) for arch in fit_archs]
    fit_overhead(space, table, fit_measured)
    lut_build_s = time.perf_counter() - started
    fit_overhead(space, isolated, fit_measured)
    raw_table = LatencyTable(device=args.device, entries=raw_entries)
    fit_overhead(space, raw_table, [(arch, raw_networks[arch.to_json()][0]) for arch in fit_archs])
    if reference is not None:
        print(f"speed reference: {reference.description}, base {layer_timer.base_ms():.4f} ms")
    print(
        f"LUT: {len(table)} entries, layers {layers_s:.2f} s (+ overhead fit = {lut_build_s:.2f} s), "
        f"overhead {table.overhead_ms * 1e3:.2f} us, fresh TorchScript compiles {layer_timer.fresh_compiles}"
    )
    if context is not None:
        print(
            f"in context: {context['chains']} chains, each layer in >= {context['repeats_per_key']} of them, "
            f"{context['build_s']:.2f} s; entries a median {context['median_ratio_to_isolated']:.3f}x their isolated timing"
        )

    # 2. LUT accuracy on random sub-nets.
    started = time.perf_counter()
    report = accuracy_report(space, table, measure_network, subnets, rngs.child(2))
    accuracy_s = time.perf_counter() - started
    measured = [s["measured_ms"] for s in report["samples"]]
    # Noise floor: the same sub-nets timed a second time. The LUT cannot agree with one timing of a
    # sub-net better than two timings of it agree with each other.
    remeasured = [measure_network(Arch.from_dict(s["arch"])) for s in report["samples"]]
    noise = error_metrics(remeasured, measured)
    # The same timings' raw medians (a key timed twice keeps both, in order: first, then again).
    test_keys = [Arch.from_dict(s["arch"]).to_json() for s in report["samples"]]
    raw_measured = [raw_networks[key][-2] for key in test_keys]
    raw_remeasured = [raw_networks[key][-1] for key in test_keys]
    raw = error_metrics(
        [raw_table.predict(space, Arch.from_dict(s["arch"])) for s in report["samples"]], raw_measured
    )
    raw_noise = error_metrics(raw_remeasured, raw_measured)
    isolated_metrics = error_metrics(
        [isolated.predict(space, Arch.from_dict(s["arch"])) for s in report["samples"]], measured
    )
    if reference is not None:
        print(
            f"raw medians of the same timings: LUT within ±10 % {100 * raw['within_10pct']:.1f} %, "
            f"MAPE {raw['mape']:.2f} %; noise floor within ±10 % {100 * raw_noise['within_10pct']:.1f} %, "
            f"MAPE {raw_noise['mape']:.2f} %"
        )
    print(
        f"LUT vs {subnets} measured sub-nets ({accuracy_s:.1f} s): within ±10 % {100 * report['within_10pct']:.1f} %, "
        f"MAPE {report['mape']:.2f} %, MSE {report['mse']:.3g} ms² "
        f"(sub-net latency median {statistics.median(measured):.3f} ms, range {min(measured):.3f}-{max(measured):.3f})"
    )
    if context is not None:
        print(
            f"isolated entries only (same fit, same timings): within ±10 % "
            f"{100 * isolated_metrics['within_10pct']:.1f} %, MAPE {isolated_metrics['mape']:.2f} %"
        )
    print(
        f"noise floor (same sub-nets timed again): within ±10 % {100 * noise['within_10pct']:.1f} %, "
        f"MAPE {noise['mape']:.2f} %, MSE {noise['mse']:.3g} ms²"
    )
    # Baseline calibration in the same run: one constant (the median residual of the same fit
    # networks) instead of fit_overhead's per-network + per-layer terms, same table and sub-nets.
    residuals = table.metadata["overhead_fit"]["residuals_ms"]
    constant = LatencyTable.from_dict(
        {**table.to_dict(), "overhead_ms": statistics.median(residuals), "per_layer_ms": 0.0}
    )
    constant_metrics = error_metrics(
        [constant.predict(space, Arch.from_dict(s["arch"])) for s in report["samples"]], measured
    )
    print(
        f"fit: overhead {table.overhead_ms * 1e3:.2f} us + {table.per_layer_ms * 1e3:.2f} us per layer; "
        f"a single constant ({constant.overhead_ms * 1e3:.2f} us) instead: within ±10 % "
        f"{100 * constant_metrics['within_10pct']:.1f} %, MAPE {constant_metrics['mape']:.2f} %"
    )

    # 3. OFA-style predictor: collect measured sub-nets, train, test on the same sub-nets.
    started = time.perf_counter()
    train_rngs = rngs.child(3)
    train_archs = [space.sample(train_rngs.numpy) for _ in range(train_subnets)]
    train_ms = [measure_network(arch) for arch in train_archs]
    collect_s = time.perf_counter() - started
    predictor = train_predictor(
        space, train_archs, train_ms, rngs=rngs.child(4), epochs=150 if args.quick else 200
    )
    predictor_build_s = time.perf_counter() - started
    test_archs = [Arch.from_dict(s["arch"]) for s in report["samples"]]
    predicted = [float(v) for v in predictor.predict_many(test_archs)]
    predictor_metrics = error_metrics([max(p, 1e-9) for p in predicted], measured)
    print(
        f"MLP predictor: {train_subnets} samples collected in {collect_s:.1f} s, trained in {predictor.train_s:.1f} s; "
        f"within ±10 % {100 * predictor_metrics['within_10pct']:.1f} %, MAPE {predictor_metrics['mape']:.2f} %, "
        f"MSE {predictor_metrics['mse']:.3g} ms²"
    )
    lut_mse = report["mse"]
    print(
        f"Table 3 (this machine): LUT MSE {lut_mse:.3g} in {lut_build_s:.2f} s | predictor MSE "
        f"{predictor_metrics['mse']:.3g} in {predictor_build_s:.1f} s"
    )
    result = {
        "lut_build_s": round(lut_build_s, 3),
        "lut_layers_s": round(layers_s, 3),
        "lut_entries": len(table),
        "overhead_ms": table.overhead_ms,
        "per_layer_ms": table.per_layer_ms,
        "within_10pct": report["within_10pct"],
        "mape": report["mape"],
        "mse": lut_mse,
        "predictor_mse": predictor_metrics["mse"],
        "predictor_mape": predictor_metrics["mape"],
        "predictor_within_10pct": predictor_metrics["within_10pct"],
        "predictor_build_s": round(predictor_build_s, 3),
        "predictor_samples": train_subnets,
        "subnets": subnets,
        "fit_subnets": args.fit_subnets,
        "median_subnet_ms": statistics.median(measured),
        "noise_within_10pct": noise["within_10pct"],
        "noise_mape": noise["mape"],
        "context_reps": args.context_reps if context is not None else 0,
        "context_chains": context["chains"] if context is not None else 0,
        "context_build_s": round(context["build_s"], 3) if context is not None else 0.0,
        "isolated_within_10pct": isolated_metrics["within_10pct"],
        "isolated_mape": isolated_metrics["mape"],
        "constant_fit_within_10pct": constant_metrics["within_10pct"],
        "constant_fit_mape": constant_metrics["mape"],
        "speed_reference": reference is not None,
        "reference_base_ms": layer_timer.base_ms() if reference is not None else None,
        "reference_channels": args.reference_channels if reference is not None else None,
        "raw_within_10pct": raw["within_10pct"],
        "raw_mape": raw["mape"],
        "raw_noise_within_10pct": raw_noise["within_10pct"],
        "raw_noise_mape": raw_noise["mape"],
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "layer_repeats": layer_repeats,
        "net_repeats": net_repeats,
        "quick": args.quick,
        "seed": args.seed,
        "backbone": args.backbone,
        "shape": args.shape,
    }
    print(json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
