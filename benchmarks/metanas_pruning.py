"""MetaNAS on synthetic few-shot tasks: meta-training cost, adaption cost and the effect of pruning.

Measures what Section 4 / Appendix A.1 of the MetaNAS paper claim: with soft-pruning
(temperature annealing of operation and input-combination weights) pruning by threshold
barely changes accuracy, while DARTS-style hard pruning of a model adapted without
annealing does. Uses the synthetic task source (random prototype classes), not Omniglot:
the figures are about the mechanism and its cost, not about Omniglot accuracy.

    python benchmarks/metanas_pruning.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from benchmarks._validation import mean_ci
from engine.metanas import (
    MetaNasConfig,
    SyntheticTaskSource,
    adapt_task,
    build_task_network,
    derive_genotype,
    reptile_meta_train,
)
from engine.metanas.train import accuracy
from engine.seeding import seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, 4 test tasks (under a minute)")
    parser.add_argument("--preset", default="cpu", help="MetaNAS preset when not --quick (default: cpu)")
    parser.add_argument("--tasks", type=int, default=20, help="meta-test tasks when not --quick")
    parser.add_argument("--query-shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = MetaNasConfig.preset("tiny" if args.quick else args.preset)
    num_tasks = 4 if args.quick else args.tasks
    rngs = seed_everything(args.seed)
    train_source = SyntheticTaskSource(
        n_way=config.n_way,
        shots=config.meta_train_shots,
        query_shots=args.query_shots,
        in_channels=config.in_channels,
        image_size=config.image_size,
    )
    # Meta-testing is 1-shot, as in the paper's Omniglot experiments.
    test_source = SyntheticTaskSource(
        n_way=config.n_way,
        shots=1,
        query_shots=args.query_shots,
        in_channels=config.in_channels,
        image_size=config.image_size,
    )

    started = time.perf_counter()
    report_every = max(1, config.meta_epochs // 10)

    def report(event: dict) -> None:
        if event["current"] % report_every == 0:
            print(
                f"  meta-epoch {event['current']}/{event['total']} ({event['phase']}): "
                f"query accuracy {event['query_accuracy']:.3f}, {event['seconds']:.2f} s/epoch",
                flush=True,
            )

    meta = reptile_meta_train(config, train_source, rngs=rngs.child(1), progress=report)
    meta_seconds = time.perf_counter() - started
    late = meta.history[-max(1, len(meta.history) // 10) :]
    print(
        f"preset {config.name}: {config.meta_epochs} meta-epochs ({config.warmup_epochs} warm-up) in {meta_seconds:.1f} s"
    )
    print(
        f"  meta-train query accuracy, last {len(late)} epochs: {statistics.fmean(h['query_accuracy'] for h in late):.3f}"
    )

    dense_config = config.replace(temperature_min=config.temperature_max)
    rows = []
    test_rngs = rngs.child(2)
    for task in range(num_tasks):
        batch = test_source(1, test_rngs.child(2 * task))
        support_x, support_y, query_x, query_y = (
            t[0] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        )
        soft = adapt_task(meta, support_x, support_y, rngs=test_rngs.child(2 * task + 1))
        evaluated = soft.evaluate(query_x, query_y)
        dense = adapt_task(meta, support_x, support_y, dense_config, rngs=test_rngs.child(2 * task + 1))
        hard = derive_genotype(dense.one_shot, dense.temperature, config.prune_threshold, strongest_only=True)
        with torch.no_grad():
            hard_accuracy = accuracy(build_task_network(dense.one_shot, hard)(query_x), query_y)
        dense_accuracy = accuracy(dense.one_shot_logits(query_x), query_y)
        x = query_x[: min(len(query_x), config.n_way)]
        latency = []
        for _ in range(5):
            t0 = time.perf_counter()
            soft.predict(x)
            latency.append(time.perf_counter() - t0)
        rows.append(
            {
                **evaluated,
                "dense_one_shot_accuracy": dense_accuracy,
                "dense_hard_pruned_accuracy": hard_accuracy,
                "adapt_seconds": soft.adapt_seconds,
                "num_parameters": soft.num_parameters,
                "one_shot_parameters": soft.one_shot_parameters,
                "kept_operations": soft.genotype.kept_operation_count(),
                "latency_ms": 1000 * min(latency),
            }
        )

    def summary(key: str) -> tuple[float, float]:
        return mean_ci([row[key] for row in rows])

    print(f"meta-test: {num_tasks} tasks, {config.n_way}-way 1-shot, {args.query_shots} queries per class")
    for key, label in (
        ("one_shot_accuracy", "soft-pruned one-shot accuracy"),
        ("pruned_accuracy", "after pruning by threshold"),
        ("pruning_drop", "  drop"),
        ("dense_one_shot_accuracy", "no annealing, one-shot accuracy"),
        ("dense_hard_pruned_accuracy", "no annealing, DARTS hard-pruned"),
        ("adapt_seconds", "adaption seconds per task"),
        ("latency_ms", f"pruned model latency ms (batch {config.n_way})"),
    ):
        mean, ci = summary(key)
        print(f"  {label:<44} {mean:8.3f} ± {ci:.3f}")
    print(
        f"  parameters: pruned {statistics.fmean(r['num_parameters'] for r in rows):.0f} "
        f"of one-shot {rows[0]['one_shot_parameters']}; kept operations "
        f"{statistics.fmean(r['kept_operations'] for r in rows):.1f} of {2 * sum(2 + j for j in range(config.nodes_per_cell)) * len(config.operations)}"
    )
    result = {
        "benchmark": "metanas_pruning",
        "preset": config.name,
        "quick": args.quick,
        "tasks": num_tasks,
        "machine": platform.platform(),
        "threads": args.threads,
        "meta_train_seconds": meta_seconds,
        "meta_epochs": config.meta_epochs,
        **{key: summary(key)[0] for key in rows[0] if key != "one_shot_parameters"},
        "pruning_drop_ci95": summary("pruning_drop")[1],
        "one_shot_parameters": rows[0]["one_shot_parameters"],
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
