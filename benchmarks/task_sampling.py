"""Episodic task sampling throughput on Omniglot, from the decoded cache.

Measures, on the real Omniglot (``NASWEB_DATA_DIR``/omniglot):

- ``first_load_s``: decoding all 32,460 PNGs into the cache (a fresh temporary cache
  folder unless ``--cache-dir`` is given) plus building the Vinyals train split;
- ``cached_load_s``: the same call again, served from the cache;
- tasks per second of ``TaskSampler.sample`` for 20-way 1-shot and 5-way 5-shot on
  Vinyals train (4112 rotated classes), with 1 query per class (MAML++'s Omniglot
  setting) and with 15, and 20-way 1-shot with rotation augmentation on MAML++'s
  1200 training characters (the H-Meta-NAS setting).

Run: ``python benchmarks/task_sampling.py [--quick]``. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.data import TaskSampler, load_omniglot  # noqa: E402
from engine.data.imaging import default_workers  # noqa: E402
from engine.paths import data_dir  # noqa: E402
from engine.seeding import make_rngs  # noqa: E402

CONFIGS = [
    # key, split protocol, ways, shots, queries, augment
    ("20w1s", "vinyals", 20, 1, 1, False),
    ("5w5s", "vinyals", 5, 5, 1, False),
    ("20w1s_q15", "vinyals", 20, 1, 15, False),
    ("5w5s_q15", "vinyals", 5, 5, 15, False),
    ("20w1s_mamlpp_aug", "mamlpp", 20, 1, 1, True),
]


def tasks_per_second(sampler: TaskSampler, batch_tasks: int, seconds: float) -> float:
    sampler.sample(batch_tasks)  # warm-up
    tasks = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sampler.sample(batch_tasks)
        tasks += batch_tasks
    return tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurement windows (under a minute)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: engine.paths.data_dir()")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: auto)")
    parser.add_argument("--batch-tasks", type=int, default=8, help="tasks per sample() call (MAML++ uses 8)")
    args = parser.parse_args()

    window_s, repeats = (2.0, 1) if args.quick else (5.0, 3)
    with tempfile.TemporaryDirectory(prefix="nasweb-bench-cache-") as temporary:
        cache_root = args.cache_dir or Path(temporary)
        started = time.perf_counter()
        train = load_omniglot("train", data_dir=args.data_dir, cache_root=cache_root, workers=args.workers)
        first_load_s = time.perf_counter() - started
        started = time.perf_counter()
        train = load_omniglot("train", data_dir=args.data_dir, cache_root=cache_root)
        cached_load_s = time.perf_counter() - started
        mamlpp = load_omniglot("trainval", protocol="mamlpp", data_dir=args.data_dir, cache_root=cache_root)
        print(f"Omniglot from {args.data_dir or data_dir()}")
        print(f"first load (decode 32,460 PNGs + Vinyals train split): {first_load_s:6.2f} s")
        print(f"cached load (Vinyals train split):                     {cached_load_s:6.2f} s")

        results: dict[str, float] = {}
        for key, protocol, ways, shots, queries, augment in CONFIGS:
            dataset = train if protocol == "vinyals" else mamlpp
            sampler = TaskSampler(dataset, ways, shots, queries, make_rngs(0), augment_rotations=augment)
            rates = [tasks_per_second(sampler, args.batch_tasks, window_s) for _ in range(repeats)]
            results[key] = statistics.median(rates)
            print(
                f"{key:18s} {dataset.name:24s} {ways:2d}-way {shots}-shot {queries:2d}-query "
                f"augment={augment!s:5s}: {results[key]:9.0f} tasks/s"
            )

    summary = {
        "benchmark": "task_sampling",
        "quick": args.quick,
        "tasks_per_s_20w1s": round(results["20w1s"], 1),
        "tasks_per_s_5w5s": round(results["5w5s"], 1),
        "tasks_per_s_20w1s_q15": round(results["20w1s_q15"], 1),
        "tasks_per_s_5w5s_q15": round(results["5w5s_q15"], 1),
        "tasks_per_s_20w1s_mamlpp_aug": round(results["20w1s_mamlpp_aug"], 1),
        "first_load_s": round(first_load_s, 2),
        "cached_load_s": round(cached_load_s, 3),
        "batch_tasks": args.batch_tasks,
        "decode_workers": args.workers or default_workers(),
        "torch_threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
